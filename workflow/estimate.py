"""Step estimate: peak GPU memory per rank of one variant, predicted before renting a GPU.

Loads no weights and needs no GPU. Inputs: the model's config.json (the model is built on the meta device:
exact parameter shapes, no storage), the variant's precision plan (`workflow.precision.resolve_precision`
for the GPU the run will use), the train/lora/strategy params and the data report's longest training row
(batches pad to their longest row, so the peak batch is that long). Writes
`results/metrics/estimate/<variant>.json`: the parts in bytes, the total in GB (1e9 B, the seeds' unit:
fp16 Llama-2-7b weights are 13.48e9 B, which with the 1.5 GB context give the seeds' 14.9 GB "after
loading"), the phase the peak falls in and the assumptions.

The parts (T = micro batch x padded length tokens, h hidden, i intermediate, V vocab):
- weights by storage: nf4 packs two 4-bit codes per byte, plus per 64-block absmax: fp32, or with double
  quant uint8 + an fp32 absmax per 256 blocks + an fp32 offset, plus the code tables bitsandbytes keeps per
  layer (16 + 256 fp32); LLM.int8 is one int8 per weight plus an fp32 scale per output row (its outliers
  are activation columns, handled at run time). Linear layers transformers does not quantize (lm_head,
  tied keys) and all other parameters keep the load dtype, except that `prepare_model_for_kbit_training`
  casts every fp16/bf16 parameter but `Params4bit` to fp32, and DeepSpeed casts every float parameter to
  its mixed-precision dtype.
- LoRA: r x (in + out) fp32 per target (peft's autocast_adapter_dtype), its gradients (kept across the
  accumulation steps), the optimizer's states: AdamW 2 x fp32 (paged_*: CUDA unified memory, resident on
  the GPU until memory runs short), 8-bit optimizers 1 B per state + an fp32 absmax per 256 for tensors of
  4096+ elements; the per-tensor `step` counters live on the host unless the optimizer is fused.
- activations: the tensors autograd keeps, derived op by op from the transformers-5 decoder layer
  (llama/qwen2/glm/mistral share it) with the base weights frozen, so a frozen Linear saves no input and a
  tensor is kept only where a gradient flows (`_layer_saved`); each dtype follows autocast, peft's input
  casts and bitsandbytes' (its layers return their input's dtype: fp32 after the k-bit upcast). sdpa keeps
  q, k, v, its output, the fp32 logsumexp (and, padded, a float mask); eager the fp32 softmax (heads x
  length^2) and its cast. Under autocast the fp32 lm_head weight's bf16 copy is kept too. With gradient
  checkpointing each layer's input is kept and one layer recomputed at a time; LLM.int8 keeps its inputs as
  a Function attribute, which non-reentrant checkpointing (this project's) cannot drop.
- logits and loss: transformers 5's ForCausalLMLoss upcasts the logits to fp32 for all three families; at
  the start of backward the fp32 log-probs, their gradient and the input gradient coexist: 12 x T x V bytes.
- transients, when a layer's backward is the peak: its gradients (3 x T x i at the MLP) or the dequantized
  weight a 4-/8-bit Linear materialises per matmul; recomputing, the end of its forward (LoRA's dropped
  input copies, the MLP's inputs and outputs); plus the gradient arriving from above.
- ZeRO: gradients and optimizer states (and the fp32 master copy DeepSpeed keeps) divided by the world size,
  on the host with offload_optimizer; ZeRO-3 also divides every parameter larger than
  stage3_param_persistence_threshold, and keeps the parameters it will reuse within stage3_max_reuse_distance
  gathered (about half that many elements), plus a prefetch bucket; offload_params moves the partitions to
  the host. Buckets are the generated DeepSpeed config's. Not checked against a GPU run.
- CUDA context (1.5 GB: seed 001's "initial" column reads 1.2-1.9 GB) and allocator overhead: the ONE
  fitted term, ALLOCATOR_OVERHEAD x the memory allocated during the step (fragmentation of the caching
  allocator's segments), fitted to the five seed-001 points (see the constant).
On a CPU plan there is neither: tests/test_estimate.py checks the weight, LoRA, optimizer and saved
activation parts against the real tensors there, and the peak against the real allocations.

What the seeds did not state, and how it is modelled: the estimate is of this project's run of the variant
(the plan's autocast, optimizer and k-bit preparation), not a replay of the seeds' notebooks. Seed 001's
fp16 LoRA trains fp16 weights without AMP (here fp16 autocast with fp32 LoRA: the same sizes up to the LoRA
input casts); its int8 run skips prepare_model_for_kbit_training (this project upcasts: +0.5 GB for
Llama-2-7b); its nf4 run trains without bf16 autocast and with AdamW rather than paged AdamW (the same
sizes for 4.2M LoRA parameters). Its transformers (Nov 2023) had only eager attention for Llama and
checkpointed reentrantly, so its points are reproduced with attn_implementation="eager", reentrant=True;
this project runs what transformers picks (sdpa) and non-reentrant checkpointing, which for int8 keeps
every LLM.int8 input (Llama-2-7b, bs 2 x 384: 14.5 GB predicted instead of 10.6).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from workflow import cli
from workflow.errors import ParamsError, StepError
from workflow.io import read_json, write_json_atomic
from workflow.params import ZERO_STAGES, Params, variant_id

log = logging.getLogger("workflow.estimate")

GB = 1e9
CUDA_CONTEXT_BYTES = 1_500_000_000  # seed 001, "initial" column (1.2-1.9 GB): measured there, not fitted
# THE fitted term: the caching allocator's segments hold this fraction more than the tensors allocated during
# the step (activations, logits/loss, transients). Fitted by minimax relative error to the five seed-001
# Llama-2-7b points, everything else fixed: errors then +4.1 / +5.5 / +0.8 / -3.0 / -5.5 % (0: up to -16 %).
ALLOCATOR_OVERHEAD = 0.74
MODELLED = ("llama", "mistral", "qwen2", "glm")  # decoder layers whose forward `_layer_saved` follows
SITES = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
         "gate_proj": "mlp_in", "up_proj": "mlp_in", "gate_up_proj": "mlp_in", "down_proj": "mlp_out"}
NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' 4-bit block size and the double-quant block of absmax values
# Optimizer state bytes per trainable element (8-bit ones: see _optimizer_bytes). Unknown names are refused.
ADAM32 = ("adamw_torch", "adamw_torch_fused", "paged_adamw_32bit")
ADAM8 = ("adamw_bnb_8bit", "adamw_8bit", "paged_adamw_8bit")


@dataclass(frozen=True)
class Setup:
    """What an estimate depends on besides the model config and the precision plan."""

    batch_size: int
    accumulation: int
    checkpointing: bool
    seq_len: int  # padded length of the longest batch
    lora_r: int
    lora_dropout: float
    lora_targets: str | tuple[str, ...]
    strategy: str = "single"
    world_size: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    attn_implementation: str | None = None  # None: what transformers picks for this config (sdpa)
    reentrant: bool = False  # checkpointing kind: workflow/trainer.py passes use_reentrant=False
    packing: bool = False  # train.packing: the batch's examples in one row (workflow.batching)


@dataclass(frozen=True)
class _Numerics:
    """The dtypes one training step runs in."""

    residual: object  # hidden states between layers: the embedding weight's dtype
    autocast: object  # autocast dtype, or None
    lora: object  # LoRA weight dtype
    plain: object  # weight dtype of Linear layers left unquantized (lm_head)
    quant: str | None  # None | "int8" | "nf4"
    compute: object  # nf4 compute dtype
    device: str


def model_config(source):
    """A transformers config from a model dir, a config.json dict, or a config object."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    if isinstance(source, dict):
        d = dict(source)
        if "model_type" not in d:
            raise StepError("config.json has no model_type; point --model-dir at a transformers model")
        return AutoConfig.for_model(d.pop("model_type"), **d)
    path = Path(source)
    if not (path / "config.json").is_file():
        raise StepError(f"{path}: no config.json; run the download step for this model first")
    return AutoConfig.from_pretrained(str(path))


