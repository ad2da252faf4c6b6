#!/usr/bin/env bash
# Set up, then run the default experiment end to end with Snakemake (offline, CPU by default), hand the results
# to DVC, and print the report, saying plainly when this invocation ran nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH" HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}" DVC_NO_ANALYTICS=1
# One id for this invocation: every job records it, so the report can tell what ran now from what was reused.
LOWPREC_RUN_ID="$(.venv/bin/python -c 'from workflow.provenance import new_run_id; print(new_run_id())')"
export LOWPREC_RUN_ID
dvc_checkout() { [ -d .dvc ] && git rev-parse --git-dir >/dev/null 2>&1; }
# Outputs DVC restored (`dvc checkout`, `dvc pull`, `dvc exp apply`) and finds up to date are finished work for
# Snakemake too, whatever their timestamps say (workflow/handoff.py). A fresh clone holds no outputs (they
# live in DVC's cache, not in git), so there every job runs on this machine.
if dvc_checkout && [ -f dvc.lock ]; then
  .venv/bin/python -m workflow.handoff --resources gpu="${GPUS:-2}"
fi
.venv/bin/snakemake --cores all --resources gpu="${GPUS:-2}" "$@"
case " $* " in *" -n "*|*" --dry-run "*|*" --dryrun "*) exit 0 ;; esac
# DVC records what Snakemake made (dvc.lock, its cache), so a following `dvc repro` has nothing to redo.
if dvc_checkout; then
  .venv/bin/dvc commit -f -q
fi
report=results/report/summary.md
if grep -q "($LOWPREC_RUN_ID)" "$report"; then
  cat "$report"
else
  echo "Nothing ran: every output is up to date, so $report was not remade by this invocation." >&2
  echo "It shows an earlier run: $(grep -m1 '^Made on' "$report" || echo 'of unknown origin')" >&2
  echo "To make every result on this machine: scripts/run.sh --forceall" >&2
fi
