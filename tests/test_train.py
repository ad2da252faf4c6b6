"""Real LoRA training on the builtin model, every precision: the loss falls, only the adapter moves."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import params_with
from workflow import train as train_step
from workflow.modeling import load_base
from workflow.params import load_params
from workflow.precision import resolve_precision

STEPS = 40  # enough for a clear drop on the tiny model in a few seconds per precision


@pytest.fixture()
def short_params(tmp_path):
    return load_params(params_with(tmp_path, train={"max_steps": STEPS, "logging_steps": 5, "save_steps": 1000}))


def run(params, precision, builtin_model_dir, tiny_data_dir, out):
    return train_step.train_variant(params, "tiny", precision, "single", builtin_model_dir, tiny_data_dir, out,
                                    checkpoint_dir=out.parent / f"checkpoints-{out.name}")


@pytest.mark.parametrize("precision", ["fp16", "bf16", "int8", "nf4"])
def test_every_precision_trains(precision, short_params, builtin_model_dir, tiny_data_dir, tmp_path):
    result = run(short_params, precision, builtin_model_dir, tiny_data_dir, tmp_path / "adapter")
    m = result.metrics
    losses = [r["loss"] for r in result.loss_curve]
    assert m["steps"] == STEPS and len(losses) >= 5
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0], losses  # a clear fall, not noise
    assert all(torch.isfinite(torch.tensor(losses)))

    # The resolved precision is recorded, and the loaded layers really are what it says.
    assert m["resolved"]["precision"] == precision and m["resolved"]["device"] == "cpu"
    layer = result.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer
    expected = {"fp16": "Linear", "bf16": "Linear", "int8": "Linear8bitLt", "nf4": "Linear4bit"}[precision]
    assert type(layer).__name__ == expected
    if precision in ("fp16", "bf16"):
        assert layer.weight.dtype == resolve_precision(precision, "cpu").load_dtype
    assert m["train_tokens"] > 0 and result.timing["tokens_per_s"] > 0 and m["weight_footprint_bytes"] > 0
    assert m["train_tokens"] < STEPS * 8 * 96  # non-pad tokens only: fewer than batch x longest row
    # Per layer: q,k,v,o 128x128, gate/up 256x128, down 128x256 (163840 params). int8 adds an fp32 scale per
    # output row; nf4 packs 2 per byte plus a uint8 absmax per 64 and an fp32 per 256 absmaxes (+ offset).
    int8_bytes = 163840 + 4 * (4 * 128 + 2 * 256 + 128)
    nf4_bytes = 163840 // 2 + 4 * (256 + 4 + 4) + 3 * (512 + 8 + 4)
    expected_bits = {"fp16": 16, "bf16": 16, "int8": 8 * int8_bytes / 163840, "nf4": 8 * nf4_bytes / 163840}
    assert m["linear_params"] == 2 * 163840
    assert m["linear_bits_per_param"] == pytest.approx(expected_bits[precision], rel=1e-9)

    # Base weights unchanged: equal to a fresh load in the same precision. Adapter weights moved.
    fresh = load_base(builtin_model_dir, resolve_precision(precision, "cpu"))
    fresh_state = fresh.state_dict()
    trained_base = {
        k.replace("base_model.model.", "").replace(".base_layer", ""): v
        for k, v in result.model.state_dict().items()
        if "lora_" not in k
    }
    compared = 0
    for key, value in fresh_state.items():
        if key in trained_base and value.dtype in (torch.int8, torch.uint8, torch.float16, torch.bfloat16):
            assert torch.equal(trained_base[key], value), key
            compared += 1
    assert compared >= 14  # every quantized/half linear weight of both layers
    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().max() > 0 for v in lora_b)  # B starts at zero: non-zero means it trained
    assert all("lora_" in k for k in adapter)


def test_training_is_deterministic(short_params, builtin_model_dir, tiny_data_dir, tmp_path):
    a = run(short_params, "bf16", builtin_model_dir, tiny_data_dir, tmp_path / "a")
    torch.manual_seed(1234)  # global state must not leak into the result
    b = run(short_params, "bf16", builtin_model_dir, tiny_data_dir, tmp_path / "b")
    assert a.loss_curve == b.loss_curve
    wa, wb = load_file(tmp_path / "a/adapter_model.safetensors"), load_file(tmp_path / "b/adapter_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cli_writes_adapter_metrics_and_curve(tmp_path, builtin_model_dir, tiny_data_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)  # checkpoints go under ./results/checkpoints
    path = params_with(tmp_path, train={"max_steps": 6, "logging_steps": 2, "save_steps": 3})
    argv = ["--params", str(path), "--model", "tiny", "--precision", "int8", "--strategy", "single",
            "--model-dir", str(builtin_model_dir), "--data", str(tiny_data_dir), "--out", "out/adapter",
            "--metrics", "out/m.json", "--curve", "out/c.csv", "--timing", "out/t.json", "--live", "out/live"]
    assert train_step.main(argv) == 0
    metrics = json.loads((tmp_path / "out/m.json").read_text())
    assert metrics["resolved"]["quantization"]["method"] == "llm.int8"
    assert (tmp_path / "out/c.csv").read_text().startswith("step,loss\n1,")
    assert (tmp_path / "out/adapter/adapter_config.json").is_file()
    timing = json.loads((tmp_path / "out/t.json").read_text())
    assert timing["peak_memory_kind"] == "cpu_peak_rss" and timing["device_name"].startswith("cpu")
    assert "runtime_s" not in metrics and "tokens_per_s" not in metrics  # timing stays out of the quality file
    live = (tmp_path / "out/live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert live[0].split("\t") == ["step", "loss"] and [r.split("\t")[0] for r in live[1:]] == ["1", "2", "4", "6"]
    assert json.loads((tmp_path / "out/live/metrics.json").read_text())["train"]["loss"] > 0
    assert sorted(p.name for p in (tmp_path / "out/live").iterdir()) == ["metrics.json", "plots"]

    # Rerun: it resumes from the finished checkpoint and trains no step; the live log still has every step.
    assert train_step.main(argv) == 0
    # the run's final checkpoint (6) is skipped: resuming there would train a 7th step
    assert json.loads((tmp_path / "out/t.json").read_text())["resumed_from"] == "checkpoint-3"
    resumed = (tmp_path / "out/live/plots/metrics/train/loss.tsv").read_text().splitlines()
    assert [r.split("\t")[0] for r in resumed[1:]] == ["1", "2", "4", "6"]
    assert (tmp_path / "out/c.csv").read_text().startswith("step,loss\n1,")
    assert not list((tmp_path / "out").glob(".*tmp*"))  # nothing half-written left behind
