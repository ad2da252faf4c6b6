"""The GPU acceptance run's checker, on metrics files written here as a GPU run writes them (the run itself
needs a GPU: scripts/gpu_check.sh)."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

from workflow.params import validate_params, variants  # noqa: E402

MB = 2**20
# What the train step records on CUDA for each precision (README's precision table), written out by hand.
RESOLVED = {
    "fp16": {"load_dtype": "float16", "compute_dtype": "float16", "quantization": None, "amp": "fp16",
             "optim": "adamw_torch", "adam_epsilon": 1e-4},
    "bf16": {"load_dtype": "bfloat16", "compute_dtype": "bfloat16", "quantization": None, "amp": "bf16",
             "optim": "adamw_torch", "adam_epsilon": 1e-8},
    "int8": {"load_dtype": "float16", "compute_dtype": "float16", "amp": "none", "optim": "adamw_torch",
             "adam_epsilon": 1e-8, "quantization": {"method": "llm.int8", "double_quant": False,
                                                    "compute_dtype": None, "storage_dtype": "int8"}},
    "nf4": {"load_dtype": "bfloat16", "compute_dtype": "bfloat16", "amp": "bf16", "optim": "paged_adamw_32bit",
            "adam_epsilon": 1e-8, "quantization": {"method": "nf4", "double_quant": True,
                                                   "compute_dtype": "bfloat16", "storage_dtype": "uint8"}},
}
STORAGE = {"fp16": "float16", "bf16": "bfloat16", "int8": "llm.int8", "nf4": "nf4+double_quant"}
BITS = {"fp16": 16.0, "bf16": 16.0, "int8": 8.03, "nf4": 4.13}
FOOTPRINT_MB = {"fp16": 206, "bf16": 206, "int8": 110, "nf4": 60}  # the ~100M model as loaded for training
TRAIN_PEAK_MB = {"fp16": 301, "bf16": 296, "int8": 204, "nf4": 148}


@pytest.fixture
def params():
    return validate_params(gpu_check.check_params(), "gpu_check params")


def write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def gpu_run(results: Path, params) -> dict[str, dict]:
    """The metrics files of a good run of the acceptance matrix on one A100; returns them by variant."""
    cuda = {"peak_memory_kind": "cuda_max_memory_allocated"}
    files = {}
    for v in variants(params):
        vid, p, s = v["id"], v["precision"], v["strategy"]
        scaler = {"by": "torch.amp.grad_scaler.GradScaler", "scale": 32768.0} if p == "fp16" else None
        optimizer = "bitsandbytes.optim.adamw.AdamW" if p == "nf4" else "torch.optim.adamw.AdamW"
        files[vid] = {
            "train": {"variant": vid, "resolved": {"precision": p, "device": "cuda", "strategy": s, **RESOLVED[p]},
                      "linear_storage": STORAGE[p], "linear_bits_per_param": BITS[p],
                      "weight_footprint_bytes": FOOTPRINT_MB[p] * MB, "loss_scaler": scaler,
                      "optimizer": optimizer, "optimizer_paged": p == "nf4"},
            "timing": {"device_name": "NVIDIA A100-SXM4-80GB", "peak_memory_bytes": TRAIN_PEAK_MB[p] * MB, **cuda},
            "merge": {"merged_bytes": 206 * MB},
            "merge_memory": {"peak_memory_bytes": 251 * MB, **cuda},
            "eval_timing": {"peak_memory_bytes": 262 * MB, **cuda},
        }
    save(results, files)
    return files


def save(results: Path, files: dict[str, dict]) -> None:
    for vid, f in files.items():
        write(results / "metrics/train" / f"{vid}.json", f["train"])
        write(results / "metrics/timing" / f"{vid}.json", f["timing"])
        write(results / "metrics/merge" / f"{vid}.json", f["merge"])
        write(results / "merged" / vid / "merge_memory.json", f["merge_memory"])
        write(results / "metrics/eval_timing" / f"{vid}.json", f["eval_timing"])


def test_the_acceptance_matrix_is_the_default_single_variants_and_one_zero2_on_one_gpu(params):
    assert [v["id"] for v in variants(params)] == [
        "tiny-fp16-single", "tiny-bf16-single", "tiny-int8-single", "tiny-nf4-single", "tiny-bf16-zero2"]
    assert params.processes("zero2") == 1 and params.models["tiny"].source == "builtin:tiny-llama"
    b = params.builtin["tiny-llama"]
    linear = b.num_layers * (4 * b.hidden_size**2 + 3 * b.hidden_size * b.intermediate_size)
    assert 80e6 < linear < 130e6  # ~100M parameters where quantization acts


def test_a_good_gpu_run_passes(tmp_path, params):
    gpu_run(tmp_path / "results", params)
    rows, failures = gpu_check.check(tmp_path / "results", params)
    assert failures == []
    assert [r["verdict"] for r in rows] == ["ok"] * 5
    nf4 = next(r for r in rows if r["variant"] == "tiny-nf4-single")
    assert nf4["optimizer"] == "paged_adamw_32bit (paged)" and nf4["train peak MB"] == "148"


@pytest.mark.parametrize("variant, change, expected", [
    ("tiny-fp16-single", lambda f: f["train"].update(loss_scaler=None), "fp16 without a GradScaler loss scale"),
    ("tiny-fp16-single", lambda f: f["train"]["resolved"].update(device="cpu", amp="none"),  # a silent CPU run
     "resolved amp is 'none', resolve_precision on cuda says 'fp16'"),
    ("tiny-nf4-single", lambda f: f["train"].update(optimizer_paged=False), "nf4 did not step with paged_adamw_32bit"),
    ("tiny-nf4-single", lambda f: f["train"]["resolved"].update(optim="adamw_torch"),
     "resolved optim is 'adamw_torch', resolve_precision on cuda says 'paged_adamw_32bit'"),
    ("tiny-int8-single", lambda f: f["train"].update(linear_storage="float16"),  # quantization did not load
     "linear layers stored as 'float16', not 'llm.int8'"),
    ("tiny-bf16-single", lambda f: f["train"].update(loss_scaler={"by": "x", "scale": 1.0}), "bf16 has a loss scaler"),
    ("tiny-bf16-zero2", lambda f: f["eval_timing"].update(peak_memory_bytes=430 * MB),  # base and merged at once
     "evaluate peaked at 430 MB, more than 1.5 x one model (206 MB)"),
    ("tiny-bf16-single", lambda f: f["merge_memory"].update(peak_memory_bytes=415 * MB),
     "merge peaked at 415 MB, more than 1.5 x the merged model (206 MB)"),
    ("tiny-int8-single", lambda f: f["timing"].update(peak_memory_bytes=320 * MB),
     "memory order: training peaks are nf4 148 MB, int8 320 MB, bf16 296 MB, fp16 301 MB"),
    ("tiny-fp16-single", lambda f: f["timing"].update(peak_memory_bytes=400 * MB),
     "memory order: bf16 and fp16 peaks differ by more than 10%"),
    ("tiny-bf16-single", lambda f: f["eval_timing"].update(peak_memory_kind="cpu_peak_rss"),
     "eval_timing peak memory is 'cpu_peak_rss': the step did not run on CUDA"),
])
def test_each_broken_promise_fails_the_check(tmp_path, params, variant, change, expected):
    files = gpu_run(tmp_path / "good", params)
    broken = copy.deepcopy(files)
    change(broken[variant])
    save(tmp_path / "bad", broken)
    rows, failures = gpu_check.check(tmp_path / "bad", params)
    assert any(expected in f for f in failures), failures
    assert "FAIL" in [r["verdict"] for r in rows] or failures[0].startswith("memory order")


def test_missing_metrics_fail_and_the_command_prints_one_table(tmp_path, params, capsys):
    workdir = tmp_path / "run"
    (workdir / "params.yaml").parent.mkdir(parents=True)
    (workdir / "params.yaml").write_text(yaml.safe_dump(gpu_check.check_params()))
    gpu_run(workdir / "results", params)
    assert gpu_check.main(["--check-only", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    assert out.count("| variant |") == 1 and out.rstrip().endswith("PASS: every check held")
    assert (workdir / "gpu_check.md").read_text() == out
    (workdir / "results/merged/tiny-nf4-single/merge_memory.json").unlink()
    assert gpu_check.main(["--check-only", "--workdir", str(workdir)]) == 1
    assert "FAIL: tiny-nf4-single: missing or unreadable" in capsys.readouterr().out


def test_the_shell_script_parses():
    proc = subprocess.run(["bash", "-n", str(ROOT / "scripts/gpu_check.sh")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
