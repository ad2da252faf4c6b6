"""Step `train`: fine-tune one LoRA adapter for one variant (model x precision x strategy).

This module is the step's command line and stays light (no torch import) until it has leased the job's
GPUs and set `CUDA_VISIBLE_DEVICES`: CUDA reads it once, when first initialised. Then:
- `single`: train in this process (`workflow.trainer`);
- `zero2`/`zero3`: decide about checkpoints once, then start N copies of this same command under the
  launcher of params.yaml (`workflow.distributed`); each copy trains one rank, rank 0 writes the files.

Two metrics files: `--metrics` holds what is deterministic for a given params.yaml (losses, token counts,
weight storage, the DeepSpeed config), `--timing` what varies from run to run (runtime, throughput, peak
memory, device, GPU ids, launch command), so a determinism check compares the first alone. `--live` streams
the Trainer's logs through dvclive.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from workflow import cli, devices, distributed
from workflow.checkpoints import CHECKPOINT_ROOT, RESUME_MODES, inputs_digest, resume_point, variant_fingerprint
from workflow.io import write_json_atomic, write_text_atomic
from workflow.params import Params, ParamsError, refusal, variant_id

log = logging.getLogger(__name__)
LAUNCH = "LOWPREC_LAUNCH"  # the workers' launch command, likewise


def train_variant(params: Params, model: str, precision: str, strategy: str, model_dir: Path, data_dir: Path,
                  out: Path, resume: str = "auto", live_dir: Path | None = None, checkpoint_dir: Path | None = None):
    """Train in this process (see `workflow.trainer.train_variant`); imports torch."""
    from workflow import trainer

    return trainer.train_variant(params, model, precision, strategy, model_dir, data_dir, out, resume,
                                 live_dir=live_dir, checkpoint_dir=checkpoint_dir)


def parse(argv: Sequence[str]):
    p = cli.parser("train", __doc__, variant=True)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step")
    p.add_argument("--out", required=True, type=Path, help="adapter directory to write")
    p.add_argument("--metrics", required=True, type=Path, help="training metrics JSON to write")
    p.add_argument("--curve", required=True, type=Path, help="loss curve CSV (step,loss) to write")
    p.add_argument("--timing", required=True, type=Path, help="timing/memory metrics JSON to write")
    p.add_argument("--live", required=True, type=Path, help="dvclive directory for live training metrics")
    p.add_argument("--resume", choices=RESUME_MODES, default="auto",
                   help="auto (default): resume from the last complete checkpoint made with the same params, "
                        "start over if it is stale; require: resume or fail, never discard; never: start over")
    return p.parse_args(argv)


def train_and_write(params: Params, args, gpu_ids: Sequence[str], launch: str | None) -> None:
    """Train this process's part; rank 0 writes the curve and both metrics files."""
    result = train_variant(params, args.model, args.precision, args.strategy, args.model_dir, args.data, args.out,
                           args.resume, live_dir=args.live)
    if result.rank != 0:
        return
    result.timing.update({"gpu_ids": list(gpu_ids), "launch_command": launch})
    rows = "".join(f"{r['step']},{r['loss']}\n" for r in result.loss_curve)
    write_text_atomic(args.curve, "step,loss\n" + rows)
    write_json_atomic(args.metrics, result.metrics)
    write_json_atomic(args.timing, result.timing)
    log.info("wrote %s (loss %s -> %s)", args.out, result.metrics["train_loss_first"], result.metrics["train_loss_last"])


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse(argv)
    params = cli.load_checked(args)
    reason = refusal(params, args.model, args.precision, args.strategy,  # also for variants outside the matrix
                     devices.job_device())
    if reason:
        raise ParamsError(f"{args.params}: {reason}")
    if distributed.is_worker():  # one rank of a ZeRO job: the first process leased the GPUs
        distributed.bind_to_parent()
        train_and_write(params, args, devices.leased_ids() or [], os.environ.get(LAUNCH))
        distributed.exit_worker()
    vid = variant_id(args.model, args.precision, args.strategy)
    n = params.processes(args.strategy)
    lease = devices.lease_gpus(n, params.distributed.gpu_lock_dir, params.distributed.gpu_wait_s, vid)
    try:
        if args.strategy == "single":
            train_and_write(params, args, lease.ids, None)
            return 0
        # Decided once, here, before N ranks look at the same directory.
        fingerprint = variant_fingerprint(params, args.model, args.precision, args.strategy,
                                          inputs_digest(args.model_dir, args.data))
        resume_point(CHECKPOINT_ROOT / vid, fingerprint, args.resume)
        cmd = distributed.launch_command(params, args.strategy, argv)
        env = distributed.launch_env(params, args.strategy, lease.ids)
        env[LAUNCH] = " ".join(cmd)
        log.info("%s: starting %d worker(s) per node: %s", vid, n, json.dumps(cmd))
        distributed.run_workers(cmd, env)
        return 0
    finally:
        lease.release()


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
