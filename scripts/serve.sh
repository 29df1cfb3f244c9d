#!/usr/bin/env bash
# Set up everything on a fresh machine and start the server: bash scripts/serve.sh [serve flags...]
#   VENV=path     the virtual environment to create or reuse (default .venv)
#   TORCH_SPEC=.. the torch to install when none is importable (default torch==2.13.0)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e .
exec gpt-oss-server serve "$@"
