#!/usr/bin/env bash
# Set up everything on a fresh machine and run the whole test suite: lint, format check, pytest.
# Usage: bash scripts/test.sh [pytest args...]   (VENV and TORCH_SPEC: see scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh "[test]"

echo "== ruff"
ruff check .
ruff format --check .

echo "== pytest"
python -m pytest "$@"
