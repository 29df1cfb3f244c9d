"""The `gpt-oss-server` command line: `serve` reads the settings and runs the HTTP server."""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

import uvicorn
from pydantic import ValidationError

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


def serve(settings: Settings) -> int:
    logging.getLogger().setLevel(settings.log_level.upper())
    app = create_app(settings, load_services)
    # uvicorn finishes in-flight requests on SIGTERM/SIGINT before the lifespan stops the engine.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=30,
    )
    return 0


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
