#!/usr/bin/env bash
# GPU acceptance run, for a machine with an NVIDIA GPU (compute capability 8.0+): run it first there.
# Builds a ~100M-parameter Llama offline, runs the default matrix's single-device variants (fp16, bf16, int8,
# nf4) and bf16 under ZeRO-2 on one GPU through Snakemake in a copy of the project (results/gpu_check/), and
# fails unless their metrics show the GPU behaviour the README promises (scripts/gpu_check.py says what).
# Needs no network once scripts/setup.sh has installed .venv; under 10 minutes on one recent GPU.
# Arguments go to scripts/gpu_check.py (--workdir DIR, --check-only).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  echo "gpu_check: no .venv here; run scripts/setup.sh first (the only step that needs the network)" >&2
  exit 2
fi
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE=1 DVC_NO_ANALYTICS=1
# A hard stop at twice the expected time: a hung job must not hold the GPU for hours.
exec timeout "${GPU_CHECK_TIMEOUT_S:-1200}" python scripts/gpu_check.py "$@"
