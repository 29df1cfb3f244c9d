"""Typed API errors and the one place that turns every failure into OpenAI's error envelope.

`{"error": {"message", "type", "param", "code"}}` with the right status; errors are raised where
they are detected (with what was expected and what was found) and rendered here only.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger(__name__)


class APIError(Exception):
    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers: dict[str, str] = {}


class InvalidRequestError(APIError):
    pass


class AuthenticationError(APIError):
    status = 401
    type = "authentication_error"


class NotFoundError(APIError):
    status = 404


class RequestTooLargeError(APIError):
    status = 413


class TooManyRequestsError(APIError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after_s: int = 1) -> None:
        super().__init__(message, code="queue_full")
        self.headers = {"Retry-After": str(retry_after_s)}


class ServiceUnavailableError(APIError):
    status = 503
    type = "server_error"


def envelope(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(
        envelope(error.message, error.type, error.param, error.code),
        status_code=error.status,
        headers=error.headers,
    )


def _param_of(location: tuple) -> str | None:
    parts = [str(p) for p in location if p not in ("body",)]
    if not parts:
        return None
    out = parts[0]
    for p in parts[1:]:
        out += f"[{p}]" if p.isdigit() else f".{p}"
    return out


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('ctx', {}).get('error', '')}"
            return JSONResponse(envelope(message, "invalid_request_error"), status_code=400)
        param = _param_of(tuple(first.get("loc", ())))
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        else:
            message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return JSONResponse(envelope(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return JSONResponse(envelope(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return JSONResponse(
            envelope(f"internal error: {type(exc).__name__}", "server_error"), status_code=500
        )
