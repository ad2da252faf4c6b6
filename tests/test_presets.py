"""Every preset runs, so none can rot: its params with the model swapped for a tiny replica of the same family
(tests/replicas) and the steps cut down, through `snakemake -n` over its whole matrix and a real run of the
variants in RUN (download -> preprocess -> train -> merge -> evaluate)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml
from replicas import chatglm, native, qwen1
from test_workflow import dry_jobs, make_project, sh

from workflow.params import load_params, validate_params, variants

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted((ROOT / "presets").glob("*.yaml"))
# The replica of each preset model's source: a preset whose model has none here fails test_every_preset_...
REPLICAS = {
    "modelscope:modelscope/Llama-2-7b-ms": native.build_llama2,
    "modelscope:ZhipuAI/chatglm3-6b-base": chatglm.build,
    "modelscope:qwen/Qwen-1_8B-Chat": qwen1.build,
    "modelscope:Qwen/Qwen2.5-1.5B-Instruct": native.build_qwen25,
}
RUN = {  # the variants each preset runs for real on CPU: the seeds' own runs
    "llama2-7b-lora": ["llama2_7b-nf4-single"],
    "chatglm3-6b-base": ["chatglm3_6b_base-int8-single", "chatglm3_6b_base-nf4-single"],  # seeds 000 §3-5
    "qwen-1_8b-chat-qlora": ["qwen_1_8b_chat-nf4-single"],
    "qwen2.5-1.5b-instruct-qlora": ["qwen2_5_1_5b_instruct-nf4-zero2"],  # seed 002: QLoRA under ZeRO-2
}
# Native architecture each family arrives as after the download step, and what it was converted from.
ARCHITECTURE = {"llama2_7b": "LlamaForCausalLM", "chatglm3_6b_base": "GlmForCausalLM",
                "qwen_1_8b_chat": "Qwen2ForCausalLM", "qwen2_5_1_5b_instruct": "Qwen2ForCausalLM"}
CONVERTED = {"chatglm3_6b_base": "chatglm", "qwen_1_8b_chat": "qwen"}
CUT = {  # the preset's steps, cut to seconds on CPU; everything else stays the preset's own
    "data": {"source": "builtin:tasks", "builtin_rows": 240, "eval_size": 16, "max_length": 64, "strict": False},
    "train": {"max_steps": 4, "num_train_epochs": 1, "per_device_train_batch_size": 2,
              "gradient_accumulation_steps": 1, "logging_steps": 2, "save_steps": 2, "warmup_steps": 0},
    "evaluate": {"per_device_eval_batch_size": 4, "max_eval_rows": 8},
    "generate": {"max_new_tokens": 4, "batch_size": 8},
}


def test_there_are_presets():
    assert PRESETS and {p.stem for p in PRESETS} == set(RUN)


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_expands(path):
    params = load_params(path)
    assert variants(params)
    for name in params.matrix.model:
        entry = params.models[name]
        assert not entry.source.startswith("builtin:")  # real models only
        assert entry.source in REPLICAS, f"{path.name}: models.{name} has no replica in tests/replicas"
        assert not entry.trust_remote_code  # every family runs on native transformers code


def replica_params(path: Path, tmp_path: Path) -> dict:
    """The preset with its models replaced by replicas built under tmp_path and the steps cut down."""
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    for key, entry in raw["models"].items():
        entry.update(source=str(REPLICAS[entry["source"]](tmp_path / f"hub-{key}")), revision=None)
        entry.pop("allow_unpinned", None)
    raw["download"].update(cache_dir=str(tmp_path / "cache"), offline=True)
    for section, values in CUT.items():
        raw[section].update(values)
    validate_params(raw, path)
    return raw


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_every_preset_runs_on_its_replica(path, tmp_path):
    raw = replica_params(path, tmp_path)
    repo = make_project(tmp_path / "project", raw)
    every = [v["id"] for v in variants(validate_params(raw))]
    jobs = dry_jobs(repo)  # the whole matrix plans
    assert jobs.count("train") == jobs.count("merge") == jobs.count("evaluate") == len(every) > 0
    targets = [f"results/metrics/eval/{v}.json" for v in RUN[path.stem]]
    targets += sorted({f"results/metrics/quant/{v.split('-')[0]}.json" for v in RUN[path.stem]})
    sh(["snakemake", *targets, "--cores", "2", "--resources", "gpu=2"], repo)  # targets first: --resources takes a list
    for vid in RUN[path.stem]:
        model, precision, strategy = vid.split("-")
        source = json.loads((repo / f"results/models/{model}/source.json").read_text())
        config = json.loads((repo / f"results/models/{model}/config.json").read_text())
        assert config["architectures"] == [ARCHITECTURE[model]] and "auto_map" not in config
        assert source.get("converted", {}).get("model_type") == CONVERTED.get(model)
        train = json.loads((repo / f"results/metrics/train/{vid}.json").read_text())
        assert (train["resolved"]["precision"], train["strategy"]) == (precision, strategy)
        assert train["steps"] == CUT["train"]["max_steps"] and math.isfinite(train["train_loss_last"])
        merge = json.loads((repo / f"results/metrics/merge/{vid}.json").read_text())
        assert merge["merge_max_abs_logit_diff"] <= merge["merge_tolerance"]
        evaluation = json.loads((repo / f"results/metrics/eval/{vid}.json").read_text())
        assert evaluation["eval_rows"] == CUT["evaluate"]["max_eval_rows"]
        assert evaluation["eval_loss_merged"] == pytest.approx(evaluation["eval_loss_adapter"], rel=0.05)
        # Both merge targets measured. For nf4 the round trip the adapter trained against is closer to the
        # model as trained than the original weights are; LLM.int8 also quantizes the activations, which
        # dominates its gap (both targets about equal).
        gap = {t: evaluation[f"trained_vs_merged_max_abs_logit_diff_{t}"] for t in ("base", "dequantized")}
        assert gap["dequantized"] < gap["base"] if precision == "nf4" else 0 < min(gap.values()), gap
        print(f"merge targets {vid}: {gap}, eval loss adapter {evaluation['eval_loss_adapter']:.4f}, merged "
              f"base {evaluation['eval_loss_merged_base']:.4f}, dequantized "
              f"{evaluation['eval_loss_merged_dequantized']:.4f}")
        quant = json.loads((repo / f"results/metrics/quant/{model}.json").read_text())
        errors = {f: v["rel_error"] for f, v in quant["formats"].items()}
        assert quant["params_quantized"] == train["linear_params"] > 0  # the layers training quantized
        assert errors["int8_row"] <= errors["int8_tensor"] < errors["nf4"] < 0.2, errors
