#!/usr/bin/env bash
# Set up, then run the default experiment end to end with Snakemake (offline, CPU by default).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" DVC_NO_ANALYTICS=1
.venv/bin/snakemake --cores all --resources gpu="${GPUS:-2}" "$@"
cat results/report/summary.md
