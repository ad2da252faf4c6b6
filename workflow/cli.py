"""What every step's command line shares: the options, logging, and one-line errors."""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from collections.abc import Callable, Sequence

from workflow.devices import job_device
from workflow.errors import ParamsError, StepError
from workflow.params import PRECISIONS, STRATEGIES, Params, check_machine, load_params

log = logging.getLogger("workflow")
_job = {"name": "this step"}  # what the step runs for (variant or model), named in out-of-resource messages
OOM_HINT = ("lower train.per_device_train_batch_size (raise gradient_accumulation_steps to keep the effective "
            "batch), set gradient_checkpointing: true, lower data.max_length, or use a smaller precision (nf4)")


def parser(step: str, doc: str | None, *, variant: bool = False, model: bool = True) -> argparse.ArgumentParser:
    """An argument parser with --params and the matrix keys this step is run for."""
    p = argparse.ArgumentParser(prog=f"python -m workflow.{step}", description=(doc or "").strip().splitlines()[0])
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
    exist in it."""
    params = load_params(args.params)
    check_machine(params, job_device(), args.params)  # fp16 under ZeRO-3 on a CPU: refused in every step
    model = getattr(args, "model", None)
    parts = [getattr(args, k, None) for k in ("model", "precision", "strategy")]
    _job["name"] = "-".join(p for p in parts if p) or "this step"
    if model is not None and model not in params.models:
        raise ParamsError(f"{args.params}: models.{model}: no such model; add it under `models`")
    return params


def run(step_main: Callable[[Sequence[str] | None], int], argv: Sequence[str] | None = None) -> int:
    """Run a step's main; turn known failures into a one-line message and exit code 1."""
    setup_logging()
    try:
        return step_main(argv)
    except (ParamsError, StepError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (MemoryError, OSError, RuntimeError) as exc:  # torch's OutOfMemoryError is a RuntimeError
        kind = _out_of(exc)
        if kind is None:
            raise
        print(f"error: {_job['name']}: {kind}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was marked finished; rerun the same command to continue", file=sys.stderr)
        return 130


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
