"""The precision map: one function decides dtypes, quantization and optimizer."""

import pytest
import torch

from workflow.cli import StepError
from workflow.precision import resolve_precision


def test_cpu_plans():
    fp16, bf16, int8, nf4 = (resolve_precision(p, "cpu") for p in ("fp16", "bf16", "int8", "nf4"))
    assert (fp16.load_dtype, fp16.amp, fp16.adam_epsilon) == (torch.float16, "none", 1e-4)
    assert (bf16.load_dtype, bf16.amp, bf16.quantization) == (torch.bfloat16, "bf16", None)
    assert int8.quantization.load_in_8bit and int8.kbit and not int8.quantization.load_in_4bit
    q = nf4.quantization
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype == torch.bfloat16
    assert nf4.optim == "adamw_torch"  # no paging on CPU: said, not silently swapped at run time
    assert nf4.device_map == {"": "cpu"} and bf16.device_map is None


def test_overrides_and_description():
    plan = resolve_precision("fp16", "cpu", optim="adafactor", adam_epsilon=1e-6)
    assert (plan.optim, plan.adam_epsilon) == ("adafactor", 1e-6)
    d = resolve_precision("nf4", "cpu").describe()
    assert d["quantization"] == {"method": "nf4", "double_quant": True, "compute_dtype": "bfloat16",
                                 "storage_dtype": "uint8"}
    assert d["device"] == "cpu" and d["load_dtype"] == "bfloat16"


def test_refuses_unknown():
    with pytest.raises(StepError, match="unknown precision 'fp8'"):
        resolve_precision("fp8", "cpu")
    with pytest.raises(StepError, match="device 'tpu'"):
        resolve_precision("bf16", "tpu")


def test_strategy_decides_nf4_storage_and_placement():
    """ZeRO-3 can partition 4-bit weights only when they are stored in the compute dtype and loaded without a
    device_map; elsewhere nf4 keeps the packed uint8 storage and is placed on this rank's device at load."""
    single, zero2, zero3 = (resolve_precision("nf4", "cpu", strategy=s) for s in ("single", "zero2", "zero3"))
    assert single.quantization.bnb_4bit_quant_storage == zero2.quantization.bnb_4bit_quant_storage == torch.uint8
    assert zero3.quantization.bnb_4bit_quant_storage == torch.bfloat16 == zero3.compute_dtype
    assert zero3.device_map is None and zero2.device_map == {"": "cpu"}
    explicit = resolve_precision("nf4", "cpu", strategy="zero2", quant_storage="bfloat16")
    assert explicit.quantization.bnb_4bit_quant_storage == torch.bfloat16
    rank1 = resolve_precision("int8", "cuda", strategy="zero2", local_rank=1)  # a plan; nothing touches CUDA
    assert rank1.device_map == {"": 1} and rank1.torch_device == "cuda:1"
