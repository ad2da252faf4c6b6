"""Step `quant`: what each quantization format loses on the downloaded base, layer by layer.

For every linear layer the k-bit variants quantize (those bitsandbytes replaces when the base loads as the
nf4 variant loads it), on the real weights and with bitsandbytes' own functions:
- relative reconstruction error ||W - deq(q(W))|| / ||W|| (Frobenius, in fp32, against the stored weights) of
  int8 absmax per tensor, int8 vector-wise (one absmax per output row: what LLM.int8 stores), and NF4 in
  blocks of 64 without and with double quant. Each format quantizes W in the dtype its variant loads it in
  (int8: fp16, nf4: bf16), so a bf16 base's cast to fp16 is part of int8's error, as in training;
- bits per parameter of each format, from the tensors it stores (codes and scales; the fixed code tables
  left out): int8 8 plus one fp32 scale per row (vector-wise) or per tensor, nf4 4 + 32/64 = 4.5, with double
  quant 4 + 8/64 + 32/(64*256) ~ 4.127;
- the share of input features LLM.int8 computes in fp16 (|x| >= its threshold, 6.0, in any real token of
  a batch) on the eval split's activations into that layer, the mean over the eval batches.
Writes results/metrics/quant/<model>.json: one row per layer and the whole-model figures per format.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from workflow import cli, devices
from workflow.io import write_json_atomic
from workflow.modeling import eval_batches, load_base, load_tokenizer, load_unquantized, quant_state_bytes
from workflow.params import Params
from workflow.precision import resolve_precision

log = logging.getLogger(__name__)
FORMATS = ("int8_tensor", "int8_row", "nf4", "nf4_double_quant")


def int8_absmax(w: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor, int]:
    """LLM.int8's absmax quantization (`int8_vectorwise_quant`), per output row or over the whole tensor
    (one row): the round trip in fp32 and the stored bits (int8 codes + one fp32 scale per row)."""
    import bitsandbytes.functional as F

    rows = w if per_row else w.reshape(1, -1)
    codes, scale, _ = F.int8_vectorwise_quant(rows)
    back = F.int8_vectorwise_dequant(codes, scale).reshape(w.shape)
    return back.float(), codes, 8 * codes.numel() + 8 * scale.numel() * scale.element_size()


def nf4(w: torch.Tensor, double_quant: bool, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor, int]:
    """bitsandbytes' NF4 (`quantize_4bit`): the round trip in fp32, the packed codes (two per byte, the
    first in the high nibble) and the stored bits (codes + absmax, quantized again with double quant)."""
    import bitsandbytes.functional as F

    packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4")
    back = F.dequantize_4bit(packed, state).reshape(w.shape)
    return back.float(), packed, 8 * (packed.numel() * packed.element_size() + quant_state_bytes(state))


def nf4_codes(packed: torch.Tensor) -> list[int]:
    """The 4-bit codes of packed NF4 storage, in element order."""
    flat = packed.flatten().to(torch.uint8)
    return torch.stack([flat >> 4, flat & 0xF], 1).flatten().tolist()


def layer_formats(weight: torch.Tensor, int8_dtype: torch.dtype, nf4_dtype: torch.dtype,
                  blocksize: int) -> dict[str, dict[str, float]]:
    """Each format's squared error, squared norm and stored bits for one weight."""
    ref = weight.float()
    runs = {
        "int8_tensor": int8_absmax(weight.to(int8_dtype), per_row=False),
        "int8_row": int8_absmax(weight.to(int8_dtype), per_row=True),
        "nf4": nf4(weight.to(nf4_dtype), False, blocksize),
        "nf4_double_quant": nf4(weight.to(nf4_dtype), True, blocksize),
    }
    norm2 = float(ref.pow(2).sum())
    return {name: {"error2": float((ref - back).pow(2).sum()), "norm2": norm2, "bits": bits}
            for name, (back, _, bits) in runs.items()}


