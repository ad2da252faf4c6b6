"""Step `train`: fine-tune one LoRA adapter for one variant (model x precision x strategy).

Follows the seeds' recipe: LoRA on every linear layer, gradient checkpointing with
`enable_input_require_grads`, `use_cache=False`, `prepare_model_for_kbit_training` for int8/nf4, and the
precision plan from `workflow.precision` (the only place that decides dtypes, quantization and optimizer).
Checkpoints go to a directory outside the declared outputs so a killed run resumes instead of restarting.

Two metrics files: `--metrics` holds what is deterministic for a given params.yaml (losses, token counts,
weight storage), `--timing` what varies from run to run (runtime, throughput, peak memory, device), so a
determinism check compares the first alone. `--live` streams the Trainer's logs through dvclive.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from workflow import cli
from workflow.io import atomic_dir, read_json, write_json_atomic, write_text_atomic
from workflow.modeling import device_name, linear_weight_bits, load_base, load_tokenizer, peak_memory, weight_bytes
from workflow.params import Params, variant_id
from workflow.precision import resolve_precision

log = logging.getLogger(__name__)
CHECKPOINT_ROOT = Path("results/checkpoints")  # not a declared output: Snakemake deletes those on failure
_GC_KWARGS = {"use_reentrant": False}  # explicit, as torch requires; no input-grad hack needed but kept (seeds)
COMPLETE = "complete.json"  # written last into a checkpoint-N dir: without it the checkpoint is half-written
RESUME_MODES = ("auto", "require", "never")


@dataclass
class TrainResult:
    metrics: dict
    timing: dict
    loss_curve: list[dict]
    model: object  # the trained PeftModel, for callers that inspect it (tests)


class LogCallback(TrainerCallback):
    """Training logs through `logging` (stderr, the step's log file) instead of print() to stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        log.info("step %d: %s", state.global_step, {k: round(v, 5) if isinstance(v, float) else v
                                                    for k, v in (logs or {}).items()})


LIVE_KEYS = ("loss", "learning_rate", "grad_norm")  # one dvclive plot file each; rules/dvc.yaml list them


class LiveCallback(TrainerCallback):
    """Streams the Trainer's logs to dvclive while training: `<dir>/metrics.json` (latest values) and
    `<dir>/plots/metrics/train/<key>.tsv` for each of LIVE_KEYS (one row per logging step), which
    `dvc plots`/`dvc exp show` read.

    Nothing else: no params file, dvc.yaml, report or experiment of its own, so the files written are exactly
    the declared outputs; `dvc exp run` makes the experiment.
    """

    def __init__(self, live_dir: Path):
        from dvclive import Live

        self.live = Live(dir=str(live_dir), save_dvc_exp=False, dvcyaml=None, report=None)

    def _log(self, step: int, logs: dict) -> None:
        numbers = {k: v for k, v in logs.items() if k in LIVE_KEYS}
        if not numbers:
            return
        self.live.step = step
        for key, value in numbers.items():
            self.live.log_metric(f"train/{key}", value)
        self.live.make_summary()

    def on_train_begin(self, args, state, control, **kwargs):
        for entry in state.log_history:  # a resumed run: replay the logs its checkpoint carries
            self._log(entry["step"], entry)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._log(state.global_step, logs or {})

    def on_train_end(self, args, state, control, **kwargs):
        self.live.end()


