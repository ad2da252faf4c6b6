"""Step `train`: fine-tune one LoRA adapter for one variant (model x precision x strategy).

Follows the seeds' recipe: LoRA on every linear layer, gradient checkpointing with
`enable_input_require_grads`, `use_cache=False`, `prepare_model_for_kbit_training` for int8/nf4, and the
precision plan from `workflow.precision` (the only place that decides dtypes, quantization and optimizer).
Checkpoints go to a directory outside the declared outputs so a killed run resumes instead of restarting.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from datasets import load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import DataCollatorForSeq2Seq, PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed
from transformers.trainer_utils import get_last_checkpoint

from workflow import cli
from workflow.io import atomic_dir, write_json_atomic, write_text_atomic
from workflow.modeling import load_base, load_tokenizer, peak_memory, weight_bytes
from workflow.params import Params, variant_id
from workflow.precision import resolve_precision

log = logging.getLogger(__name__)
CHECKPOINT_ROOT = Path("results/checkpoints")  # not a declared output: Snakemake deletes those on failure
_GC_KWARGS = {"use_reentrant": False}  # explicit, as torch requires; no input-grad hack needed but kept (seeds)


@dataclass
class TrainResult:
    metrics: dict
    loss_curve: list[dict]
    model: object  # the trained PeftModel, for callers that inspect it (tests)


class CountingCollator:
    """Right-pads batches (labels with -100) and counts the non-pad tokens it hands to the model."""

    def __init__(self, tokenizer):
        self.inner = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
        self.tokens = 0

    def __call__(self, features):
        batch = self.inner(features)
        self.tokens += int(batch["attention_mask"].sum())
        return batch


class LogCallback(TrainerCallback):
    """Training logs through `logging` (stderr, the step's log file) instead of print() to stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        log.info("step %d: %s", state.global_step, {k: round(v, 5) if isinstance(v, float) else v
                                                    for k, v in (logs or {}).items()})


def variant_fingerprint(params: Params, model: str, precision: str, strategy: str) -> str:
    """Hash of every param the variant's training depends on; checkpoints carry it."""
    relevant = {
        "seed": params.seed,
        "model": params.models[model].model_dump(),
        "data": params.data.model_dump(),
        "lora": params.lora.model_dump(),
        "train": params.variant_train(precision).model_dump(),
        "precision": precision,
        "strategy": strategy,
    }
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def _resume_point(ckpt_dir: Path, fingerprint: str) -> str | None:
    """The last complete checkpoint made with the same params, else None (stale ones are removed)."""
    stamp = ckpt_dir / "fingerprint.txt"
    if ckpt_dir.exists() and (not stamp.is_file() or stamp.read_text().strip() != fingerprint):
        log.warning("%s: checkpoints were made with other params; starting over", ckpt_dir)
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(stamp, fingerprint + "\n")
    last = get_last_checkpoint(str(ckpt_dir))
    if last and (Path(last) / "trainer_state.json").is_file():  # written last by the Trainer: a complete one
        log.info("resuming from %s", last)
        return last
    return None


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
    params: Params, model: str, precision: str, strategy: str, model_dir: Path, data_dir: Path, out: Path
) -> TrainResult:
    """Train the variant's adapter into `out`; return its metrics and loss curve."""
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
    base = load_base(model_dir, plan, entry.trust_remote_code)
    base_bytes = weight_bytes(base)
    lora_model = build_lora_model(base, params, plan, targs.gradient_checkpointing)
    trainable = sum(p.numel() for p in lora_model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in lora_model.parameters())

    ckpt_dir = CHECKPOINT_ROOT / vid
    resume = _resume_point(ckpt_dir, variant_fingerprint(params, model, precision, strategy))
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
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    collator = CountingCollator(tokenizer)
    trainer = Trainer(model=lora_model, args=args, train_dataset=train_ds, data_collator=collator,
                      callbacks=[LogCallback()])
    trainer.remove_callback(PrinterCallback)
    output = trainer.train(resume_from_checkpoint=resume)

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
        "steps": trainer.state.global_step,
        "train_loss_first": curve[0]["loss"] if curve else None,
        "train_loss_last": curve[-1]["loss"] if curve else None,
        "train_loss_mean": output.training_loss,
        "runtime_s": runtime,
        "train_tokens": collator.tokens,
        "tokens_per_s": collator.tokens / runtime if runtime else None,
        "samples_per_s": output.metrics.get("train_samples_per_second"),
        "weight_footprint_bytes": base_bytes,
        "trainable_params": trainable,
        "total_params": total,
        "resumed_from": Path(resume).name if resume else None,
        **peak_memory(plan.device),
    }
    return TrainResult(metrics=metrics, loss_curve=curve, model=lora_model)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("train", __doc__, variant=True)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step")
    p.add_argument("--out", required=True, type=Path, help="adapter directory to write")
    p.add_argument("--metrics", required=True, type=Path, help="training metrics JSON to write")
    p.add_argument("--curve", required=True, type=Path, help="loss curve CSV (step,loss) to write")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    result = train_variant(params, args.model, args.precision, args.strategy, args.model_dir, args.data, args.out)
    rows = "".join(f"{r['step']},{r['loss']}\n" for r in result.loss_curve)
    write_text_atomic(args.curve, "step,loss\n" + rows)
    write_json_atomic(args.metrics, result.metrics)
    log.info("wrote %s (loss %s -> %s)", args.out, result.metrics["train_loss_first"], result.metrics["train_loss_last"])
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