class OutlierCounter:
    """Forward pre-hooks on the named linear layers: per batch, the share of input features with
    |x| >= threshold in any real (unpadded) token, as LLM.int8 splits its matmul."""

    def __init__(self, model: torch.nn.Module, names: list[str], threshold: float):
        self.threshold, self.mask, self.shares = threshold, None, {n: [] for n in names}
        self.max_abs = dict.fromkeys(names, 0.0)
        self.handles = [model.get_submodule(n).register_forward_pre_hook(self._hook(n)) for n in names]

    def _hook(self, name: str):
        def hook(module, args):
            x = args[0]
            x = x[self.mask.to(x.device)] if self.mask is not None else x.reshape(-1, x.shape[-1])
            peak = x.abs().amax(0).float()
            self.shares[name].append(float((peak >= self.threshold).float().mean()))
            self.max_abs[name] = max(self.max_abs[name], float(peak.max()))
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def quant_report(params: Params, model: str, model_dir: Path, data_dir: Path) -> dict:
    """Per-layer errors, bits and outlier shares of the base of `model`; see the module docstring."""
    import bitsandbytes as bnb

    entry = params.models[model]
    nf4_plan, int8_plan = resolve_precision("nf4"), resolve_precision("int8")
    quantized = load_base(model_dir, nf4_plan, entry.trust_remote_code)  # which layers k-bit loads replace
    layers = {n: m.weight.quant_state.blocksize for n, m in quantized.named_modules()
              if isinstance(m, bnb.nn.Linear4bit)}
    del quantized
    if not layers:
        raise cli.StepError(f"{model_dir}: bitsandbytes quantizes no linear layer of this model")
    base = load_unquantized(model_dir, "auto", nf4_plan.device, entry.trust_remote_code).eval()  # as stored
    threshold = int8_plan.quantization.llm_int8_threshold
    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    batches = eval_batches(data_dir, tokenizer, params.evaluate.per_device_eval_batch_size,
                           params.evaluate.max_eval_rows)
    counter = OutlierCounter(base, list(layers), threshold)
    with torch.no_grad():
        for batch in batches:
            counter.mask = batch["attention_mask"].bool()
            base(input_ids=batch["input_ids"].to(nf4_plan.device),
                 attention_mask=batch["attention_mask"].to(nf4_plan.device))
    counter.remove()

    rows, totals = [], {f: {"error2": 0.0, "norm2": 0.0, "bits": 0} for f in FORMATS}
    params_total = 0
    for name, blocksize in layers.items():
        weight = base.get_submodule(name).weight.detach()
        formats = layer_formats(weight, int8_plan.load_dtype, nf4_plan.load_dtype, blocksize)
        n = weight.numel()
        params_total += n
        for f, v in formats.items():
            for k in totals[f]:
                totals[f][k] += v[k]
        rows.append({
            "layer": name, "shape": list(weight.shape), "params": n,
            "rel_error": {f: math.sqrt(v["error2"] / v["norm2"]) if v["norm2"] else 0.0 for f, v in formats.items()},
            "bits_per_param": {f: v["bits"] / n for f, v in formats.items()},
            "outlier_share": sum(counter.shares[name]) / len(counter.shares[name]),
            "max_abs_input": counter.max_abs[name],
        })
    summary = {f: {"rel_error": math.sqrt(t["error2"] / t["norm2"]) if t["norm2"] else 0.0,
                   "bits_per_param": t["bits"] / params_total} for f, t in totals.items()}
    log.info("%s: %d layers; rel. error %s", model, len(rows),
             ", ".join(f"{f} {s['rel_error']:.4f}" for f, s in summary.items()))
    return {
        "model": model,
        "stored_dtype": str(next(base.parameters()).dtype).removeprefix("torch."),
        "layers_quantized": len(rows),
        "params_quantized": params_total,
        "nf4_blocksize": sorted(set(layers.values())),
        "outlier_threshold": threshold,
        "eval_batches": len(batches),
        "eval_tokens": int(sum(int(b["attention_mask"].sum()) for b in batches)),
        "formats": summary,
        "outlier_share_mean": sum(r["outlier_share"] * r["params"] for r in rows) / params_total,
        "layers_with_outliers": sum(r["outlier_share"] > 0 for r in rows),
        "layers": rows,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("quant", __doc__)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step (eval activations)")
    p.add_argument("--out", required=True, type=Path, help="quantization report JSON to write")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    d = params.distributed  # one GPU, leased like the train step's (see workflow/devices.py)
    devices.lease_then_reexec(1, d.gpu_lock_dir, d.gpu_wait_s, f"quant-{args.model}", "workflow.quant", argv)
    write_json_atomic(args.out, quant_report(params, args.model, args.model_dir, args.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