def variant_fingerprint(params: Params, model: str, precision: str, strategy: str, inputs: str = "") -> str:
    """Hash of every param the variant's training depends on (and of its input files); checkpoints carry it."""
    relevant = {
        "seed": params.seed,
        "model": params.models[model].model_dump(),
        "data": params.data.model_dump(),
        "lora": params.lora.model_dump(),
        "train": params.variant_train(precision).model_dump(),
        "precision": precision,
        "strategy": strategy,
        "inputs": inputs,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def inputs_digest(model_dir: Path, data_dir: Path) -> str:
    """sha256 of the model's recorded file hashes and the tokenized train split: what else training reads."""
    h = hashlib.sha256()
    files = [Path(model_dir) / "source.json", *sorted((Path(data_dir) / "train").glob("*.arrow"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def resume_point(ckpt_dir: Path, fingerprint: str, mode: str = "auto") -> Path | None:
    """The checkpoint to resume from: the latest *complete* one made with `fingerprint`, or None.

    Incomplete checkpoints (a kill while saving: no `complete.json`) are removed. A complete checkpoint made
    with other params is stale: `auto` (what Snakemake and DVC run) removes it with a warning and starts
    over, since the params change is what the orchestrator is rerunning for; `require` refuses to go on
    and keeps it; `never` removes every checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0), key=_step)
    complete = []
    for path in found:
        if (path / COMPLETE).is_file():
            complete.append(path)
        else:
            log.warning("%s: incomplete (no %s); ignoring and removing it", path, COMPLETE)
            shutil.rmtree(path)
    if mode == "never":
        for path in complete:
            shutil.rmtree(path)
        return None
    if not complete:
        if mode == "require":
            raise cli.StepError(f"{ckpt_dir}: no complete checkpoint to resume from; run without --resume require")
        return None
    last = complete[-1]
    made_with = read_json(last / COMPLETE).get("fingerprint")
    if made_with == fingerprint:
        log.info("resuming from %s", last)
        return last
    if mode == "require":
        raise cli.StepError(
            f"{last}: made with other params or inputs (fingerprint {made_with}, now {fingerprint}); refusing "
            "to resume from it: restore the params it was made with, or run without --resume require to start over"
        )
    log.warning("%s: made with other params or inputs (fingerprint %s, now %s); not resuming from it, "
                "removing the variant's checkpoints and starting over", last, made_with, fingerprint)
    for path in complete:
        shutil.rmtree(path)
    return None


class CheckpointingTrainer(Trainer):
    """A Trainer whose checkpoints end with `complete.json`, and whose resumed runs log what unbroken ones do.

    The Trainer writes a checkpoint file by file; `complete.json`, written atomically after all of them, is
    what makes a checkpoint complete. It carries the params fingerprint and the Trainer's loss accumulators,
    which the Trainer itself does not save: put back when a resumed run begins, they make its logged losses
    and mean loss the same numbers as an unbroken run's.
    """

    def __init__(self, *args, fingerprint: str, resume_from: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint
        if resume_from is not None:
            self.add_callback(_RestoreLossAccumulators(self, read_json(resume_from / COMPLETE)))

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        write_json_atomic(path / COMPLETE, {
            "fingerprint": self.fingerprint,
            "step": self.state.global_step,
            "loss_total": self._total_loss_scalar,  # summed at each logging step
            "loss_pending": float(self._tr_loss.item()),  # summed since the last logging step
            "last_logged_step": self._globalstep_last_logged,
        })

    def mean_loss(self) -> float:
        """Mean training loss over every step of the run, resumed or not (call after train())."""
        return self._total_loss_scalar / max(self.state.global_step, 1)


class _RestoreLossAccumulators(TrainerCallback):
    """Sets a resumed Trainer's loss accumulators to those saved in the checkpoint (train() zeroes them)."""

    def __init__(self, trainer: CheckpointingTrainer, saved: dict):
        self.trainer, self.saved = trainer, saved

    def on_train_begin(self, args, state, control, **kwargs):
        t = self.trainer
        t._total_loss_scalar = self.saved["loss_total"]
        t._tr_loss += self.saved["loss_pending"]
        t._globalstep_last_logged = self.saved["last_logged_step"]


def build_lora_model(base, params: Params, plan, gradient_checkpointing: bool):
    """Wrap `base` with a LoRA adapter, applying the seeds' k-bit and checkpointing details."""
    if plan.kbit:
        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing, gradient_checkpointing_kwargs=_GC_KWARGS
        )
    elif gradient_checkpointing:
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=_GC_KWARGS)
    base.config.use_cache = False  # the KV cache conflicts with gradient checkpointing
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=params.lora.r,
        lora_alpha=params.lora.alpha,
        lora_dropout=params.lora.dropout,
        target_modules=params.lora.target_modules,
    )
    model = get_peft_model(base, lora)
    if gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings otherwise cut the graph (seeds 000 §2.10)
    return model


def train_variant(
    params: Params, model: str, precision: str, strategy: str, model_dir: Path, data_dir: Path, out: Path,
    resume: str = "auto",
    live_dir: Path | None = None,
) -> TrainResult:
    """Train the variant's adapter into `out`; return its metrics and loss curve.

    `resume` (auto | require | never) says what to do with the variant's checkpoints: see `resume_point`.
    """
    vid = variant_id(model, precision, strategy)
    entry = params.models[model]
    targs = params.variant_train(precision)
    plan = resolve_precision(precision, optim=targs.optim, adam_epsilon=targs.adam_epsilon)
    log.info("variant %s: %s", vid, plan.describe())
    set_seed(params.seed)

    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    try:
        train_ds = load_from_disk(str(Path(data_dir) / "train"))
    except FileNotFoundError:
        raise cli.StepError(f"{data_dir}/train: no tokenized data; run the preprocess step first") from None
    ckpt_dir = CHECKPOINT_ROOT / vid
    fingerprint = variant_fingerprint(params, model, precision, strategy, inputs_digest(model_dir, data_dir))
    start = resume_point(ckpt_dir, fingerprint, resume)  # before loading the model: a refusal fails fast
    base = load_base(model_dir, plan, entry.trust_remote_code)
    base_bytes = weight_bytes(base)
    linear_bits = linear_weight_bits(base)
    lora_model = build_lora_model(base, params, plan, targs.gradient_checkpointing)
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lora_model.parameters())

    args = TrainingArguments(
        output_dir=str(ckpt_dir),
        max_steps=targs.max_steps,
        num_train_epochs=targs.num_train_epochs,
        per_device_train_batch_size=targs.per_device_train_batch_size,
        gradient_accumulation_steps=targs.gradient_accumulation_steps,
        learning_rate=targs.learning_rate,
        lr_scheduler_type=targs.lr_scheduler_type,
        warmup_steps=targs.warmup_steps,
        weight_decay=targs.weight_decay,
        max_grad_norm=targs.max_grad_norm,
        optim=plan.optim,
        adam_epsilon=plan.adam_epsilon,
        bf16=plan.amp == "bf16",
        fp16=plan.amp == "fp16",
        use_cpu=plan.device == "cpu",
        activation_checkpointing=False,  # enabled on the model above, with the k-bit preparation
        logging_steps=targs.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=targs.save_steps,
        save_total_limit=2,  # the last complete checkpoint survives a kill during the next save
        seed=params.seed,
        data_seed=params.seed,
        remove_unused_columns=False,  # our columns are exactly what the model takes (seeds 000 §3.10)
        report_to="none",
        include_num_input_tokens_seen="non_padding",  # kept in the checkpoints' trainer state
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    callbacks = [LogCallback()] + ([LiveCallback(live_dir)] if live_dir is not None else [])
    trainer = CheckpointingTrainer(model=lora_model, args=args, train_dataset=train_ds, data_collator=collator,
                                   callbacks=callbacks, fingerprint=fingerprint, resume_from=start)
    trainer.remove_callback(PrinterCallback)
    tokens_before = read_json(start / "trainer_state.json")["num_input_tokens_seen"] if start else 0
    output = trainer.train(resume_from_checkpoint=str(start) if start else None)

    steps = trainer.state.global_step
    tokens = int(trainer.state.num_input_tokens_seen)
    curve = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    runtime = output.metrics["train_runtime"]
    with atomic_dir(out) as tmp:
        lora_model.save_pretrained(str(tmp), safe_serialization=True)
    metrics = {
        "variant": vid,
        "model": model,
        "precision": precision,
        "strategy": strategy,
        "resolved": plan.describe(),
        "steps": steps,
        "train_loss_first": curve[0]["loss"] if curve else None,
        "train_loss_last": curve[-1]["loss"] if curve else None,
        "train_loss_mean": trainer.mean_loss(),  # output.training_loss covers this call's steps only
        "train_tokens": tokens,
        "weight_footprint_bytes": base_bytes,
        **linear_bits,
        "trainable_params": trainable,
        "total_params": total,
    }
    timing = {
        "variant": vid,
        "device_name": device_name(plan.device),
        "runtime_s": runtime,
        "tokens_per_s": (tokens - tokens_before) / runtime if runtime else None,  # non-pad tokens, this call's
        "samples_per_s": output.metrics.get("train_samples_per_second"),
        "resumed_from": start.name if start else None,  # throughput then covers only the resumed part
        **peak_memory(plan.device),
    }
    return TrainResult(metrics=metrics, timing=timing, loss_curve=curve, model=lora_model)


def main(argv: Sequence[str] | None = None) -> int:
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
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    result = train_variant(params, args.model, args.precision, args.strategy, args.model_dir, args.data, args.out,
                           args.resume, live_dir=args.live)
    rows = "".join(f"{r['step']},{r['loss']}\n" for r in result.loss_curve)
    write_text_atomic(args.curve, "step,loss\n" + rows)
    write_json_atomic(args.metrics, result.metrics)
    write_json_atomic(args.timing, result.timing)
    log.info("wrote %s (loss %s -> %s)", args.out, result.metrics["train_loss_first"], result.metrics["train_loss_last"])
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
