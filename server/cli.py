"""The `gpt-oss-server` command line: subcommands and their dispatch.

`serve` will start the OpenAI-compatible HTTP server once the engine and server layers land; until
then it says so plainly and exits non-zero rather than pretending to serve.
"""

from __future__ import annotations

import argparse
import logging
import sys
from importlib.metadata import PackageNotFoundError, version

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
    serve.add_argument("--model", help="checkpoint directory (Hugging Face or original layout)")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        logger.error(
            "the HTTP server is not built yet in this version: only the harmony layer "
            "(harmony/) exists so far; see README.md for what works today"
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
