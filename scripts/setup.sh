# Sourced by scripts/test.sh and scripts/serve.sh: create or reuse the virtual environment, make
# sure a torch is importable, then install the project with the given extras ("" or "[test]").
#   VENV=path     the virtual environment to create or reuse (default .venv)
#   TORCH_SPEC=.. the torch to install when none is importable (default torch==2.13.0)
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
if ! python -c "import torch" 2>/dev/null; then
  python -m pip install -q "${TORCH_SPEC:-torch==2.13.0}"
fi
python -m pip install -q -e ".${1:-}"
