"""`python -m server`: the same entry point as the `gpt-oss-server` console script."""

from server.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
