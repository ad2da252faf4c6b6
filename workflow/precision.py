"""The one place that decides what a precision name means.

`resolve_precision("nf4", device, strategy=...)` returns the load dtype, compute dtype, quantization config,
optimizer, mixed-precision mode and device map for that precision on that device under that strategy.
Nothing else in the project chooses any of these. What cannot work is refused here (or, for whole-matrix
combinations, by `workflow.params.refusal` before any compute), never silently replaced.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import BitsAndBytesConfig

from workflow import devices
from workflow.errors import StepError

@dataclass(frozen=True)
class PrecisionPlan:
    """How to load and train a model in one precision on one device."""

    name: str
    device: str  # "cpu" or "cuda"
    load_dtype: torch.dtype  # dtype of the weights that are not quantized (and of the merge target)
    compute_dtype: torch.dtype  # dtype the matmuls run in
    quantization: BitsAndBytesConfig | None
    amp: str  # mixed precision for TrainingArguments: "none" | "fp16" | "bf16"
    optim: str  # TrainingArguments.optim
    adam_epsilon: float
    kbit: bool  # quantized base: needs prepare_model_for_kbit_training
    strategy: str = "single"
    local_rank: int = 0  # this process's device index under a multi-process strategy

    @property
    def device_map(self) -> dict[str, object] | None:
        """bitsandbytes layers are placed at load time; plain models are moved by the Trainer. ZeRO-3 places
        (partitions) every weight itself, so a quantized model gets no device_map there."""
        if self.quantization is None or self.strategy == "zero3":
            return None
        return {"": self.local_rank if self.device == "cuda" else "cpu"}

    @property
    def torch_device(self) -> str:
        """Where this process's model lives: its own GPU under a multi-process strategy."""
        return f"cuda:{self.local_rank}" if self.device == "cuda" else "cpu"

    def describe(self) -> dict[str, object]:
        """The resolved choice, as written into the metrics."""
        q = None
        if self.quantization is not None:
            qc = self.quantization
            q = {
                "method": "llm.int8" if qc.load_in_8bit else qc.bnb_4bit_quant_type,
                "double_quant": bool(qc.load_in_4bit and qc.bnb_4bit_use_double_quant),
                "compute_dtype": str(qc.bnb_4bit_compute_dtype).removeprefix("torch.") if qc.load_in_4bit else None,
                "storage_dtype": str(qc.bnb_4bit_quant_storage).removeprefix("torch.") if qc.load_in_4bit else "int8",
            }
        return {
            "precision": self.name,
            "device": self.device,
            "load_dtype": str(self.load_dtype).removeprefix("torch."),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "quantization": q,
            "amp": self.amp,
            "optim": self.optim,
            "adam_epsilon": self.adam_epsilon,
            "strategy": self.strategy,
        }


BF16_COMPUTE = ("bf16", "nf4")  # the precisions whose matmuls run in bf16


def compute_device() -> str:
    """Where this process computes: `workflow.devices.job_device()` decides (the GPUs this job was given, read
    through nvidia-smi and CUDA_VISIBLE_DEVICES, as the refusals and the leases read them); torch must agree.
    A GPU machine whose torch cannot use its GPUs (a CPU-only wheel, a broken driver) is an error, never a
    quiet CPU run, and so is a torch that sees GPUs which nvidia-smi does not list (none could be leased)."""
    device = devices.job_device()
    if device == "cuda" and not torch.cuda.is_available():
        pool = devices.gpu_pool()
        names = ", ".join(sorted({g.name for g in pool if g.name})) or "nvidia-smi lists them"
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}, which " \
                "does not start on this driver"
        raise StepError(f"this machine has {len(pool)} GPU(s) ({names}) but torch {torch.__version__} cannot use "
                        f"them ({build}); install torch's CUDA build (scripts/setup.sh picks it on a GPU machine), "
                        "or set CUDA_VISIBLE_DEVICES= (empty) to run on the CPU on purpose")
    if device == "cpu" and not devices.gpu_pool() and torch.cuda.is_available():
        raise StepError(f"torch sees {torch.cuda.device_count()} CUDA device(s) but nvidia-smi lists none (is it on "
                        "PATH?), so no GPU can be leased; put nvidia-smi on PATH, or set CUDA_VISIBLE_DEVICES= "
                        "(empty) to run on the CPU on purpose")
    return device


