"""The memory estimator: seed 001's Llama-2-7b points, and exact checks against real tensors on the CPU."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from conftest import ROOT, params_with
from workflow import cli, estimate
from workflow.errors import ParamsError, StepError
from workflow.modeling import load_base
from workflow.params import PRECISIONS, load_params
from workflow.precision import resolve_precision

warnings.filterwarnings("ignore", message=".*MatMul8bit.*")
# Llama-2-7b's config.json (meta-llama/Llama-2-7b-hf): what seed 001 fine-tuned; no weights needed.
LLAMA2_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}
# alpaca_data_zh has rows over 384 tokens, which the seeds cut at MAX_LENGTH: the longest batch is 384 long.
SEED_REPORT = {"max_length": 384, "token_length": {"train": {"max": 384}}}
WEIGHT_PARTS = ("weights_quantized", "weights_quant_constants", "weights_unquantized", "buffers")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """The default builtin model (params.yaml's builtin.tiny-llama), built without pre-training: its tensors'
    sizes do not depend on their values."""
    from workflow.builtin import build_builtin

    params = load_params(ROOT / "params.yaml")
    spec = params.builtin["tiny-llama"].model_copy(update={"pretrain_steps": 0})
    out = tmp_path_factory.mktemp("tiny") / "tiny"
    build_builtin("tiny-llama", spec, params.seed, out)
    return out


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory):
    """A random tiny Llama with grouped-query attention (2 key/value heads for 4 query heads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("gqa")
    config = LlamaConfig(hidden_size=128, intermediate_size=320, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=640, max_position_embeddings=128)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def seed_params(tmp_path, **train):
    """presets/llama2-7b-lora.yaml (seed 001's settings: LoRA r 8 on q_proj/v_proj, alpha 8, no dropout,
    max length 384, gradient accumulation 8) with `train` changed."""
    return load_params(params_with(tmp_path, ROOT / "presets/llama2-7b-lora.yaml", train=train))


# seed 001's table: (precision, batch size, gradient checkpointing, peak GB, after-loading GB)
SEED_POINTS = [("fp16", 1, False, 19.1, 14.9), ("fp16", 2, False, 23.4, 14.9), ("fp16", 2, True, 15.8, 14.9),
               ("int8", 2, True, 10.9, 10.0), ("nf4", 2, True, 8.1, 6.1)]


@pytest.mark.parametrize("precision,bs,ckpt,peak,loaded", SEED_POINTS)
def test_seed_001_points_within_15_percent(precision, bs, ckpt, peak, loaded, tmp_path):
    """The seeds ran transformers of Nov 2023: Llama with eager attention only, reentrant checkpointing."""
    params = seed_params(tmp_path, per_device_train_batch_size=bs, gradient_checkpointing=ckpt)
    est = estimate.estimate_variant(params, "llama2_7b", precision, "single", LLAMA2_7B, SEED_REPORT,
                                    attn_implementation="eager", reentrant=True)
    assert abs(est["total_gb"] / peak - 1) <= 0.15, (est["total_gb"], peak, est["parts_bytes"])
    assert abs(est["after_loading_gb"] / loaded - 1) <= 0.15, (est["after_loading_gb"], loaded)
    assert est["total_bytes"] == sum(est["parts_bytes"].values())
    assert est["details"]["trainable_params"] == 4_194_304  # seed 001's print_trainable_parameters()


def test_project_run_is_what_is_modelled():
    """The defaults describe this project's training: non-reentrant checkpointing as workflow/trainer.py."""
    from workflow.trainer import _GC_KWARGS

    assert estimate.Setup(1, 1, True, 8, 8, 0.0, "all-linear").reentrant == _GC_KWARGS["use_reentrant"]


def _real_weight_bytes(model) -> int:
    """Bytes of the model's own tensors (LoRA excluded): parameters at their stored size, buffers, and the
    bitsandbytes constants (4-bit quant_state with its nested state, LLM.int8 row scales), each storage once."""
    seen = {}

    def add(t):
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()

    for name, p in model.named_parameters():
        if "lora_" in name:
            continue
        add(p)
        state = getattr(p, "quant_state", None)
        if state is not None:
            for t in (state.absmax, state.code, state.offset):
                add(t)
            if state.state2 is not None:
                add(state.state2.absmax)
                add(state.state2.code)
        add(getattr(p, "SCB", None))
    for b in model.buffers():
        add(b)
    return sum(seen.values())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_weights_and_lora_equal_the_loaded_tensors(precision, tiny_dir):
    """Loaded and prepared as the train step does (load_base, build_lora_model: the k-bit fp32 upcast)."""
    from workflow.trainer import build_lora_model

    params = load_params(ROOT / "params.yaml")
    plan = resolve_precision(precision, "cpu")
    model = build_lora_model(load_base(tiny_dir, plan), params, plan, True)
    est = estimate.estimate(tiny_dir, plan, estimate.variant_setup(params, precision, "single", 32))
    parts = est["parts_bytes"]
    assert sum(parts[k] for k in WEIGHT_PARTS) == _real_weight_bytes(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert parts["lora_params"] == sum(p.numel() * p.element_size() for p in trainable)
    assert est["details"]["trainable_params"] == sum(p.numel() for p in trainable)
    if precision in ("int8", "nf4"):
        assert parts["weights_quantized"] > 0 and parts["weights_quant_constants"] > 0
    else:
        assert parts["weights_quantized"] == parts["weights_quant_constants"] == 0


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_bnb_8bit", "paged_adamw_32bit", "adafactor"])
def test_optimizer_states_equal_the_optimizers_after_steps(optim, tiny_dir, tmp_path):
    """r 32: the LoRA tensors reach 4096 elements, where bitsandbytes' 8-bit states begin. The optimizer is
    the one the Trainer builds for `optim`."""
    from transformers import Trainer, TrainingArguments

    from workflow.trainer import build_lora_model

    params = load_params(params_with(tmp_path, lora={"r": 32}, train={"optim": optim}))
    plan = resolve_precision("bf16", "cpu", optim=optim)
    model = build_lora_model(load_base(tiny_dir, plan), params, plan, False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(
        TrainingArguments(output_dir=str(tmp_path), optim=optim, use_cpu=True, report_to="none"))
    opt = cls(trainable, **kwargs)
    ids = torch.randint(0, 700, (2, 16))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    grads = sum(p.grad.numel() * p.grad.element_size() for p in trainable)
    opt.zero_grad(set_to_none=True)
    states, steps = {}, 0
    for p in trainable:
        for key, value in opt.state[p].items():
            if not torch.is_tensor(value):
                continue
            if key == "step":
                steps += value.numel() * value.element_size()
            else:
                states[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    est = estimate.estimate(tiny_dir, plan, estimate.variant_setup(params, "bf16", "single", 16))
    assert sum(states.values()) > 0
    assert est["parts_bytes"]["optimizer_states"] == sum(states.values())
    assert est["host_bytes"].get("optimizer_step_counters", 0) == steps
    assert est["parts_bytes"]["lora_grads"] == grads


class LiveTensors(TorchDispatchMode):
    """The storages the ops inside the mode create (not those of `skip`): `live()` sums the ones still alive
    (what the autograd graph and the running code keep), `peak` is the largest such sum after any op."""

    def __init__(self, skip: set[int]):
        super().__init__()
        self.skip, self.seen, self.peak = skip, {}, 0

    def live(self) -> int:
        self.seen = {k: v for k, v in self.seen.items() if not v[0].expired()}  # freed: forgotten
        return sum(n for _, n in self.seen.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                st = t.untyped_storage()
                old = self.seen.get(st.data_ptr())
                if st.data_ptr() not in self.skip and (old is None or old[0].expired()):
                    self.seen[st.data_ptr()] = (StorageWeakRef(st), st.nbytes())
        self.peak = max(self.peak, self.live())
        return out


def _model_storages(model) -> set[int]:
    ptrs = set()
    for t in list(model.parameters()) + list(model.buffers()):
        ptrs.add(t.untyped_storage().data_ptr())
        state = getattr(t, "quant_state", None)
        for x in ([state.absmax, state.code, state.offset] + ([state.state2.absmax, state.state2.code]
                  if state.state2 is not None else []) if state is not None else []) + [getattr(t, "SCB", None)]:
            if torch.is_tensor(x):
                ptrs.add(x.untyped_storage().data_ptr())
    for module in model.modules():  # LLM.int8 moves its weight and row stats into the layer's state
        for x in (getattr(getattr(module, "state", None), k, None) for k in ("CB", "SCB")):
            if torch.is_tensor(x):
                ptrs.add(x.untyped_storage().data_ptr())
    return ptrs


CASES = [(p, "sdpa", 2, False) for p in PRECISIONS] + [(p, "eager", 2, True) for p in PRECISIONS] + \
        [("nf4", "eager", 1, False), ("int8", "sdpa", 2, True)]


@pytest.mark.parametrize("precision,attn,batch,ckpt", CASES)
def test_activations_equal_what_autograd_keeps(precision, attn, batch, ckpt, tiny_dir):
    """A real training step of the tiny model, prepared as the train step does (default params: LoRA on every
    linear layer, dropout 0.05), under the plan's autocast: the storages alive when forward ends are the
    estimate's saved bytes (only the int64 labels and positions beyond them); the peak over the forward and
    backward of a second micro-batch is its activations + loss or transients."""
    _check_step(load_params(ROOT / "params.yaml"), precision, attn, batch, ckpt, tiny_dir, peak_tolerance=0.08)


def test_grouped_query_attention_and_two_targets(gqa_dir, tmp_path):
    params = load_params(params_with(tmp_path, lora={"target_modules": ["q_proj", "v_proj"], "dropout": 0.0}))
    for attn in ("sdpa", "eager"):
        _check_step(params, "bf16", attn, 2, False, gqa_dir, peak_tolerance=0.08)


def _check_step(params, precision, attn, batch, ckpt, model_dir, peak_tolerance):
    from workflow.trainer import build_lora_model

    length = 24
    plan = resolve_precision(precision, "cpu")
    base = load_base(model_dir, plan)
    base.set_attn_implementation(attn)
    model = build_lora_model(base, params, plan, ckpt)
    model.train()
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    ids = torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1:, length // 2:] = 0  # right padding, as the collator's
    labels = ids.masked_fill(mask == 0, -100)
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=plan.amp == "bf16")
    with amp:  # a first micro-batch: its gradients stay for the next, as under gradient accumulation
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    grads = {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    mode = LiveTensors(_model_storages(model) | grads)
    with mode:
        with amp:
            out = model(input_ids=ids, attention_mask=mask, labels=labels)
        loss = out.loss
        del out  # the Trainer keeps only the loss
        after_forward = mode.live()
        loss.backward()
    setup = replace(estimate.variant_setup(params, precision, "single", length), batch_size=batch,
                    checkpointing=ckpt, attn_implementation=attn)
    est = estimate.estimate(model_dir, plan, setup)
    saved = est["details"]["saved_bytes"]
    extra = (2 * batch * length + length) * 8  # int64 labels (and their shifted copy) and positions
    assert 0 <= after_forward - saved <= extra, (after_forward, saved)
    parts = est["parts_bytes"]
    assert parts["lora_grads"] == sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()
                                      if p.grad is not None)
    dynamic = parts["activations"] + parts["logits_loss"] + parts["transients"]
    assert abs(dynamic / mode.peak - 1) <= peak_tolerance, (dynamic, mode.peak, est["peak_phase"])


def test_zero_partitions_by_world_size_and_offloads(tmp_path):
    params = seed_params(tmp_path)

    def run(strategy, **changes):
        setup = replace(estimate.variant_setup(params, "nf4", strategy, 384), **changes)
        plan = resolve_precision("nf4", "cuda", strategy=strategy)
        return estimate.estimate(LLAMA2_7B, plan, setup)

    single, z2, z2_4 = run("single"), run("zero2"), run("zero2", world_size=4)
    s, two, four = single["parts_bytes"], z2["parts_bytes"], z2_4["parts_bytes"]
    assert two["optimizer_states"] == math.ceil(s["optimizer_states"] / 2)
    assert four["optimizer_states"] == math.ceil(s["optimizer_states"] / 4)
    assert two["master_weights"] == 2 * four["master_weights"] > 0  # DeepSpeed's fp32 partition
    assert two["weights_quantized"] == s["weights_quantized"]  # ZeRO-2 keeps every parameter on every rank
    assert two["weights_unquantized"] < s["weights_unquantized"]  # the fp32-upcast layers back in bf16
    z3, z3_off = run("zero3"), run("zero3", offload_optimizer=True, offload_params=True)
    three, off = z3["parts_bytes"], z3_off["parts_bytes"]
    assert three["weights_quantized"] == math.ceil(s["weights_quantized"] / 2)  # bf16 storage, same bytes
    assert three["weights_quant_constants"] == s["weights_quant_constants"]  # not parameters: not partitioned
    assert off["optimizer_states"] == off["master_weights"] == off["weights_quantized"] == 0
    assert z3_off["host_bytes"]["optimizer_states"] == three["optimizer_states"]
    assert z3_off["host_bytes"]["weight_partitions"] == three["weights_quantized"] + three["weights_unquantized"]
    assert z3["total_bytes"] < z2["total_bytes"] < single["total_bytes"]


def test_fits_names_what_does_not_fit_and_the_cheapest_change(tmp_path):
    params = seed_params(tmp_path, gradient_checkpointing=False)
    est = estimate.estimate_variant(params, "llama2_7b", "fp16", "single", LLAMA2_7B, SEED_REPORT)
    assert estimate.fits(est, est["total_gb"] + 1) is None
    (tmp_path / "ckpt").mkdir()
    ckpt = estimate.estimate_variant(seed_params(tmp_path / "ckpt", gradient_checkpointing=True), "llama2_7b",
                                     "fp16", "single", LLAMA2_7B, SEED_REPORT)
    budget = (ckpt["total_gb"] + est["total_gb"]) / 2  # checkpointing fits, nothing cheaper does
    assert estimate.fits(est, budget).endswith(" GB")  # without params: what does not fit, no alternatives
    message = estimate.fits(json.loads(json.dumps(est)), budget, params)  # also from the JSON file's contents
    assert message.startswith(f"llama2_7b-fp16-single: predicted {est['total_gb']:.1f} GB per GPU")
    named = message.split("what does not fit: ")[1].split(" GB;")[0].split(", ")
    filled = [k for k in estimate.FILL_ORDER if est["parts_bytes"].get(k, 0) >= 0.01 * estimate.GB]
    assert [x.split()[0] for x in named] == filled[-len(named):]  # the last parts to fill memory
    used = sum(v for k, v in est["parts_bytes"].items() if k not in [x.split()[0] for x in named])
    assert used <= budget * estimate.GB < used + est["parts_bytes"][named[0].split()[0]]
    assert f"cheapest change that fits: train.gradient_checkpointing: true ({ckpt['total_gb']:.1f} GB)" in message
    assert "use a larger GPU" in estimate.fits(est, 1.0, params)  # below the CUDA context alone


def test_stale_report_and_unknown_optimizer_are_refused(tiny_dir, tmp_path):
    with pytest.raises(StepError, match="max_length 96.*data.max_length 384; rerun the preprocess"):
        estimate.batch_length({"max_length": 96, "token_length": {"train": {"max": 28}}}, 384)
    assert estimate.batch_length({"max_length": 96, "token_length": {"train": {"max": 28}}}, 96) == 28
    params = load_params(params_with(tmp_path, train={"optim": "lion_32bit"}))
    with pytest.raises(StepError, match="train.optim 'lion_32bit'"):
        estimate.estimate_variant(params, "tiny", "bf16", "single", tiny_dir)


def test_cli_writes_the_estimate_and_refuses_what_does_not_fit(tiny_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.json"
    report.write_text(json.dumps({"max_length": 96, "token_length": {"train": {"max": 28}}}))
    argv = ["--model", "tiny", "--precision", "nf4", "--strategy", "single", "--model-dir", str(tiny_dir),
            "--data-report", str(report), "--out", "est.json"]
    assert cli.run(estimate.main, ["--params", str(params_with(tmp_path)), *argv]) == 0
    written = json.loads((tmp_path / "est.json").read_text())
    assert written["variant"] == "tiny-nf4-single" and written["fits"] is None
    assert written["total_bytes"] == sum(written["parts_bytes"].values())
    assert written["plan"]["optim"] == "paged_adamw_32bit"  # planned for the GPU it needs
    small = params_with(tmp_path, distributed={"gpu_memory_gb": 0.5})
    assert cli.run(estimate.main, ["--params", str(small), *argv]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "distributed.gpu_memory_gb" in err and "cuda_context 1.50" in err


def test_train_refuses_what_does_not_fit_before_loading_weights(builtin_model_dir, tiny_data_dir, tmp_path,
                                                                 monkeypatch):
    """The train step checks the same budget itself (the DAGs do not order it after the estimate step)."""
    from datasets import load_from_disk

    from workflow import trainer

    def no_load(*args, **kwargs):
        raise AssertionError("weights loaded before the budget check")

    monkeypatch.setattr(trainer, "load_base", no_load)
    params = load_params(params_with(tmp_path, distributed={"gpu_memory_gb": 0.5}))
    with pytest.raises(ParamsError, match=r"distributed.gpu_memory_gb: tiny-bf16-single: predicted 1\.[0-9] GB "
                                          r"per GPU.*cuda_context 1\.50"):
        trainer.train_variant(params, "tiny", "bf16", "single", builtin_model_dir, tiny_data_dir, tmp_path / "a")
    longest = max(len(x) for x in load_from_disk(str(tiny_data_dir / "train"))["input_ids"])
    est = estimate.estimate_variant(params, "tiny", "bf16", "single", builtin_model_dir, seq_len=longest)
    assert estimate.budget_refusal(params, "tiny", "bf16", "single", builtin_model_dir, longest) == \
        f"distributed.gpu_memory_gb: {estimate.fits(est, 0.5, params)}"
    (tmp_path / "roomy").mkdir()
    roomy = load_params(params_with(tmp_path / "roomy", distributed={"gpu_memory_gb": est["total_gb"] + 0.1}))
    assert estimate.budget_refusal(roomy, "tiny", "bf16", "single", builtin_model_dir, longest) is None
