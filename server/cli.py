"""The `gpt-oss-server` command line: `serve` reads the settings and runs the HTTP server."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import socket
import sys
from importlib.metadata import PackageNotFoundError, version

import uvicorn
from pydantic import ValidationError
from sse_starlette.sse import AppStatus
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.app import create_app
from server.config import Settings, add_arguments, settings_from_args
from server.services import load_services

logger = logging.getLogger("server")


def _package_version() -> str:
    try:
        return version("gpt-oss-server")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpt-oss-server", description="An OpenAI-compatible inference server for gpt-oss."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_package_version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="serve a gpt-oss model over the OpenAI API")
    add_arguments(serve)
    return parser


# On SIGTERM/SIGINT in-flight requests get this long to finish; then streams still open are ended
# (cleanly: a whole last event, then the end of the body). Under Docker's default 10 s stop timeout.
STREAM_DRAIN_S = 5.0
# What uvicorn waits for any request before cancelling it (a backstop: streams end at the drain).
GRACEFUL_SHUTDOWN_S = 30


class _CompleteResponses:
    """End the body of a response that the app started but returned without finishing.

    sse-starlette, told to shut down, cancels a stream and returns without the final body message;
    uvicorn would then cut the connection mid-body. Sent here instead, the client sees a stream
    that ended after its last whole event.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = finished = False

        async def tracked(message: Message) -> None:
            nonlocal started, finished
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            await send(message)

        await self.app(scope, receive, tracked)
        if started and not finished:
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class _Server(uvicorn.Server):
    """uvicorn's server; on shutdown, open streams get STREAM_DRAIN_S before they are ended."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        end_streams = asyncio.get_running_loop().call_later(STREAM_DRAIN_S, _end_streams)
        try:
            await super().shutdown(sockets)
        finally:
            end_streams.cancel()


def _end_streams() -> None:
    logger.info("ending the streams still open after %.0f s", STREAM_DRAIN_S)
    AppStatus.should_exit = True  # sse-starlette's signal to its streams


def _stopped(signum: int, frame: object) -> None:
    """What uvicorn re-raises a SIGTERM into once it has shut down on it: nothing more to do."""


def serve(settings: Settings) -> int:
    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings, load_services)
    # Left to itself, sse-starlette ends every stream the moment a stop is asked for: let them
    # drain instead (older sse-starlette lacks the switch: its streams end at once, cleanly).
    if hasattr(AppStatus, "disable_automatic_graceful_drain"):
        AppStatus.disable_automatic_graceful_drain()
    config = uvicorn.Config(
        _CompleteResponses(app),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    server = _Server(config)
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT before the lifespan stops the engine.
    # Then it restores the SIGTERM handler it found and raises the signal again; with the default
    # handler that would kill the process (exit status 143 in a container) after a clean
    # shutdown. A stop that was asked for is a clean exit: the handler it finds is `_stopped`.
    previous = signal.signal(signal.SIGTERM, _stopped)
    try:
        server.run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0 if server.started else 3  # uvicorn's status for a server that could not start


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        try:
            settings = settings_from_args(args)
        except ValidationError as exc:
            logger.error("invalid settings:\n%s", exc)
            return 2
        return serve(settings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
