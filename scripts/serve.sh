#!/usr/bin/env bash
# Set up everything on a fresh machine and start the server: bash scripts/serve.sh [serve flags...]
# (VENV and TORCH_SPEC: see scripts/setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/setup.sh
. scripts/setup.sh ""
exec gpt-oss-server serve "$@"
