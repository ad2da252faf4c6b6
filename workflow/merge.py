"""Step `merge`: fold a variant's adapter into the *unquantized* base and save sharded safetensors.

Never merges into a 4-bit/8-bit model (the seeds and bitsandbytes both say it gives wrong weights): the
base is loaded in the variant's unquantized dtype. `merge.target` says which weights an int8/nf4 adapter
goes into: the original ones (`base`) or their quantization round trip (`dequantized`, what the adapter was
trained against; `workflow.modeling.load_dequantized`). Before saving, the merged model's logits are compared
with base+adapter on real eval batches; a difference beyond the dtype's tolerance fails the step.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel

from workflow import cli, devices
from workflow.io import atomic_dir, write_json_atomic
from workflow.modeling import (eval_batches, load_dequantized, load_tokenizer, load_unquantized, logits_of,
                               peak_memory)
from workflow.params import Params, variant_id
from workflow.precision import PrecisionPlan, dtype_name, resolve_precision

log = logging.getLogger(__name__)
MEMORY_FILE = "merge_memory.json"  # the step's peak memory, beside the merged weights (varies run to run, so
# not in the merge metrics); scripts/gpu_check.py reads it

# Largest |merged - (base+adapter)| logit gap accepted, relative to the largest |logit|, per dtype. Unmerged,
# the adapter runs in fp32 beside the base; merged, its delta is rounded into the base dtype, so the gap is
# that dtype's rounding carried through the layers: a few machine epsilons (bf16 3.9e-3, fp16 9.8e-4).
# A dropped or wrong adapter moves logits by whole units and fails by orders of magnitude.
MERGE_RTOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 5e-2}


def check_adapter(adapter_dir: Path) -> None:
    """Fail with a clear message unless `adapter_dir` holds a readable saved adapter (before any model loads)."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if not (adapter_dir / name).is_file():
            raise cli.StepError(f"{adapter_dir}: missing {name}; rerun the train step for this variant")
    retrain = "the adapter is corrupt; delete it and rerun the train step for this variant"
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise cli.StepError(f"{adapter_dir}/adapter_config.json: not valid JSON; {retrain}") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise cli.StepError(f"{adapter_dir}/adapter_config.json: not a peft adapter config; {retrain}")
    try:
        with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as f:
            if not list(f.keys()):
                raise ValueError("no tensors")
    except Exception as exc:  # safetensors raises its own error type for every kind of damage
        raise cli.StepError(f"{adapter_dir}/adapter_model.safetensors: unreadable ({type(exc).__name__}); "
                            f"{retrain}") from None


def load_adapter(base, adapter_dir: Path):
    """`base` wrapped with the saved adapter; one-line error if it does not fit the base."""
    check_adapter(adapter_dir)
    try:
        return PeftModel.from_pretrained(base, str(adapter_dir))
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        raise cli.StepError(f"{adapter_dir}: cannot be applied to the base ({type(exc).__name__}: {first}); "
                            "delete it and rerun the train step for this variant") from exc


TARGETS = ("base", "dequantized")


def merge_target(target: str, plan: PrecisionPlan) -> str:
    """The target actually merged into: `dequantized` only for a quantized precision (for fp16/bf16 the
    round trip is the identity, so both are `base`)."""
    return target if plan.quantization is not None else "base"


def load_merge_base(target: str, model_dir: Path, plan: PrecisionPlan, trust_remote_code: bool = False):
    """The unquantized model an adapter is merged into, for `merge_target(target, plan)`."""
    if merge_target(target, plan) == "dequantized":
        return load_dequantized(model_dir, plan, trust_remote_code)
    return load_unquantized(model_dir, plan.load_dtype, plan.device, trust_remote_code)


def merge_variant(
    params: Params, model: str, precision: str, strategy: str,
    model_dir: Path, adapter_dir: Path, data_dir: Path, out: Path,
) -> dict:
    """Merge, check and save; return the merge metrics."""
    check_adapter(adapter_dir)
    entry = params.models[model]
    plan = resolve_precision(precision)
    dtype = plan.load_dtype
    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    target = merge_target(params.merge.target, plan)
    base = load_merge_base(target, model_dir, plan, entry.trust_remote_code)
    lora = load_adapter(base, adapter_dir).eval()
    batches = eval_batches(data_dir, tokenizer, params.evaluate.per_device_eval_batch_size)[: params.merge.check_batches]
    reference = [logits_of(lora, b) for b in batches]
    merged = lora.merge_and_unload().eval()
    diff = scale = 0.0
    for batch, ref in zip(batches, reference):
        mask = batch["attention_mask"].bool().to(ref.device)
        diff = max(diff, float((logits_of(merged, batch) - ref).abs()[mask].max()))
        scale = max(scale, float(ref.abs()[mask].max()))
    tol = MERGE_RTOL[dtype] * scale
    if not diff <= tol:  # also catches NaN
        raise cli.StepError(
            f"{variant_id(model, precision, strategy)}: merged logits differ from base+adapter by {diff:.3g} "
            f"(> {tol:.3g} for {dtype_name(dtype)}); the adapter or base is inconsistent, retrain this variant"
        )
    with atomic_dir(out) as tmp:
        merged.save_pretrained(str(tmp), max_shard_size=params.merge.max_shard_size, safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        write_json_atomic(tmp / MEMORY_FILE, peak_memory(plan.device))
        shards = sorted(p.name for p in tmp.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in tmp.glob("*.safetensors"))
    log.info("merged %s: max |dlogit| %.3g (tolerance %.3g), %d shard(s)", out, diff, tol, len(shards))
    return {
        "variant": variant_id(model, precision, strategy),
        "merge_dtype": dtype_name(dtype),
        "merge_target": target,
        "merge_max_abs_logit_diff": diff,
        "merge_tolerance": tol,
        "merge_max_abs_logit": scale,
        "merge_check_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "merged_shards": len(shards),
        "merged_bytes": size,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("merge", __doc__, variant=True)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--adapter", required=True, type=Path, help="output of the train step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step (check batches)")
    p.add_argument("--out", required=True, type=Path, help="merged model directory to write")
    p.add_argument("--metrics", required=True, type=Path, help="merge metrics JSON to write")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    d = params.distributed  # one GPU, leased like the train step's (see workflow/devices.py)
    devices.lease_then_reexec(1, d.gpu_lock_dir, d.gpu_wait_s, variant_id(args.model, args.precision, args.strategy),
                              "workflow.merge", argv)
    metrics = merge_variant(
        params, args.model, args.precision, args.strategy, args.model_dir, args.adapter, args.data, args.out
    )
    write_json_atomic(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
