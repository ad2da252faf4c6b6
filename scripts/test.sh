#!/usr/bin/env bash
# Set up, then run the whole test suite (real training on the builtin tiny model, both orchestrators).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
.venv/bin/python -m pytest -q "$@"
