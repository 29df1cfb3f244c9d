"""create_app(settings, loader) -> the FastAPI application: routers, lifespan, auth, limits, errors.

The model loads in a background thread when the app starts; until it is really ready `/health`
answers 503 (and so do the API routes), never a lazy failure on a first request. Shutdown stops the
engine, ending open streams cleanly.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from server.config import Settings
from server.errors import (
    RequestTooLargeError,
    envelope,
    error_response,
    install_error_handlers,
)
from server.routes import chat_completions, completions, metrics, models, responses, tokenize
from server.state import ServerState, Services, require_api_key
from server.store import ResponseStore

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse bodies over the limit with 413, by Content-Length or while streaming them in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = RequestTooLargeError(f"request body over the {self.max_bytes}-byte limit")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await error_response(too_large)(scope, receive, send)
            return
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise too_large
            return message

        await self.app(scope, counted, send)


def create_app(settings: Settings, loader: Callable[[Settings], Services]) -> FastAPI:
    state = ServerState(settings)

    def load() -> None:
        try:
            state.services = loader(settings)
            logger.info("ready: serving %s", settings.model_id)
        except Exception as exc:  # reported by /health and every route, and logged in full
            logger.exception("loading the model failed")
            state.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            state.ready.set()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.response_store = ResponseStore(
            settings.state_dir / "responses",
            max_age_s=settings.response_max_age_s,
            max_count=settings.response_max_count,
        )
        threading.Thread(target=load, name="loader", daemon=True).start()
        yield
        if state.services is not None:
            state.services.engine.shutdown()
        app.state.response_store.close()

    app = FastAPI(title="gpt-oss-server", lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)

    @app.middleware("http")
    async def request_id(request: Request, call_next: Callable) -> object:
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = rid
        response = await call_next(request)
        response.headers["x-request-id"] = rid
        logger.info("%s %s %s rid=%s", request.method, request.url.path, response.status_code, rid)
        return response

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.services is not None:
            return JSONResponse({"status": "ok"})
        status = "error" if state.load_error else "loading"
        return JSONResponse(
            {"status": status, **envelope(state.load_error or "loading", "server_error")},
            status_code=503,
        )

    auth = [Depends(require_api_key)]
    app.include_router(models.router, dependencies=auth)
    app.include_router(chat_completions.router, dependencies=auth)
    app.include_router(tokenize.router, dependencies=auth)
    app.include_router(completions.router, dependencies=auth)
    app.include_router(responses.router, dependencies=auth)
    app.include_router(metrics.router)  # open unless --protect-metrics (checked inside)
    return app
