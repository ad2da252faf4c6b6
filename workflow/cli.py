"""What every step's command line shares: the options, logging, and one-line errors.

Only the project's own errors (workflow/errors.py: bad input, a failed check, a refusal) and running out of
memory or disk become one `error:` line. Anything else is a bug: its full traceback goes to stderr (the
step's log), then one `error:` line that says so.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from workflow import devices
from workflow.errors import ParamsError, StepError
from workflow.params import PRECISIONS, STRATEGIES, Params, check_machine, load_params

log = logging.getLogger("workflow")
_job = {"name": "this step"}  # what the step runs for (variant or model), named in out-of-resource messages
GPU_STEPS = ("quant", "train", "merge", "evaluate")  # the steps that lease GPUs (rules with gpu=1 or more)
OOM_HINT = ("lower train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective "
            "batch), set gradient_checkpointing: true, lower data.max_length, or use a smaller precision (nf4)")


def parser(step: str, doc: str | None, *, variant: bool = False, model: bool = True) -> argparse.ArgumentParser:
    """An argument parser with --params and the matrix keys this step is run for."""
    p = argparse.ArgumentParser(prog=f"python -m workflow.{step}", description=(doc or "").strip().splitlines()[0])
    p.set_defaults(step=step)  # which step: load_checked checks the machine of a GPU step everywhere
    p.add_argument("--params", default="params.yaml", help="the params file (default: params.yaml)")
    if model or variant:
        p.add_argument("--model", required=True, help="a key of `models` in params.yaml")
    if variant:
        p.add_argument("--precision", required=True, choices=PRECISIONS)
        p.add_argument("--strategy", required=True, choices=STRATEGIES)
    return p


def setup_logging() -> None:
    """Log to stderr; the orchestrators redirect it to logs/<rule>/<variant>.log."""
    logging.basicConfig(
        level=os.environ.get("LOWPREC_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def load_checked(args: argparse.Namespace) -> Params:
    """Load params.yaml, check its matrix against this machine, and check that the command's matrix keys
    exist in it. The GPU steps (GPU_STEPS) always check their machine; the others skip it inside a SLURM
    job, where they may run on a node without the GPUs (`devices.step_machine`)."""
    params = load_params(args.params)
    machine = devices.step_machine(gpu_step=getattr(args, "step", None) in GPU_STEPS)
    if machine is not None:  # fp16 under ZeRO-3 on a CPU, bf16 on pre-Ampere GPUs: refused in every step
        check_machine(params, machine.device, args.params, machine.described())
    model = getattr(args, "model", None)
    parts = [getattr(args, k, None) for k in ("model", "precision", "strategy")]
    _job["name"] = "-".join(p for p in parts if p) or "this step"
    if model is not None and model not in params.models:
        raise ParamsError(f"{args.params}: models.{model}: no such model; add it under `models`")
    return params


def run(step_main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a step's main; exit code 1 with one last `error:` line on failure (see the module's docstring)."""
    setup_logging()
    _job["name"] = "this step"  # until load_checked names it (a second run in one process starts over)
    try:
        return step_main(argv)
    except (ParamsError, StepError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was marked finished; rerun the same command to continue", file=sys.stderr)
        return 130
    except Exception as exc:  # SystemExit (argparse's usage errors) passes through
        kind = _out_of(exc)  # torch's OutOfMemoryError is a RuntimeError
        if kind is not None:
            print(f"error: {_job['name']}: {kind}", file=sys.stderr)
            return 1
        traceback.print_exc(file=sys.stderr)
        kind = type(exc).__qualname__ if type(exc).__module__ == "builtins" else \
            f"{type(exc).__module__}.{type(exc).__qualname__}"
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        print(f"error: {_job['name']}: a bug, not bad input: {kind}: {first} (traceback above); please report it",
              file=sys.stderr)
        return 1


def _out_of(exc: BaseException) -> str | None:
    """What a memory or disk exhaustion error means for the user (None: it is something else).

    Recognised without importing torch into steps that never load it: CUDA raises torch.OutOfMemoryError,
    the CPU allocator a RuntimeError that says so; torch.save reports a full disk in a RuntimeError too.
    """
    text = str(exc)
    torch = sys.modules.get("torch")
    if (isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError))
            or "can't allocate memory" in text or "out of memory" in text.lower()):
        return f"out of memory ({type(exc).__name__}); {OOM_HINT}"
    if getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        where = f" writing {exc.filename}" if getattr(exc, "filename", None) else ""
        return (f"no space left on the device{where}; free disk space (results/checkpoints/ and hub caches are "
                "the big ones) and rerun the same command (training resumes from its last checkpoint)")
    return None
