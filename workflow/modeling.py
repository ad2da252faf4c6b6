"""Loading models and tokenizers the same way in every step, and measuring what they weigh."""

from __future__ import annotations

import logging
import math
import resource
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from workflow.errors import StepError
from workflow.precision import PrecisionPlan, dtype_name
from workflow.remote import own_code
from workflow.tokenize import load_tokenizer  # noqa: F401 (the steps load both from here)

log = logging.getLogger(__name__)

# bitsandbytes warns on every int8 forward that it casts inputs to fp16; that is the documented behaviour.
warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")


def load_base(model_dir: str | Path, plan: PrecisionPlan, trust_remote_code: bool = False) -> PreTrainedModel:
    """The base model loaded as `plan` says: dtype, quantization and device placement."""
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise StepError(f"{model_dir}: no config.json; run the download step for this model first")
    with own_code(model_dir, trust_remote_code, "model"):
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir),
            dtype=plan.load_dtype,
            quantization_config=plan.quantization,
            device_map=plan.device_map,
            trust_remote_code=trust_remote_code,
        )
    if plan.quantization is None and plan.strategy == "single":  # DeepSpeed's engine places (partitions) it
        model.to(plan.torch_device)
    return model


def load_unquantized(model_dir: str | Path, dtype: torch.dtype, device: str, trust_remote_code: bool = False):
    """The base in plain `dtype`, never quantized: the only model adapters are merged into."""
    with own_code(model_dir, trust_remote_code, "model"):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype,
                                                     trust_remote_code=trust_remote_code)
    return model.to(device)


def dequantized_weight(module: torch.nn.Module) -> torch.Tensor | None:
    """The weight a bitsandbytes layer computes with, back in floating point (bitsandbytes' own dequantize:
    nf4 blocks x absmax, LLM.int8 rows x SCB / 127); None for any other module."""
    import bitsandbytes as bnb

    if isinstance(module, bnb.nn.Linear4bit):
        return bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
    if isinstance(module, bnb.nn.Linear8bitLt):
        return bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
    return None


def load_dequantized(model_dir: str | Path, plan: PrecisionPlan, trust_remote_code: bool = False):
    """The base in `plan.load_dtype`, its quantized layers replaced by their round trip through `plan`'s
    quantization: the weights a k-bit adapter was trained against, unquantized (merge.target: dequantized).
    The quantized model is loaded as training loaded it and dropped once its weights are copied over."""
    model = load_unquantized(model_dir, plan.load_dtype, plan.device, trust_remote_code)
    quantized = load_base(model_dir, plan, trust_remote_code)
    copied = 0
    for name, module in quantized.named_modules():
        weight = dequantized_weight(module)
        if weight is not None:
            target = model.get_submodule(name).weight
            target.data.copy_(weight.to(target.device, target.dtype))
            copied += 1
    del quantized
    if not copied:
        raise StepError(f"{model_dir}: precision {plan.name} quantized no layer; nothing to dequantize")
    log.info("%s: %d layers replaced by their %s round trip", model_dir, copied, plan.name)
    return model


def numel(t: torch.Tensor) -> int:
    """Elements of a tensor, also when ZeRO-3 has partitioned it away from this rank (`ds_numel`)."""
    return getattr(t, "ds_numel", None) or t.numel()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes held by parameters and buffers (quantized weights counted at their packed size)."""
    return sum(numel(t) * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def quant_state_bytes(state) -> int:
    """Bytes of a 4-bit weight's per-block scales: absmax (itself quantized with double quant), the nested
    absmax and offset. The fixed lookup tables (`code`: 16 or 256 floats per layer, the same for every layer
    size) are left out: they are constants, not storage that grows with the parameter count."""
    total = state.absmax.numel() * state.absmax.element_size()
    if getattr(state, "nested", False):
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        total += state.offset.numel() * state.offset.element_size()
    return total


def linear_weight_bits(model: torch.nn.Module) -> dict[str, object]:
    """Storage of the Linear layers that a k-bit load quantizes (every Linear but the output head), as
    bits per parameter: nf4 with double quant is 4 + 8/64 + 32/(64*256) ~ 4.127; LLM.int8 is 8 plus one fp32
    scale per output row; unquantized layers are their dtype's width (16)."""
    import bitsandbytes as bnb

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    params = storage = 0
    kinds = set()
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module is head:
            continue
        weight = module.weight
        if isinstance(module, bnb.nn.Linear4bit):
            state = weight.quant_state
            n = math.prod(state.shape)
            size = numel(weight) * weight.element_size() + quant_state_bytes(state)
            kinds.add(f"{state.quant_type}{'+double_quant' if state.nested else ''}")
        elif isinstance(module, bnb.nn.Linear8bitLt):
            n = numel(weight)
            scale = getattr(weight, "SCB", None)
            size = n * weight.element_size() + (scale.numel() * scale.element_size() if scale is not None else 0)
            kinds.add("llm.int8")
        else:
            n = numel(weight)
            size = n * weight.element_size()
            kinds.add(dtype_name(weight.dtype))
        params, storage = params + n, storage + size
    return {
        "linear_params": params,
        "linear_weight_bytes": storage,
        "linear_bits_per_param": 8 * storage / params if params else None,
        "linear_storage": "+".join(sorted(kinds)),
    }


def peak_memory(device: str) -> dict[str, object]:
    """Peak memory of this process so far: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device == "cuda":
        return {
            "peak_memory_bytes": int(torch.cuda.max_memory_allocated()),
            "peak_memory_reserved_bytes": int(torch.cuda.max_memory_reserved()),
            "peak_memory_kind": "cuda_max_memory_allocated",
        }
    return {"peak_memory_bytes": peak_rss(), "peak_memory_kind": "cpu_peak_rss"}


def peak_rss() -> int:
    """This process's peak resident memory since it started its program, in bytes.

    Linux's VmHWM (the high-water mark of this program's own memory map). Not getrusage's ru_maxrss: Linux
    carries that across exec, so a step started by a big parent (pytest, Snakemake via its shell) would
    report at least the parent's size at fork."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # no procfs: KiB on Linux


def eval_batches(data_dir: str | Path, tokenizer, batch_size: int, max_rows: int | None = None) -> list[dict]:
    """The eval split as right-padded batches (labels padded with -100), in file order."""
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq

    path = Path(data_dir) / "eval"
    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError:
        raise StepError(f"{path}: no tokenized eval split; run the preprocess step first") from None
    if max_rows is not None:
        ds = ds.select(range(min(max_rows, len(ds))))
    collate = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    rows = [ds[i] for i in range(len(ds))]
    return [collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]


@torch.no_grad()
def logits_of(model, batch: dict) -> torch.Tensor:
    """Float32 logits of `model` on one batch, on the model's device."""
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
    return out.logits.float()


@torch.no_grad()
def token_loss(model, batches: list[dict]) -> tuple[float, int]:
    """Mean cross-entropy over every labelled token of `batches` (token-weighted), and the token count."""
    total, count = 0.0, 0
    for batch in batches:
        logits = logits_of(model, batch)[:, :-1]
        labels = batch["labels"][:, 1:].to(logits.device)
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="sum"
        )
        total += float(loss)
        count += int((labels != -100).sum())
    if count == 0:
        raise StepError("the eval split has no labelled tokens; check data.max_length and the data")
    return total / count, count
