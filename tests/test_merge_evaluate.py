"""Merge folds the adapter exactly into the unquantized base; evaluate measures base, adapter and merged."""

import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, params_with
from workflow import train as train_step
from workflow.cli import StepError
from workflow.evaluate import evaluate_variant, generate_answers, prompts_and_references
from workflow.merge import merge_variant
from workflow.modeling import eval_batches, load_tokenizer, logits_of
from workflow.params import load_params
from workflow.precision import resolve_precision
from workflow.quality import quality
from workflow.templates import get_template
from workflow.tokenize import stop_ids

ROOT_PARAMS = ROOT / "params.yaml"


@pytest.fixture(scope="module")
def trained(builtin_model_dir, tiny_data_dir, tmp_path_factory):
    """nf4 and bf16 adapters trained for a few steps, with their params."""
    tmp = tmp_path_factory.mktemp("merge")
    params = load_params(params_with(tmp, train={"max_steps": 30, "save_steps": 1000}))
    adapters = {}
    for precision in ("bf16", "nf4"):
        adapters[precision] = tmp / f"adapter-{precision}"
        train_step.train_variant(params, "tiny", precision, "single", builtin_model_dir, tiny_data_dir,
                                 adapters[precision], checkpoint_dir=tmp / f"checkpoints-{precision}")
    return params, adapters, tmp


def manual_merge(model_dir, adapter_dir):
    """base fp32 + (alpha/r) * B @ A for every adapted Linear, computed here without peft's merge."""
    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    weights = load_file(adapter_dir / "adapter_model.safetensors")
    modules = dict(base.named_modules())
    merged = 0
    for key, a in weights.items():
        if ".lora_A." not in key:
            continue
        b = weights[key.replace(".lora_A.", ".lora_B.")]
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        modules[name].weight.data += scale * (b.float() @ a.float())
        merged += 1
    assert merged == 14  # q,k,v,o,gate,up,down in both layers: all-linear, no lm_head
    return base


@pytest.mark.parametrize("precision", ["bf16", "nf4"])
def test_merged_logits_equal_base_plus_adapter(precision, trained, builtin_model_dir, tiny_data_dir):
    params, adapters, tmp = trained
    out = tmp / f"merged-{precision}"
    metrics = merge_variant(params, "tiny", precision, "single", builtin_model_dir, adapters[precision],
                            tiny_data_dir, out)
    assert metrics["merge_max_abs_logit_diff"] <= metrics["merge_tolerance"]
    assert metrics["merge_dtype"] == "bfloat16"  # nf4 merges into the unquantized bf16 base, never 4-bit
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()

    tokenizer = load_tokenizer(builtin_model_dir)
    batch = eval_batches(tiny_data_dir, tokenizer, 16)[0]
    expected = logits_of(manual_merge(builtin_model_dir, adapters[precision]), batch)
    saved = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert not any("lora" in k for k in saved.state_dict())
    mask = batch["attention_mask"].bool()
    gap = (logits_of(saved, batch) - expected).abs()[mask].max()
    assert gap < 0.03 * expected.abs()[mask].max()  # bf16 rounding of the saved weights, nothing more

    # In fp32 peft's merge and the manual one agree to float error.
    base = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=torch.float32)
    peft_merged = PeftModel.from_pretrained(base, str(adapters[precision])).merge_and_unload()
    assert (logits_of(peft_merged, batch) - expected).abs().max() < 1e-4