def batch_length(report: dict | None, max_length: int, where: str = "the data report") -> int:
    """Padded length of the longest training batch: the data report's longest train row (<= max_length)."""
    if report is None:
        return max_length
    if report.get("max_length") != max_length:
        raise StepError(f"{where} was written for max_length {report.get('max_length')}, params.yaml says "
                        f"data.max_length {max_length}; rerun the preprocess step")
    try:
        return min(int(report["token_length"]["train"]["max"]), max_length)
    except (KeyError, TypeError, ValueError):
        raise StepError(f"{where} has no token_length.train.max; rerun the preprocess step") from None


def _nbytes(dtype) -> int:
    return dtype.itemsize


def _nf4_bytes(n: int, storage, double_quant: bool) -> tuple[int, int]:
    """(packed weight bytes, constant bytes) of one NF4 weight of n elements, as bitsandbytes stores it."""
    s = _nbytes(storage)
    packed = (n + 1) // (2 * s) * s  # two 4-bit codes per byte, in elements of the storage dtype
    blocks = -(-n // NF4_BLOCK)
    code = 16 * 4  # the NF4 code table, fp32, one per layer
    if not double_quant:
        return packed, blocks * 4 + code
    nested = -(-blocks // NESTED_BLOCK)
    return packed, blocks + nested * 4 + 4 + code + 256 * 4  # uint8 absmax, fp32 absmax2, offset, dynamic map


def _optimizer_bytes(optim: str, shapes: list[tuple[int, ...]]) -> tuple[int, int]:
    """(state bytes, step-counter bytes) of `optim` over trainable tensors of `shapes` (fp32 parameters).
    torch's optimizers count steps in an fp32 tensor per parameter, bitsandbytes' and Adafactor in an int."""
    numel = [math.prod(s) for s in shapes]
    steps = 4 * len(shapes) if optim in ("adamw_torch", "adamw_torch_fused") else 0
    if optim in ADAM32:
        return 8 * sum(numel), steps
    if optim in ADAM8:  # 1 B per state + fp32 absmax per 256-block, tensors under 4096 elements stay 32-bit;
        eight = [n for n in numel if n >= 4096]  # plus the two 256-entry quantization maps, shared
        return (sum(2 * n + 2 * 4 * -(-n // 256) for n in eight) + 8 * (sum(numel) - sum(eight))
                + (2 * 256 * 4 if eight else 0)), steps
    if optim == "adafactor":  # factored second moment (a row and a column vector per matrix), an RMS
        return 4 * sum((s[0] + s[1] if len(s) == 2 else math.prod(s)) + 1 for s in shapes), steps  # scalar
    if optim == "sgd":  # no momentum by default: no state at all
        return 0, 0
    raise StepError(f"train.optim '{optim}': the estimate does not know its state size; use one of "
                    f"{', '.join(ADAM32 + ADAM8)}, adafactor or sgd")


def _numerics(plan, zero: bool) -> _Numerics:
    import torch

    amp = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(plan.amp)
    floats = torch.float32 if plan.kbit else plan.load_dtype  # prepare_model_for_kbit_training upcasts
    lora, autocast = torch.float32, amp
    if zero and amp is not None:  # DeepSpeed casts every float parameter to its dtype and runs no autocast
        floats = lora = amp
        autocast = None
    qc = plan.quantization
    quant = None if qc is None else ("int8" if qc.load_in_8bit else "nf4")
    compute = qc.bnb_4bit_compute_dtype if quant == "nf4" else None
    return _Numerics(floats, autocast, lora, floats, quant, compute, plan.device)


def _promote(a, b):
    import torch

    return torch.promote_types(a, b)


def _lora_input(n: _Numerics, x, dropout: float) -> tuple[object, bool, int, int]:
    """(dtype lora_A's matmul saves, whether that tensor is its own copy, dropout bytes per element, bytes
    per element of the copies made on the way and dropped: peft's cast, the dropout output)."""
    made = []  # dtypes of the copies, in order; the last one is what lora_A saves
    # peft casts to the LoRA dtype; its bitsandbytes layers not under autocast, which they test with
    # torch.is_autocast_enabled(), i.e. CUDA autocast only
    if (n.quant is None or n.autocast is None or n.device != "cuda") and x != n.lora:
        made.append(n.lora)
    d, mask = made[-1] if made else x, 0
    if dropout > 0:  # CUDA's fused dropout saves a bool mask; the CPU one the scaled noise in the input dtype
        made.append(d)
        mask = 1 if n.device == "cuda" else _nbytes(d)
    if n.autocast is not None and d != n.autocast:
        made.append(n.autocast)
        d = n.autocast
    return d, bool(made), mask, sum(_nbytes(m) for m in made[:-1])


def _site(n: _Numerics, t: int, width: int, x, outs: list[int], x_req: bool, int8: bool, dropout: float,
          r: int, saved_already: bool = False) -> tuple[int, int, int, int]:
    """What the Linear layers reading one input of `width` (e.g. q/k/v) keep for backward, as (bytes saved
    through autograd, bytes bitsandbytes keeps as Function attributes, bytes counted in both, bytes of the
    copies LoRA makes and drops while one target runs).

    LoRA's lora_A saves its (cast) input and lora_B lora_A's output; a frozen plain or 4-bit Linear saves
    nothing; LLM.int8 keeps its input as `ctx.A` when it needs a gradient, out of gradient checkpointing's
    reach. `outs`: output widths of the LoRA targets; `saved_already`: the input is a tensor some earlier op
    saved (sdpa's output)."""
    size = t * width * _nbytes(x)
    hooked, shared, passing = 0, False, 0
    if outs:
        d, fresh, mask, dropped = _lora_input(n, x, dropout)
        hooked = len(outs) * t * width * ((_nbytes(d) if fresh else 0) + (mask if x_req else 0))
        shared, passing = not fresh, t * width * dropped
        c = n.autocast or n.lora
        hooked += len(outs) * t * r * _nbytes(c)  # lora_A's output
        if n.autocast is not None and n.autocast != n.lora:  # autocast's LoRA weight copies the matmuls keep
            hooked += (sum(outs) + (len(outs) * width if x_req else 0)) * r * _nbytes(c)
    hooked += size if shared and not saved_already else 0
    ctx = size if int8 and x_req else 0
    return hooked, ctx, ctx if (shared or saved_already) else 0, passing


def _layer_saved(n: _Numerics, g: "_Geometry", b: int, length: int, attn: str, lora: set[str], int8: bool,
                 dropout: float, r: int, grad_in: bool, packed: bool = False) -> tuple[int, int, int, int, bool, int]:
    """What one decoder layer keeps for backward: (bytes saved through autograd, bytes kept as bitsandbytes
    Function attributes, bytes counted in both, of the saved the layer input itself, whether the layer output
    needs a gradient, the largest copy LoRA makes and drops). Follows the transformers-5 decoder layer:
    RMSNorm (fp32 copy of its input + rsqrt), q/k/v, RoPE, attention, o_proj, residual, RMSNorm, gate/up,
    SiLU x up, down, residual; a tensor is saved only where a gradient flows (`grad_in`: the layer input
    needs one; `lora`: the LoRA targets' leaf names). `packed`: b examples of `length` in one row, attended
    one by one (workflow.batching's per-example sdpa)."""
    import torch

    t, f32 = b * length, torch.float32
    masked = b > 1 and not packed  # a padded batch carries an attention mask
    q_dim, kv_dim = g.heads * g.head_dim, g.kv_heads * g.head_dim
    widths = {"q_proj": q_dim, "k_proj": kv_dim, "v_proj": kv_dim, "o_proj": g.hidden, "gate_proj": g.inter,
              "up_proj": g.inter, "gate_up_proj": 2 * g.inter, "down_proj": g.hidden}
    outs = lambda *names: [widths[k] for k in names if k in lora]  # noqa: E731
    lin = (lambda x: x) if n.quant else (lambda x: n.autocast or n.plain)  # bitsandbytes returns the input dtype
    acc = [0, 0, 0, 0]

    def site(*args, **kwargs):
        *summed, passing = _site(n, t, *args, int8=int8, dropout=dropout, r=r, **kwargs)
        acc[:3] = [a + v for a, v in zip(acc, summed)]
        acc[3] = max(acc[3], passing)

    norm = t * g.hidden * 4 + t * 4  # RMSNorm's fp32 input (its copy, or the input itself) and rsqrt
    saved = norm if grad_in else 0
    own_input = t * g.hidden * 4 if grad_in and n.residual == f32 else 0
    x1 = _promote(n.residual, n.plain)  # norm weight (the float params' dtype) x normed input
    site(g.hidden, x1, outs("q_proj", "k_proj", "v_proj"), grad_in)
    q_req, k_req, v_req = (grad_in or k in lora for k in ("q_proj", "k_proj", "v_proj"))
    dq = lin(x1)
    de = _promote(dq, n.residual)  # RoPE multiplies by cos/sin in the hidden dtype
    kvs = q_dim if g.kv_heads < g.heads and (attn == "eager" or masked) else kv_dim  # repeat_kv copies
    probs = b * g.heads * length * length
    attn_req, qk_req = q_req or k_req or v_req, q_req or k_req
    out = n.autocast or de
    if attn_req and attn == "eager":
        m = _nbytes(n.autocast or de)
        saved += (t * q_dim * m if k_req else 0) + (t * kvs * m if q_req else 0)  # q and k of QK^T
        saved += probs * 4 if qk_req else 0  # softmax, in fp32
        cast = de != f32 or n.autocast is not None
        if v_req and (cast or not qk_req):  # the probabilities the second matmul keeps (a copy if cast)
            saved += probs * _nbytes(n.autocast or de)
        saved += t * kvs * _nbytes(n.autocast or dq) if qk_req else 0  # v
    elif attn_req:  # sdpa: q, k, v, the output and the fp32 logsumexp
        a = _nbytes(out)
        saved += t * (2 * q_dim + 2 * kvs) * a + b * g.heads * length * 4
        if masked:  # sdpa turns the boolean mask into a float one per layer and keeps it
            saved += probs // g.heads * a
    if g.interleaved and qk_req:  # GLM: cos/sin repeated per layer, kept by the RoPE products
        saved += 2 * (t if packed else length) * g.rotary * _nbytes(n.residual)
    # o_proj's input: eager's transposed copy; sdpa's output itself (its kernels write it token-major)
    # (per-example sdpa: their concatenation, a copy)
    site(q_dim, out, outs("o_proj"), attn_req, saved_already=attn_req and attn != "eager" and not packed)
    mid_req = grad_in or attn_req or "o_proj" in lora
    saved += norm if mid_req else 0
    site(g.hidden, x1, outs("gate_proj", "up_proj", "gate_up_proj"), mid_req)
    gate_req = mid_req or bool({"gate_proj", "gate_up_proj"} & lora)
    up_req = mid_req or bool({"up_proj", "gate_up_proj"} & lora)
    e = t * g.inter * _nbytes(lin(x1))
    saved += (2 * e if gate_req else 0) + (e if up_req else 0)  # SiLU input and up; SiLU output (for up)
    site(g.inter, lin(x1), outs("down_proj"), gate_req or up_req)
    out_req = mid_req or gate_req or up_req or "down_proj" in lora
    return saved + acc[0], acc[1], acc[2], own_input, out_req, acc[3]


@dataclass(frozen=True)
class _Geometry:
    hidden: int
    inter: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rotary: int  # rotated dims per head
    interleaved: bool  # GLM repeats cos/sin per layer


def _geometry(config) -> _Geometry:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotary = int(head_dim * getattr(config, "partial_rotary_factor", 1.0))
    return _Geometry(config.hidden_size, config.intermediate_size, heads,
                     getattr(config, "num_key_value_heads", None) or heads, head_dim, config.vocab_size, rotary,
                     config.model_type == "glm")


@dataclass(frozen=True)
class _Inventory:
    """What the meta-device model says: parameters, buffers, layers, LoRA layers."""

    attn: str  # attention implementation transformers resolved
    params: tuple[tuple[str, tuple[int, ...], bool, bool], ...]  # name, shape, bnb-quantized, loaded in fp32
    buffer_bytes: int
    layers: tuple[frozenset[str], ...]  # per decoder layer (in order): leaf names of its LoRA targets
    lora_layers: int
    trainable: tuple[tuple[int, ...], ...]  # shapes of the LoRA tensors


@functools.lru_cache(maxsize=32)
def _inventory(config_json: str, attn: str | None, targets, r: int, quant: str | None, skip, fp16: bool) -> _Inventory:
    """The model built on the meta device (shapes, no storage): which Linear layers transformers' bnb
    quantizer converts (its own skip rule), which peft wraps (its own target rule). Cached: `fits` re-asks."""
    import torch
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM
    from transformers.quantizers.base import HfQuantizer
    from transformers.quantizers.quantizers_utils import should_convert_module

    config = model_config(json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, **({"attn_implementation": attn} if attn else {}))
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    quantized = set()
    if quant is not None:
        not_converted = HfQuantizer.get_modules_to_not_convert(model, list(skip) if skip else None,
                                                               model._keep_in_fp32_modules)
        quantized = {name for name in linears if should_convert_module(name, not_converted)}
    keep = set(getattr(model, "_keep_in_fp32_modules_strict", None) or [])  # fp32 whatever the dtype
    if fp16:
        keep |= set(model._keep_in_fp32_modules or [])  # fp32 when loading fp16
    params = tuple((name, tuple(p.shape), name.rsplit(".", 1)[0] in quantized and name.endswith(".weight"),
                    bool(keep & set(name.split(".")))) for name, p in model.named_parameters())  # tied: once
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    resolved = model.config._attn_implementation
    targets = list(targets) if isinstance(targets, tuple) else targets
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=r, target_modules=targets))
    wrapped = {name.removeprefix("base_model.model.") for name, m in peft_model.named_modules()
               if isinstance(m, LoraLayer)}
    layers: dict[str, set[str]] = {}
    for name in linears:
        found = re.match(r"(.*\.layers\.\d+)\.(.*\.)?(\w+)$", name)
        if not found:
            continue
        if found.group(3) not in SITES:
            raise StepError(f"{config.model_type}: the estimate does not model the layer '{name}'; supported "
                            f"model types: {', '.join(MODELLED)}")
        layers.setdefault(found.group(1), set()).update({found.group(3)} if name in wrapped else set())
    trainable = tuple(tuple(p.shape) for p in peft_model.parameters() if p.requires_grad)
    return _Inventory(resolved, params, buffer_bytes, tuple(frozenset(v) for v in layers.values()), len(wrapped),
                      trainable)


def _ds_zero(setup: Setup, plan, hidden: int) -> dict:
    """The ZeRO section DeepSpeed runs with: the config workflow.distributed generates, resolved with
    DeepSpeed's own defaults (stage3_max_reuse_distance, ...)."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from workflow.distributed import deepspeed_config
    from workflow.params import Strategy, Train

    settings = Strategy(gpus=setup.world_size, offload_optimizer=setup.offload_optimizer,
                        offload_params=setup.offload_params)
    targs = Train.model_construct(per_device_train_batch_size=setup.batch_size,
                                  gradient_accumulation_steps=setup.accumulation, max_grad_norm=1.0)
    with tempfile.TemporaryDirectory() as tmp:  # deepspeed_config reads the hidden size from config.json
        (Path(tmp) / "config.json").write_text(json.dumps({"hidden_size": hidden}), encoding="utf-8")
        ds = deepspeed_config(setup.strategy, settings, targs, plan.amp, setup.world_size, Path(tmp), on_gpu=True)
    return DeepSpeedZeroConfig(**ds["zero_optimization"]).model_dump()


def _weights(inv: _Inventory, n: _Numerics, plan, zero: int, world: int, persist: int) -> tuple[dict, int, int]:
    """Weight parts per rank by storage, the bytes of the partitioned parameters when gathered (ZeRO-3), and
    the largest quantized weight's element count (dequantized per matmul)."""
    import torch

    qc = plan.quantization
    held = lambda numel: -(-numel // world) if zero == 3 and numel > persist else numel  # noqa: E731
    w = {"weights_quantized": 0, "weights_quant_constants": 0, "weights_unquantized": 0,
         "buffers": inv.buffer_bytes}
    gathered = largest = 0
    for _, shape, quantized, fp32 in inv.params:
        numel = math.prod(shape)
        if quantized and n.quant == "nf4":
            storage = qc.bnb_4bit_quant_storage
            packed, const = _nf4_bytes(numel, storage, qc.bnb_4bit_use_double_quant)
            mine = held(packed // _nbytes(storage)) * _nbytes(storage)
            w["weights_quantized"] += mine
            w["weights_quant_constants"] += const  # quant_state: no parameter, so never partitioned
        elif quantized:  # LLM.int8: int8 weight + an fp32 absmax (SCB) per output row
            packed = mine = numel
            w["weights_quantized"] += numel
            w["weights_quant_constants"] += shape[0] * 4
        else:
            dtype = torch.float32 if fp32 and n.residual == plan.load_dtype else n.residual  # nobody recast it
            packed, mine = numel * _nbytes(dtype), held(numel) * _nbytes(dtype)
            w["weights_unquantized"] += mine
        largest = max(largest, numel if quantized else 0)
        gathered += packed if mine < packed else 0
    return w, gathered, largest


def estimate(config, plan, setup: Setup) -> dict:
    """Peak GPU memory per rank of training `config` with `plan` and `setup`: parts in bytes (summing to
    the total), host-side parts, the total and after-loading GB, the phase of the peak, the assumptions."""
    config = model_config(config)
    zero = ZERO_STAGES.get(setup.strategy, 0)
    world = setup.world_size if zero else 1
    n = _numerics(plan, zero > 0)
    g = _geometry(config)
    qc = plan.quantization
    skip = tuple(qc.llm_int8_skip_modules) if qc is not None and qc.llm_int8_skip_modules else None
    inv = _inventory(json.dumps(config.to_dict(), sort_keys=True, default=str), setup.attn_implementation,
                     setup.lora_targets, setup.lora_r, n.quant, skip, str(plan.load_dtype) == "torch.float16")
    attn = inv.attn
    zcfg = _ds_zero(setup, plan, g.hidden) if zero else {}
    w, gathered, largest = _weights(inv, n, plan, zero, world, zcfg.get("param_persistence_threshold", 0))

    # LoRA parameters, gradients, optimizer states (ZeRO: partitioned; offload: on the host)
    lora_numel = sum(math.prod(s) for s in inv.trainable)
    lb = _nbytes(n.lora)
    states, steps = _optimizer_bytes(plan.optim, list(inv.trainable))
    host = {}
    if zero:
        part = lambda x: -(-x // world)  # noqa: E731
        persist = zcfg["param_persistence_threshold"]
        lora = {"lora_params": sum(part(math.prod(s)) if zero == 3 and math.prod(s) > persist else math.prod(s)
                                   for s in inv.trainable) * lb,
                "lora_grads": part(lora_numel) * lb,  # the reduced gradient partition
                "master_weights": 4 * part(lora_numel),  # DeepSpeed's fp32 partition of the trainable weights
                "optimizer_states": part(states),
                # gradient buckets (two with overlap_comm), and ZeRO-3's gathered parameters: those reused
                # within stage3_max_reuse_distance elements stay (about half that many), plus a prefetch bucket
                "zero_buffers": int(zcfg["reduce_bucket_size"]) * lb * (2 if zcfg["overlap_comm"] else 1)}
        if zero == 3:
            total_numel = sum(math.prod(s) for _, s, _, _ in inv.params)
            share = min(1.0, zcfg["max_reuse_distance"] / 2 / max(total_numel, 1))
            lora["zero_buffers"] += int(share * gathered) + int(zcfg["prefetch_bucket_size"]) * _nbytes(n.residual)
            if setup.offload_params:
                host["weight_partitions"] = w["weights_quantized"] + w["weights_unquantized"]
                w["weights_quantized"] = w["weights_unquantized"] = 0
        if setup.offload_optimizer:
            for key in ("lora_grads", "master_weights", "optimizer_states"):
                host[key], lora[key] = lora[key], 0
        steps = part(steps)
    else:
        lora = {"lora_params": lora_numel * lb, "lora_grads": lora_numel * lb,  # kept across accumulation
                "master_weights": 0, "optimizer_states": states, "zero_buffers": 0}
    if "fused" in plan.optim:  # a fused AdamW keeps its step counters on the GPU, the others on the host
        lora["optimizer_states"] += steps
    else:
        host["optimizer_step_counters"] = steps

    # activations, logits and loss, transients
    b, length = setup.batch_size, setup.seq_len
    if setup.packing and attn == "eager":  # one row of the batch's examples under one block-diagonal mask
        b, length = 1, b * length
    packed = setup.packing and b > 1
    t = b * length
    int8 = n.quant == "int8"
    saved_layers = ctx_layers = recompute = dropped = 0
    grad = setup.checkpointing  # enable_input_require_grads: only with checkpointing (workflow.trainer)
    for lora_here in inv.layers:
        args = (n, g, b, length, attn, set(lora_here), int8, setup.lora_dropout, setup.lora_r)
        hooked, ctx, both, _, grad, _ = _layer_saved(*args, grad, packed)
        again, _, _, own, _, passing = _layer_saved(*args, True, packed)
        saved_layers += hooked + ctx - both
        ctx_layers += ctx
        recompute = max(recompute, again - own)  # recomputed in backward; its input is the checkpoint's
        dropped = max(dropped, passing)
    layers = len(inv.layers)
    # kept until the layers' backward: cos/sin of one position row, the mask (a checkpoint input)
    rope = 2 * (t if setup.packing else length) * g.rotary * _nbytes(n.residual)
    if setup.checkpointing and ((b > 1 and not packed) or attn == "eager"):
        rope += b * length * length * (1 if attn != "eager" else _nbytes(n.residual))
    head = t * g.hidden * 4 + t * 4  # the final norm; freed by the head's backward, before the layers'
    if n.autocast is not None and n.plain != n.autocast:  # autocast's copy of the fp32 lm_head weight, kept
        head += g.vocab * g.hidden * _nbytes(n.autocast)  # for its input's gradient
    loss = 12 * t * g.vocab  # fp32 log-probs + their gradient + the input gradient, at the start of backward
    dg = n.residual if n.quant else (n.autocast or n.plain)  # the MLP's dtype
    dequant = largest * _nbytes(n.compute if n.quant == "nf4" else n.residual)
    # one layer's backward: its gradients (3 x T x i at the MLP) or a dequantized weight; recomputing, the end
    # of its forward: the copies LoRA drops, and the residual, the normed input, SiLU(gate) x up and down's
    # output, which the forward holds there; plus, both, the gradient arriving from above
    backward = max(3 * t * g.inter * _nbytes(dg), t * (g.inter + g.hidden) * _nbytes(dg) + dequant)
    forward = dropped + t * g.hidden * (2 * _nbytes(n.residual) + _nbytes(dg)) + t * g.inter * _nbytes(dg)
    transient = max(backward, forward if setup.checkpointing else 0) + t * g.hidden * _nbytes(n.residual)
    if setup.checkpointing:
        # each layer's input, and (non-reentrant) every LLM.int8 input: its ctx.A escapes the checkpoint
        kept = layers * t * g.hidden * _nbytes(n.residual) + rope + (0 if setup.reentrant else ctx_layers)
        phases = {"loss": (kept + head, loss, 0), "layer backward": (kept + recompute, 0, transient)}
    else:
        kept = saved_layers + rope
        phases = {"loss": (kept + head, loss, 0), "layer backward": (kept, 0, transient)}
    phase = max(phases, key=lambda k: sum(phases[k]))
    dyn = dict(zip(("activations", "logits_loss", "transients"), phases[phase]))

    parts = {**w, **lora, **dyn}
    on_gpu = plan.device == "cuda"
    parts["cuda_context"] = CUDA_CONTEXT_BYTES if on_gpu else 0
    parts["allocator_overhead"] = int(ALLOCATOR_OVERHEAD * sum(dyn.values())) if on_gpu else 0
    total = sum(parts.values())
    assumptions = [f"attention {attn}; batch of {setup.batch_size} padded to {setup.seq_len} tokens (the "
                   "longest training row)" + ("; packed into one row" if setup.packing else "")]
    if config.model_type not in MODELLED:
        assumptions.append(f"model_type {config.model_type}: decoder layer modelled as Llama's (not checked)")
    if int8:
        assumptions.append("LLM.int8 outlier columns (fp16, tokens x outlier features per layer) not counted")
    if plan.optim.startswith("paged"):
        assumptions.append("paged optimizer states counted on the GPU (resident until memory runs short)")
    if zero:
        assumptions.append(f"ZeRO-{zero} over {world} ranks: from DeepSpeed's settings, not checked on GPUs")
    return {
        "parts_bytes": parts,
        "host_bytes": host,
        "total_bytes": total,
        "total_gb": round(total / GB, 3),
        "after_loading_gb": round((parts["cuda_context"] + sum(w.values())) / GB, 3),
        "peak_phase": phase,
        "details": {
            "saved_bytes": phases["loss"][0] + 4 * t * g.vocab,  # what autograd holds when forward ends
            "layers": layers, "lora_layers": inv.lora_layers, "trainable_params": lora_numel,
            "phases_bytes": {k: sum(v) for k, v in phases.items()},
        },
        "assumptions": assumptions,
        "setup": asdict(setup),
        "plan": plan.describe(),
    }


def variant_setup(params: Params, precision: str, strategy: str, seq_len: int) -> Setup:
    """The Setup of one variant from params.yaml (its `train` with the precision's overrides, `lora`,
    `strategies.<strategy>`)."""
    targs = params.variant_train(precision)
    settings = params.strategy(strategy)
    nodes = settings.nodes if isinstance(settings.nodes, int) else 1  # "slurm": not known before the job
    targets = params.lora.target_modules
    return Setup(
        batch_size=targs.per_device_train_batch_size, accumulation=targs.gradient_accumulation_steps,
        checkpointing=targs.gradient_checkpointing, seq_len=seq_len, lora_r=params.lora.r,
        lora_dropout=params.lora.dropout, lora_targets=targets if isinstance(targets, str) else tuple(targets),
        strategy=strategy, world_size=settings.gpus * nodes if strategy in ZERO_STAGES else 1,
        offload_optimizer=settings.offload_optimizer, offload_params=settings.offload_params,
        packing=targs.packing,
    )


def estimate_variant(params: Params, model: str, precision: str, strategy: str, config,
                     data_report: dict | None = None, device: str = "cuda", **setup_changes) -> dict:
    """`estimate` for one variant of params.yaml, planned for `device` (cuda: the GPU the run needs), with
    what `fits` needs to re-estimate alternatives. `setup_changes`: Setup fields that params.yaml does not
    decide (attn_implementation, reentrant), e.g. to model another code base's run."""
    from workflow.precision import resolve_precision

    config = model_config(config)
    seq_len = batch_length(data_report, params.data.max_length)
    setup = replace(variant_setup(params, precision, strategy, seq_len), **setup_changes)
    targs = params.variant_train(precision)
    plan = resolve_precision(precision, device, optim=targs.optim, adam_epsilon=targs.adam_epsilon,
                             strategy=strategy, quant_storage=params.strategy(strategy).nf4_quant_storage)
    out = {"variant": variant_id(model, precision, strategy), "model": model, "precision": precision,
           "strategy": strategy, **estimate(config, plan, setup)}
    out["inputs"] = {"config": config.to_dict(), "device": device}  # for `fits` to re-estimate alternatives
    return out


# Parts in the order memory fills up (fixed before training, then what the step allocates).
FILL_ORDER = ("cuda_context", "weights_quantized", "weights_quant_constants", "weights_unquantized", "buffers",
              "lora_params", "lora_grads", "master_weights", "optimizer_states", "zero_buffers", "activations",
              "logits_loss", "transients", "allocator_overhead")
SMALLER = {"fp16": ("int8", "nf4"), "bf16": ("int8", "nf4"), "int8": ("nf4",), "nf4": ()}  # by weight bytes


def _alternatives(est: dict, params: Params):
    """(what to change, its estimate) for the changes `fits` tries, cheapest first: gradient checkpointing
    (slower, same training), a smaller micro batch with more accumulation (slower, same effective batch),
    both, a smaller precision (other numerics), then ZeRO over more GPUs (more hardware)."""
    from workflow.precision import resolve_precision

    setup, inputs = Setup(**{**est["setup"], "lora_targets": _targets(est["setup"]["lora_targets"])}), est["inputs"]

    def run(precision: str, **changes) -> dict:
        s = replace(setup, **changes)
        plan = resolve_precision(precision, inputs["device"], optim=params.variant_train(precision).optim,
                                 strategy=s.strategy, quant_storage=params.strategy(s.strategy).nf4_quant_storage)
        return estimate(inputs["config"], plan, s)

    p, b, acc = est["precision"], setup.batch_size, setup.accumulation
    sizes = sorted({max(1, b >> k) for k in range(1, b.bit_length() + 1)} - {b}, reverse=True)  # halvings
    smaller = [(bs, -(-b * acc // bs)) for bs in sizes]  # accumulation keeps the effective batch (or more)
    if not setup.checkpointing:
        yield "train.gradient_checkpointing: true", lambda: run(p, checkpointing=True)
    for bs, a in smaller:
        yield (f"train.per_device_train_batch_size: {bs} (gradient_accumulation_steps: {a})",
               lambda bs=bs, a=a: run(p, batch_size=bs, accumulation=a))
    if not setup.checkpointing:
        for bs, a in smaller:
            yield (f"train.gradient_checkpointing: true and per_device_train_batch_size: {bs} "
                   f"(gradient_accumulation_steps: {a})",
                   lambda bs=bs, a=a: run(p, checkpointing=True, batch_size=bs, accumulation=a))
    for q in SMALLER[p]:
        if not (q == "int8" and setup.strategy == "zero3"):
            yield f"precision {q}", lambda q=q: run(q)
    for strategy in ("zero2", "zero3"):
        if strategy == setup.strategy or (p == "int8" and strategy == "zero3"):
            continue
        s = params.strategy(strategy)
        world = s.gpus * (s.nodes if isinstance(s.nodes, int) else 1)
        if world < 2:
            continue
        yield (f"strategy {strategy} ({world} GPUs)",
               lambda strategy=strategy, world=world: run(p, strategy=strategy, world_size=world))
        yield (f"strategy {strategy} ({world} GPUs) with offload_optimizer: true",
               lambda strategy=strategy, world=world: run(p, strategy=strategy, world_size=world,
                                                          offload_optimizer=True))


def _targets(value):
    return tuple(value) if isinstance(value, list) else value


def fits(estimate: dict, gpu_memory_gb: float, params: Params | None = None) -> str | None:
    """None when `estimate` (estimate_variant's, or its JSON file's) fits in `gpu_memory_gb` per GPU; else
    one line: the total, the parts that no longer fit (filling memory in FILL_ORDER), and, given `params`
    (the other precisions' and strategies' settings), the cheapest change that would fit, found by
    re-estimating the alternatives (`_alternatives`)."""
    budget = gpu_memory_gb * GB
    if estimate["total_bytes"] <= budget:
        return None
    parts, used, over = estimate["parts_bytes"], 0, []
    for name in FILL_ORDER:
        used += parts.get(name, 0)
        if used > budget and parts.get(name, 0) >= 0.01 * GB:  # the ones that matter
            over.append(f"{name} {parts[name] / GB:.2f}")
    head = (f"{estimate.get('variant', 'this variant')}: predicted {estimate['total_gb']:.1f} GB per GPU, "
            f"gpu_memory_gb is {gpu_memory_gb:g}; what does not fit: {', '.join(over)} GB")
    if params is None or "inputs" not in estimate:  # a bare `estimate()`: nothing to re-estimate from
        return head
    for change, alternative in _alternatives(estimate, params):
        alt = alternative()
        if alt["total_bytes"] <= budget:
            return f"{head}; cheapest change that fits: {change} ({alt['total_gb']:.1f} GB)"
    return f"{head}; none of checkpointing, a smaller batch, a smaller precision or ZeRO fits: use a larger GPU"


def budget_refusal(params: Params, model: str, precision: str, strategy: str, model_dir, seq_len: int) -> str | None:
    """The train step's guard, before it loads weights: `fits` for the variant at the longest tokenized train
    row (what the estimate step reads from the data report), planned for the GPU as the estimate step plans
    it. None when it fits or distributed.gpu_memory_gb is null."""
    limit = params.distributed.gpu_memory_gb
    if limit is None:
        return None
    est = estimate_variant(params, model, precision, strategy, model_dir,
                           seq_len=min(seq_len, params.data.max_length))
    verdict = fits(est, limit, params)
    return verdict and f"distributed.gpu_memory_gb: {verdict}"


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("estimate", __doc__, variant=True)
    p.add_argument("--model-dir", type=Path, help="output of the download step (default results/models/<model>)")
    p.add_argument("--data-report", type=Path,
                   help="the preprocess step's data report (default results/metrics/data/<model>.json)")
    p.add_argument("--out", type=Path, help="estimate JSON (default results/metrics/estimate/<variant>.json)")
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"),
                   help="plan for this device (default cuda: what the run needs on a GPU)")
    p.add_argument("--attn-implementation", help="attention to assume (default: what transformers picks)")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    vid = variant_id(args.model, args.precision, args.strategy)
    model_dir = args.model_dir or Path("results/models") / args.model
    report_path = args.data_report or Path("results/metrics/data") / f"{args.model}.json"
    report = read_json(report_path) if report_path.is_file() else None
    if report is None:
        raise StepError(f"{report_path}: no data report; run the preprocess step for {args.model} first")
    try:
        est = estimate_variant(params, args.model, args.precision, args.strategy, model_dir, report,
                               args.device, attn_implementation=args.attn_implementation)
    except StepError as exc:
        raise StepError(f"{vid}: {exc}") from None
    limit = params.distributed.gpu_memory_gb
    verdict = fits(est, limit, params) if limit is not None and args.device == "cuda" else None
    est["gpu_memory_gb"], est["fits"] = limit, (verdict is None) if limit is not None else None
    write_json_atomic(args.out or Path("results/metrics/estimate") / f"{vid}.json", est)
    log.info("%s: %.2f GB per GPU predicted (%s)", vid, est["total_gb"], est["peak_phase"])
    if verdict:
        raise ParamsError(f"{args.params}: distributed.gpu_memory_gb: {verdict}")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
