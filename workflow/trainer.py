"""In-process LoRA fine-tuning of one variant: the Trainer, its callbacks and checkpoints, DeepSpeed.

Follows the seeds' recipe: LoRA on every linear layer, gradient checkpointing with
`enable_input_require_grads`, `use_cache=False`, `prepare_model_for_kbit_training` for int8/nf4, and the
precision plan from `workflow.precision` (the only place that decides dtypes, quantization and optimizer).
Under a ZeRO strategy this runs in each of the N processes the train step started (`workflow.distributed`);
every rank trains and joins the collective save, rank 0 writes the files.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from datasets import load_from_disk
from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments, set_seed

from workflow import cli, distributed
from workflow.batching import (GroupedSampler, PackedCollator, PaddedCollator, example_lengths,
                               use_packed_attention)
from workflow.checkpoints import CHECKPOINT_ROOT, COMPLETE, inputs_digest, resume_point, variant_fingerprint
from workflow.estimate import budget_refusal
from workflow.io import atomic_dir, read_json, write_json_atomic
from workflow.modeling import (linear_weight_bits, load_base, load_tokenizer, numel, peak_memory,
                               weight_bytes)
from workflow.params import ZERO_STAGES, Params, ParamsError, variant_id
from workflow.precision import resolve_precision
from workflow.provenance import device_name, provenance
from workflow.stages import LIVE_KEYS  # the plot files both DAGs declare

MODEL_COLUMNS = ["input_ids", "attention_mask", "labels"]  # of the tokenized splits, what training reads

log = logging.getLogger(__name__)
_GC_KWARGS = {"use_reentrant": False}  # explicit, as torch requires; no input-grad hack needed but kept (seeds)
DEEPSPEED_CONFIG = "deepspeed_config.json"  # written into the adapter dir of a ZeRO variant


@dataclass
class TrainResult:
    metrics: dict
    timing: dict
    loss_curve: list[dict]
    model: object  # the trained PeftModel, for callers that inspect it (tests)
    rank: int = 0  # only rank 0 writes the step's files


class LogCallback(TrainerCallback):
    """Training logs through `logging` (stderr, the step's log file) instead of print() to stdout."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero:  # the ranks log the same gathered numbers
            return
        log.info("step %d: %s", state.global_step, {k: round(v, 5) if isinstance(v, float) else v
                                                    for k, v in (logs or {}).items()})




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


class CheckpointingTrainer(Trainer):
    """A Trainer whose checkpoints end with `complete.json`, and whose resumed runs log what unbroken ones do.

    The Trainer writes a checkpoint file by file; `complete.json`, written atomically after all of them, is
    what makes a checkpoint complete. It carries the params fingerprint and the Trainer's loss accumulators,
    which the Trainer itself does not save: put back when a resumed run begins, they make its logged losses
    and mean loss the same numbers as an unbroken run's.
    """

    def __init__(self, *args, fingerprint: str, resume_from: Path | None = None,
                 sampler: GroupedSampler | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.fingerprint = fingerprint
        self.sampler = sampler  # None: the Trainer's own (random) sampler
        if resume_from is not None:
            self.add_callback(_RestoreLossAccumulators(self, read_json(resume_from / COMPLETE)))

    def _get_train_sampler(self, train_dataset=None):
        return self.sampler or super()._get_train_sampler(train_dataset)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        # Every rank's pending loss (a collective: all ranks are here), then rank 0 marks the checkpoint
        # complete once every rank has written its part (DeepSpeed saves one optimizer shard per rank).
        pending = [float(x) for x in self.accelerator.gather(self._tr_loss.detach().reshape(1)).cpu()]
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            write_json_atomic(path / COMPLETE, {
                "fingerprint": self.fingerprint,
                "step": self.state.global_step,
                "world_size": self.args.world_size,
                "loss_total": self._total_loss_scalar,  # summed at each logging step
                "loss_pending": pending,  # per rank, summed since the last logging step
                "last_logged_step": self._globalstep_last_logged,
            })
        self.accelerator.wait_for_everyone()

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
        t._tr_loss += self.saved["loss_pending"][t.args.process_index]
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
    checkpoint_dir: Path | None = None,
) -> TrainResult:
    """Train the variant's adapter into `out`; return its metrics and loss curve.

    `resume` (auto | require | never) says what to do with the variant's checkpoints (default directory:
    results/checkpoints/<variant>): see `workflow.checkpoints.resume_point`. Under a ZeRO strategy every
    rank calls this; the DeepSpeed config is generated here and saved beside the adapter.
    """
    vid = variant_id(model, precision, strategy)
    entry = params.models[model]
    targs = params.variant_train(precision)
    settings = params.strategy(strategy)
    rank, local_rank, world = distributed.rank_info()
    plan = resolve_precision(precision, optim=targs.optim, adam_epsilon=targs.adam_epsilon, strategy=strategy,
                             quant_storage=settings.nf4_quant_storage, local_rank=local_rank)
    log.info("variant %s (rank %d of %d): %s", vid, rank, world, plan.describe())
    set_seed(params.seed)

    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    try:
        train_ds = load_from_disk(str(Path(data_dir) / "train"))
    except FileNotFoundError:
        raise cli.StepError(f"{data_dir}/train: no tokenized data; run the preprocess step first") from None
    train_ds = train_ds.select_columns(MODEL_COLUMNS)  # reply_start is for generation only
    reason = budget_refusal(params, model, precision, strategy, model_dir,
                            max(len(ids) for ids in train_ds["input_ids"]))
    if reason:  # before the weights load (the estimate step refuses the same variant in the DAG)
        raise ParamsError(reason)
    ckpt_dir = Path(checkpoint_dir) if checkpoint_dir else CHECKPOINT_ROOT / vid
    fingerprint = variant_fingerprint(params, model, precision, strategy, inputs_digest(model_dir, data_dir))
    start = resume_point(ckpt_dir, fingerprint, resume)  # before loading the model: a refusal fails fast
    ds_config = None
    if strategy in ZERO_STAGES:
        ds_config = distributed.deepspeed_config(strategy, settings, targs, plan.amp, world, model_dir,
                                                 on_gpu=plan.device == "cuda")

    # Created before the model is loaded: with a ZeRO-3 config this makes from_pretrained partition the
    # weights as they load (deepspeed.zero.Init) instead of materialising the whole model in every rank.
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
        use_cpu=plan.device == "cpu",  # also under DeepSpeed: else accelerate sees one process on CPU
        deepspeed=ds_config,
        activation_checkpointing=False,  # enabled on the model below, with the k-bit preparation
        logging_steps=targs.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=targs.save_steps,
        save_total_limit=2,  # the last complete checkpoint survives a kill during the next save
        seed=params.seed,
        data_seed=params.seed,
        remove_unused_columns=False,  # MODEL_COLUMNS are exactly what the model takes (seeds 000 §3.10)
        report_to="none",
        # kept in the checkpoints' trainer state; packed rows have no pad but no attention_mask to count by either
        include_num_input_tokens_seen="all" if targs.packing else "non_padding",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    if ds_config is not None:  # the process group, now: ZeRO-3 partitions the weights across it while loading
        import deepspeed

        _ = args.device  # accelerate's process group (gloo on CPU)
        deepspeed.init_distributed()  # DeepSpeed's own handle on it, which its config reads the world size from
        distributed.release_shm_names()
    base = load_base(model_dir, plan, entry.trust_remote_code)
    base_bytes = weight_bytes(base)
    linear_bits = linear_weight_bits(base)
    lora_model = build_lora_model(base, params, plan, targs.gradient_checkpointing)
    trainable = sum(numel(p) for p in lora_model.parameters() if p.requires_grad)
    total = sum(numel(p) for p in lora_model.parameters())

    if targs.packing:
        log.info("packing: attention %s keeps the examples of a row apart", use_packed_attention(base))
    collator = PackedCollator() if targs.packing else PaddedCollator(tokenizer)
    sampler = None
    if targs.group_by_length:
        sampler = GroupedSampler(example_lengths(train_ds), args.train_batch_size * args.gradient_accumulation_steps,
                                 params.seed)
    callbacks = [LogCallback()] + ([LiveCallback(live_dir)] if live_dir is not None and rank == 0 else [])
    trainer = CheckpointingTrainer(model=lora_model, args=args, train_dataset=train_ds, data_collator=collator,
                                   sampler=sampler,
                                   callbacks=callbacks, fingerprint=fingerprint, resume_from=start)
    trainer.remove_callback(PrinterCallback)
    tokens_before = read_json(start / "trainer_state.json")["num_input_tokens_seen"] if start else 0
    output = trainer.train(resume_from_checkpoint=str(start) if start else None)

    steps = trainer.state.global_step
    tokens = int(trainer.state.num_input_tokens_seen)  # summed over all ranks
    curve = [{"step": h["step"], "loss": h["loss"]} for h in trainer.state.log_history if "loss" in h]
    runtime = output.metrics["train_runtime"]
    if ds_config is None:
        with atomic_dir(out) as tmp:
            lora_model.save_pretrained(str(tmp), safe_serialization=True)
    else:
        save_distributed(trainer, lora_model, out, ds_config, rank)
    metrics = {
        "variant": vid,
        "model": model,
        "precision": precision,
        "strategy": strategy,
        "resolved": plan.describe(),
        "processes": world,
        "deepspeed": ds_config,
        "steps": steps,
        "train_loss_first": curve[0]["loss"] if curve else None,
        "train_loss_last": curve[-1]["loss"] if curve else None,
        "train_loss_mean": trainer.mean_loss(),  # output.training_loss covers this call's steps only
        "train_tokens": tokens,
        "weight_footprint_bytes": base_bytes,
        **linear_bits,
        "trainable_params": trainable,
        "total_params": total,
        **optimizer_record(trainer),
    }
    timing = {
        "variant": vid,
        "device_name": device_name(plan.device),
        "made": provenance(plan.device),  # where, when, with what; the run id of the invocation that ran it
        "runtime_s": runtime,
        "tokens_per_s": (tokens - tokens_before) / runtime if runtime else None,  # non-pad tokens, this call's
        "padding_efficiency": padding_efficiency(trainer, collator),  # real / padded tokens, this call's batches
        "samples_per_s": output.metrics.get("train_samples_per_second"),
        "resumed_from": start.name if start else None,  # throughput then covers only the resumed part
        "processes": world,
        **peak_memory(plan.device),  # of rank 0's process
    }
    return TrainResult(metrics=metrics, timing=timing, loss_curve=curve, model=lora_model, rank=rank)


def optimizer_record(trainer: Trainer) -> dict:
    """What stepped the weights: the optimizer's class (and whether it pages its states: paged_adamw_32bit)
    and the fp16 loss scaler with its final scale (`loss_scaler` None: no loss scaling, as for bf16 or on a
    CPU, where fp16 AMP does not run). For the GPU acceptance run (scripts/gpu_check.py)."""
    opt = trainer.optimizer
    for _ in range(3):  # accelerate's wrapper, DeepSpeed's ZeRO optimizer: down to the one the Trainer made
        opt = getattr(opt, "optimizer", opt)
    scaler, by = getattr(trainer.accelerator, "scaler", None), None
    if scaler is not None and scaler.is_enabled():
        by, scale = f"{type(scaler).__module__}.{type(scaler).__qualname__}", float(scaler.get_scale())
    elif trainer.is_deepspeed_enabled and trainer.args.fp16:  # DeepSpeed scales fp16 losses itself
        engine_opt = getattr(trainer.model_wrapped, "optimizer", None)
        scale = getattr(engine_opt, "loss_scale", None)
        by = f"deepspeed:{type(engine_opt).__qualname__}" if isinstance(scale, (int, float)) else None
    return {
        "optimizer": f"{type(opt).__module__}.{type(opt).__qualname__}" if opt is not None else None,
        "optimizer_paged": bool(getattr(opt, "is_paged", False)),
        "loss_scaler": {"by": by, "scale": float(scale)} if by else None,
    }


def padding_efficiency(trainer: Trainer, collator) -> float | None:
    """Real tokens / tokens of the batches the collator built in this call, summed over all ranks (a
    collective under ZeRO: every rank calls it)."""
    import torch

    counts = torch.tensor([collator.real, collator.slots], dtype=torch.float64, device=trainer.args.device)
    if trainer.args.world_size > 1:
        counts = trainer.accelerator.reduce(counts, reduction="sum")
    real, slots = counts.tolist()
    return real / slots if slots else None


def save_distributed(trainer: Trainer, lora_model, out: Path, ds_config: dict, rank: int) -> None:
    """Save a DeepSpeed-trained adapter: a collective on every rank (ZeRO-3 gathers the 16-bit weights; a
    rank-0-only save hangs or kills the others), then rank 0 checks it and renames it into place."""
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp-ranks-{os.getppid()}")  # one name for all ranks of this node
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    trainer.save_model(str(tmp))
    trainer.accelerator.wait_for_everyone()
    if rank != 0:
        return
    with atomic_dir(out, staged=tmp):
        (tmp / "training_args.bin").unlink(missing_ok=True)  # a pickle nothing downstream reads
        expected = {name: tuple(getattr(p, "ds_shape", None) or p.shape)
                    for name, p in lora_model.named_parameters() if p.requires_grad}
        check_saved_adapter(tmp, expected)
        write_json_atomic(tmp / DEEPSPEED_CONFIG, ds_config)


def check_saved_adapter(adapter_dir: Path, expected: dict[str, tuple]) -> None:
    """Fail unless the saved adapter holds every trained LoRA tensor at its full shape, and training moved
    it (ZeRO-3 without a 16-bit gather on save silently writes empty or zero-sized tensors)."""
    from safetensors.torch import load_file

    path = Path(adapter_dir) / "adapter_model.safetensors"
    if not path.is_file():
        raise cli.StepError(f"{path}: the distributed save wrote no adapter weights; rerun the train step")
    saved = load_file(str(path))
    shapes = {k: tuple(v.shape) for k, v in saved.items()}
    want = sorted(shape for shape in expected.values())
    got = sorted(shapes.values())
    if not saved or got != want or any(v.numel() == 0 for v in saved.values()):
        raise cli.StepError(f"{path}: the saved adapter is empty or incomplete ({len(saved)} tensors, expected "
                            f"{len(expected)}); ZeRO-3 must gather 16-bit weights on save")
    if all(float(v.abs().sum()) == 0 for k, v in saved.items() if "lora_B" in k):
        raise cli.StepError(f"{path}: every lora_B tensor is zero: the saved adapter is untrained")