def test_merge_refuses_missing_adapter(trained, builtin_model_dir, tiny_data_dir, tmp_path):
    params, _, _ = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StepError, match="missing adapter_config.json; rerun the train step"):
        merge_variant(params, "tiny", "bf16", "single", builtin_model_dir, empty, tiny_data_dir, tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_merge_check_catches_a_wrong_adapter(trained, builtin_model_dir, tiny_data_dir, tmp_path, monkeypatch):
    """If merging changed the function (here: the merge doubles the delta), the step fails and saves nothing."""
    params, adapters, _ = trained
    from peft.tuners.tuners_utils import BaseTuner

    original = BaseTuner.merge_and_unload

    def doubled(self, *args, **kwargs):
        for name, module in self.named_modules():
            if isinstance(getattr(module, "scaling", None), dict):  # LoRA layers (attention has a float)
                module.scaling = {k: 2 * v for k, v in module.scaling.items()}
        return original(self, *args, **kwargs)

    monkeypatch.setattr(BaseTuner, "merge_and_unload", doubled)
    with pytest.raises(StepError, match="merged logits differ from base\\+adapter"):
        merge_variant(params, "tiny", "bf16", "single", builtin_model_dir, adapters["bf16"], tiny_data_dir,
                      tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_evaluate_reports_base_adapter_merged(trained, builtin_model_dir, tiny_data_dir):
    params, adapters, tmp = trained
    merged = tmp / "merged-eval"
    merge_variant(params, "tiny", "nf4", "single", builtin_model_dir, adapters["nf4"], tiny_data_dir, merged)
    m, rows, _ = evaluate_variant(params, "tiny", "nf4", "single", builtin_model_dir, adapters["nf4"], merged,
                               tiny_data_dir)
    assert m["eval_rows"] == params.data.eval_size and m["eval_tokens"] > m["eval_rows"]
    assert m["eval_loss_adapter"] < 0.5 * m["eval_loss_base"]  # fine-tuning taught the format and the stop
    assert abs(m["eval_loss_merged"] - m["eval_loss_adapter"]) < 0.1  # QLoRA merge gap is small
    assert m["trained_vs_merged_loss_gap"] == pytest.approx(m["eval_loss_merged"] - m["eval_loss_adapter"])
    assert 0 < m["trained_vs_merged_max_abs_logit_diff"] < 10  # nf4 rounding: present, but not a broken merge
    assert m["perplexity_merged"] == pytest.approx(torch.tensor(m["eval_loss_merged"]).exp().item())

    # Generation: every eval prompt, for each of the three models; the metrics are those of the rows.
    assert [r["model"] for r in rows] == ["base"] * 96 + ["adapter"] * 96 + ["merged"] * 96
    merged_rows = [r for r in rows if r["model"] == "merged"]
    assert m["exact_match_merged"] == quality(merged_rows)["exact_match"]
    assert all(r["prompt"].startswith("Human: ") and r["prompt"].endswith("Assistant: ") for r in rows)
    assert all(r["tokens"] <= params.generate.max_new_tokens for r in rows)
    assert m["eos_stop_rate_adapter"] > 0.9  # the fine-tuned model learned to stop
    assert m["exact_match_adapter"] >= m["exact_match_base"] + 0.1  # 30 steps: some answers right already
    assert m["avg_gen_tokens_merged"] < 4  # the default answers are a few tokens


def test_prompts_and_references_cut_at_the_final_reply():
    """Right-padded rows: prompt = ids before reply_start (a multi-turn row's earlier, labelled reply is part
    of it), reference = the final reply's labels minus its stop token (any of the template's)."""
    eos, pad, im_end = 2, 2, 3
    batch = {
        "input_ids": torch.tensor([[5, 6, 7, 8, eos, pad, pad], [5, 9, 11, 12, 13, 4, pad],
                                   [5, 20, 21, 6, 22, 23, im_end]]),
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1, 0], [1] * 7]),
        "labels": torch.tensor([[-100, -100, 7, 8, eos, -100, -100],
                                [-100, -100, -100, 12, 13, 4, -100],  # cut by truncate_end: no stop token
                                [-100, 20, 21, -100, -100, 23, im_end]]),  # history reply 20 21, then 6 22
        "reply_start": torch.tensor([2, 3, 5]),
    }
    assert prompts_and_references([batch], [eos, im_end]) == [
        ([5, 6], [7, 8]), ([5, 9, 11], [12, 13, 4]), ([5, 20, 21, 6, 22], [23])]


def test_generation_stops_at_any_stop_word_and_cuts_there(builtin_model_dir):
    """A stop id other than eos ends the generation (as ChatGLM3's <|user|> does) and nothing after it is kept."""
    from workflow.modeling import load_base

    tok = load_tokenizer(builtin_model_dir, False, "chatglm3")
    ids = stop_ids(tok, get_template("chatglm3"))
    assert ids == [tok.eos_token_id, tok.convert_tokens_to_ids("<|user|>"), tok.convert_tokens_to_ids("<|observation|>")]
    model = load_base(builtin_model_dir, resolve_precision("bf16", "cpu")).eval()
    gen = load_params(ROOT_PARAMS).generate.model_copy(update={"max_new_tokens": 8})
    prompt = tok("Human: what is 2 + 3?\n\nAssistant: ", add_special_tokens=False)["input_ids"]
    free = generate_answers(model, tok, [(prompt, [])], gen, [-1])[0]  # -1: never generated, runs to the end
    assert not free["stopped"] and free["tokens"] == 8
    out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=[-1])[0, len(prompt):].tolist()
    third = out[2]  # stop at the third token greedy decoding produces
    cut = generate_answers(model, tok, [(prompt, [])], gen, [-1, third])[0]
    first = out.index(third)
    assert cut["stopped"] and cut["stop"] == tok.convert_ids_to_tokens(third) and cut["tokens"] == first
    assert cut["prediction"] == tok.decode(out[:first], skip_special_tokens=True).strip()


