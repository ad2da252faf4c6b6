"""Non-default templates through every step on the builtin model: preprocess -> train -> merge -> evaluate."""

from __future__ import annotations

import pytest
from datasets import load_from_disk

from tests.conftest import params_with
from workflow import train as train_step
from workflow.evaluate import evaluate_variant
from workflow.io import read_json
from workflow.merge import merge_variant
from workflow.modeling import load_tokenizer
from workflow.params import load_params
from workflow.preprocess import preprocess

STOP = {"chatglm3": "</s>", "qwen": "<|im_end|>"}
STOP_WORDS = {"chatglm3": {"</s>", "<|user|>", "<|observation|>"}, "qwen": {"<|im_end|>", "<|endoftext|>"}}
PAD = {"chatglm3": "<pad>", "qwen": "<|endoftext|>"}
STEPS = {"chatglm3": 40, "qwen": 80}


@pytest.mark.parametrize("template", ["chatglm3", "qwen"])
def test_template_runs_through_the_dag(template, builtin_model_dir, tmp_path):
    params = load_params(params_with(
        tmp_path,
        models={"tiny": {"source": "builtin:tiny-llama", "template": template}},  # the params switch
        data={"builtin_rows": 400, "eval_size": 32, "max_length": 128},
        # qwen's stop token needs more steps than chatglm3's to be learned on held-out eval rows
        train={"max_steps": STEPS[template], "save_steps": 1000, "logging_steps": 5},
        evaluate={"max_eval_rows": 32},
    ))
    data_dir, report_path = tmp_path / "data", tmp_path / "metrics" / "data.json"
    report = preprocess(params, "tiny", builtin_model_dir, data_dir, report_path)
    assert report["template"] == template and report["rows_dropped"] == 0 and report["examples_truncated"] == 0
    assert read_json(report_path) == report

    tok = load_tokenizer(builtin_model_dir, False, template)
    assert tok.pad_token == PAD[template] and tok.padding_side == "right"
    stop = tok.convert_tokens_to_ids(STOP[template])
    train = load_from_disk(str(data_dir / "train"))
    for ex in train.select(range(20)):
        assert ex["labels"][-1] == ex["input_ids"][-1] == stop
    first = tok.decode(train[0]["input_ids"])
    assert first.startswith({"chatglm3": "[gMASK]sop<|user|>\n", "qwen": "<|im_start|>system\n"}[template])

    result = train_step.train_variant(params, "tiny", "fp16", "single", builtin_model_dir, data_dir,
                                      tmp_path / "adapter", checkpoint_dir=tmp_path / "checkpoints")
    m = result.metrics
    assert m["train_loss_last"] < 0.5 * m["train_loss_first"]
    merge = merge_variant(params, "tiny", "fp16", "single", builtin_model_dir, tmp_path / "adapter", data_dir,
                          tmp_path / "merged")
    assert merge["merge_max_abs_logit_diff"] <= merge["merge_tolerance"]
    ev, rows, _ = evaluate_variant(params, "tiny", "fp16", "single", builtin_model_dir, tmp_path / "adapter",
                                tmp_path / "merged", data_dir)
    assert ev["eval_rows"] == 32
    # stops at the template's own stop (qwen: <|im_end|>; stopping at eos only gave 0 here) on eval rows about
    # held-out facts (qwen after 40 steps stopped 0.41 of them, after 80 all)
    assert ev["eos_stop_rate_adapter"] > 0.9
    for r in rows:  # a stopped answer is cut at its stop: nothing generated after it is scored
        assert r["stopped"] == (r["stop"] is not None) and (not r["stopped"] or r["stop"] in STOP_WORDS[template])
    assert STOP[template] in {r["stop"] for r in rows if r["model"] == "adapter" and r["stopped"]}
    assert ev["eval_loss_adapter"] < 0.5 * ev["eval_loss_base"]  # it learned the template, stop token included
    assert abs(ev["eval_loss_merged"] - ev["eval_loss_adapter"]) < 0.05