def _check_bf16(name: str, capability: tuple[int, int] | None) -> None:
    # CPU autocast supports bf16 everywhere (slow without avx512-bf16, but correct); CUDA needs compute
    # capability 8.0+, whatever torch.cuda.is_bf16_supported() (emulation included by default) says.
    if name in BF16_COMPUTE and capability is not None and not devices.bf16_capable(capability):
        raise StepError(f"precision {name} computes in bfloat16, which needs a GPU of compute capability 8.0+ "
                        f"(Ampere or newer), not {capability[0]}.{capability[1]}; use fp16 or int8 on this GPU")


def resolve_precision(
    name: str, device: str | None = None, *, optim: str | None = None, adam_epsilon: float | None = None,
    strategy: str = "single", quant_storage: str = "auto", local_rank: int = 0,
    capability: tuple[int, int] | None = None,
) -> PrecisionPlan:
    """Map a precision name to its plan on `device` under `strategy`; `optim`/`adam_epsilon` override the
    defaults; `quant_storage` is the nf4 storage dtype (`auto`: bfloat16 under ZeRO-3, which can partition
    4-bit weights only when they are stored in the compute dtype, else the packed uint8).

    Without `device` (what the steps do) this process's device is decided (`compute_device`) and on CUDA
    its GPU's compute capability read from torch; a given `device` makes a plan only (`capability`, when
    given, is checked too)."""
    if device is None:
        device = compute_device()
        if device == "cuda" and capability is None:
            capability = tuple(torch.cuda.get_device_capability(local_rank))
    if device not in ("cpu", "cuda"):
        raise StepError(f"device '{device}' is not supported; use cpu or cuda")
    paged = "paged_adamw_32bit" if device == "cuda" else "adamw_torch"  # paging is CUDA unified memory only
    if device == "cuda":
        _check_bf16(name, capability)

    if name == "fp16":
        # Weights in fp16. On CUDA, fp16 autocast + GradScaler; on CPU, Trainer's fp16 flag is silently ignored
        # (accelerate enables fp16 AMP only off CPU), so the CPU run computes with the fp16 weights themselves.
        plan = dict(load=torch.float16, compute=torch.float16, quant=None,
                    amp="fp16" if device == "cuda" else "none", optim="adamw_torch",
                    eps=1e-4, kbit=False)  # 1e-8 underflows to 0 in fp16 (seeds 000 §2.10)
    elif name == "bf16":
        plan = dict(load=torch.bfloat16, compute=torch.bfloat16, quant=None, amp="bf16",
                    optim="adamw_torch", eps=1e-8, kbit=False)
    elif name == "int8":
        # LLM.int8: int8 weights with fp16 outlier decomposition; other weights fp16 as in the seeds.
        quant = BitsAndBytesConfig(load_in_8bit=True)
        plan = dict(load=torch.float16, compute=torch.float16, quant=quant, amp="none",
                    optim="adamw_torch", eps=1e-8, kbit=True)
    elif name == "nf4":
        # QLoRA: NF4 storage, double-quantized constants (0.5 -> 0.127 bit/param), bf16 compute.
        if quant_storage == "auto":
            quant_storage = "bfloat16" if strategy == "zero3" else "uint8"
        quant = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
            bnb_4bit_quant_storage=getattr(torch, quant_storage),
        )
        plan = dict(load=torch.bfloat16, compute=torch.bfloat16, quant=quant, amp="bf16",
                    optim=paged, eps=1e-8, kbit=True)
    else:
        raise StepError(f"unknown precision '{name}'; choose fp16, bf16, int8 or nf4")

    return PrecisionPlan(
        name=name,
        device=device,
        load_dtype=plan["load"],
        compute_dtype=plan["compute"],
        quantization=plan["quant"],
        amp=plan["amp"],
        optim=optim or plan["optim"],
        adam_epsilon=adam_epsilon if adam_epsilon is not None else plan["eps"],
        kbit=plan["kbit"],
        strategy=strategy,
        local_rank=local_rank,
    )


def dtype_name(dtype: torch.dtype) -> str:
    """'float16' for torch.float16."""
    return str(dtype).removeprefix("torch.")