def test_evaluate_holds_one_model_at_a_time(builtin_tokenizer_dir, tmp_path):
    """On a model big enough to tell (~104 M params, 0.21 GB in bf16: the step's fixed overheads, ~60 MB of
    activations and buffers, stay a small share), evaluate's peak memory above what the process held before
    loading is about one model's weights, not the two that base + adapter and merged model together would
    take."""
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from workflow.preprocess import preprocess

    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    model_dir, adapter_dir, merged_dir = tmp_path / "big", tmp_path / "adapter", tmp_path / "merged"
    config = LlamaConfig(vocab_size=len(tok), hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                         num_attention_heads=8, max_position_embeddings=256, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    params_file = params_with(tmp_path, models={"big": {"source": str(model_dir), "template": "human_assistant"}},
                              data={"builtin_rows": 60, "eval_size": 8},
                              evaluate={"max_eval_rows": 8}, generate={"max_new_tokens": 4})
    params = load_params(params_file)
    preprocess(params, "big", model_dir, tmp_path / "data")
    base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    base.save_pretrained(merged_dir)  # a fresh LoRA's B is zero: the merged model is the base (merge's own
    tok.save_pretrained(merged_dir)  # logit check is tested above; here only the sizes matter)
    get_peft_model(base, LoraConfig(r=8, target_modules=["q_proj", "v_proj"])).save_pretrained(adapter_dir)
    timing = tmp_path / "eval_timing.json"
    cmd = [sys.executable, "-m", "workflow.evaluate", "--params", str(params_file), "--model", "big",
           "--precision", "bf16", "--strategy", "single", "--model-dir", str(model_dir), "--adapter",
           str(adapter_dir), "--merged", str(merged_dir), "--data", str(tmp_path / "data"),
           "--metrics", str(tmp_path / "eval.json"), "--predictions", str(tmp_path / "p.jsonl"), "--timing", str(timing)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    t = json.loads(timing.read_text())
    assert t["merged_weights_bytes"] > 200e6 and t["peak_memory_kind"] == "cpu_peak_rss"
    assert t["models_peak_over_one_model"] == pytest.approx(
        (t["peak_memory_bytes"] - t["memory_before_models_bytes"]) / t["merged_weights_bytes"], abs=1e-3)
    assert 0.8 < t["models_peak_over_one_model"] < 1.5, t  # two models at once would be >= 2


def test_dequantized_merge_target_is_what_the_adapter_trained_against(trained, builtin_model_dir, tiny_data_dir,
                                                                       tmp_path):
    """merge.target dequantized merges an nf4 adapter into the NF4 round trip of the weights (exactly
    bitsandbytes' dequantization of the layers training used); the model as trained is then closer to the
    merged one than with the original weights, and the evaluate step reports both targets."""
    import bitsandbytes as bnb

    from workflow.modeling import load_base, load_dequantized

    params, adapters, _ = trained
    plan = resolve_precision("nf4")
    quantized = load_base(builtin_model_dir, plan)
    rounded = load_dequantized(builtin_model_dir, plan)
    original = AutoModelForCausalLM.from_pretrained(str(builtin_model_dir), dtype=plan.load_dtype)
    layers = [(n, m) for n, m in quantized.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 14
    for name, module in layers:
        expected = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        assert torch.equal(rounded.get_submodule(name).weight, expected), name
        assert not torch.equal(original.get_submodule(name).weight, expected), name
    for name in ("model.embed_tokens", "lm_head", "model.norm"):  # never quantized: the original weights
        assert torch.equal(rounded.get_submodule(name).weight, original.get_submodule(name).weight), name

    deq = load_params(params_with(tmp_path, train={"max_steps": 30, "save_steps": 1000},
                                  merge={"target": "dequantized"}, evaluate={"max_eval_rows": 32}))
    merged = tmp_path / "merged-nf4"
    m = merge_variant(deq, "tiny", "nf4", "single", builtin_model_dir, adapters["nf4"], tiny_data_dir, merged)
    assert m["merge_target"] == "dequantized" and m["merge_max_abs_logit_diff"] <= m["merge_tolerance"]
    assert merge_variant(deq, "tiny", "bf16", "single", builtin_model_dir, adapters["bf16"], tiny_data_dir,
                         tmp_path / "merged-bf16")["merge_target"] == "base"  # no round trip to merge into

    ev, _, _ = evaluate_variant(deq, "tiny", "nf4", "single", builtin_model_dir, adapters["nf4"], merged,
                                tiny_data_dir)
    assert ev["merge_target"] == "dequantized"
    assert ev["eval_loss_merged_dequantized"] == ev["eval_loss_merged"]  # the saved merged model
    assert ev["trained_vs_merged_max_abs_logit_diff_dequantized"] == ev["trained_vs_merged_max_abs_logit_diff"]
    gap_base, gap_deq = (ev[f"trained_vs_merged_max_abs_logit_diff_{t}"] for t in ("base", "dequantized"))
    assert gap_deq < 0.5 * gap_base  # the round trip removes the quantization error from the gap
    adapter = ev["eval_loss_adapter"]
    assert abs(ev["eval_loss_merged_dequantized"] - adapter) < abs(ev["eval_loss_merged_base"] - adapter)
