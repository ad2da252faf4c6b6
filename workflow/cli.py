"""What every step's command line shares: the options, logging, and one-line errors."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence

from workflow.params import PRECISIONS, STRATEGIES, Params, ParamsError, load_params

log = logging.getLogger("workflow")


class StepError(RuntimeError):
    """A failure the user can act on; printed as one line, without a traceback."""


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
    """Load params.yaml and check that the command's matrix keys exist in it."""
    params = load_params(args.params)
    model = getattr(args, "model", None)
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
    except KeyboardInterrupt:
        print("interrupted: nothing was marked finished; rerun the same command to continue", file=sys.stderr)
        return 130
