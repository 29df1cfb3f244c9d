"""create_app(settings, loader) -> the FastAPI application: routers, lifespan, auth, limits, errors.

The model loads in a background thread when the app starts; until it is really ready `/health`
answers 503 (and so do the API routes), never a lazy failure on a first request; so it does again if
the engine's process dies. Shutdown stops the engine, ending open streams cleanly.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.async_engine import EngineDeadError
from server.config import Settings
from server.errors import (
    RequestTooLargeError,
    ServiceUnavailableError,
    envelope,
    error_response,
    install_error_handlers,
)
from server.metrics import RequestMetrics, ServerMetrics
from server.routes import chat_completions, completions, metrics, models, responses, tokenize
from server.state import ServerState, Services, require_api_key
from server.store import ResponseStore

logger = logging.getLogger(__name__)


class BodySizeLimit:
    """Refuse bodies over the limit with 413, by Content-Length or by counting a chunked body."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        error = RequestTooLargeError(f"request body over the {self.max_bytes}-byte limit")
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.max_bytes:
                await error_response(error)(scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        # No length given: read the body here (bounded by the limit), then replay it to the app.
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            messages.append(message)
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await error_response(error)(scope, receive, send)
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


class RequestId:
    """Give every request an id (the client's X-Request-Id or a new one), echo it, log the line.

    Plain ASGI rather than `@app.middleware("http")`, which relays every streamed chunk through an
    extra task and memory stream.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        rid = headers.get(b"x-request-id", b"").decode("latin-1") or uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-request-id", rid.encode("latin-1")))
                logger.info(
                    "%s %s %s rid=%s", scope["method"], scope["path"], message["status"], rid
                )
            await send(message)

        await self.app(scope, receive, send_with_id)


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
    app.add_middleware(RequestMetrics)
    app.add_middleware(RequestId)
    app.state.metrics = ServerMetrics()

    @app.get("/health")
    async def health() -> JSONResponse:
        failure = state.services.engine.failure if state.services is not None else None
        if state.services is not None and failure is None:
            return JSONResponse({"status": "ok"})
        status = "error" if state.load_error or failure else "loading"
        message = failure or state.load_error or "loading"
        return JSONResponse(
            {"status": status, **envelope(message, "server_error")}, status_code=503
        )

    @app.exception_handler(EngineDeadError)
    async def engine_dead(_: Request, exc: EngineDeadError) -> JSONResponse:
        # The engine died between the readiness check and the request's start.
        return error_response(ServiceUnavailableError(str(exc)))

    auth = [Depends(require_api_key)]
    app.include_router(models.router, dependencies=auth)
    app.include_router(chat_completions.router, dependencies=auth)
    app.include_router(tokenize.router, dependencies=auth)
    app.include_router(completions.router, dependencies=auth)
    app.include_router(responses.router, dependencies=auth)
    app.include_router(metrics.router)  # open unless --protect-metrics (checked inside)
    return app
