"""Batching: packed rows train exactly what padded batches train, nothing attends across an example's
boundary, padding efficiency is counted from the built batches, length grouping survives a resume."""

import pytest
import torch
from datasets import load_from_disk
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from tests.conftest import params_with
from workflow import train as train_step
from workflow.batching import (
    PER_EXAMPLE_SDPA,
    GroupedSampler,
    PackedCollator,
    PaddedCollator,
    example_lengths,
    use_packed_attention,
)
from workflow.checkpoints import variant_fingerprint
from workflow.errors import ParamsError
from workflow.params import load_params

EOS = 2
# (length, prompt tokens): labels are -100 on the prompt, the reply and its eos are learned
SHAPES = ((7, 3), (12, 5), (1, 0), (4, 2), (9, 4))
# What a packed row may run on: the project's per-example sdpa, and transformers' own mask-based paths.
IMPLEMENTATIONS = (PER_EXAMPLE_SDPA, "sdpa", "eager", "flex_attention")


def examples(seed: int = 0, vocab: int = 96) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n, prompt in SHAPES:
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        ids[-1] = EOS
        out.append({"input_ids": ids, "attention_mask": [1] * n, "labels": [-100] * prompt + ids[prompt:]})
    return out


def tiny_lora(implementation: str):
    """A random fp32 Llama (grouped-query attention) with a LoRA adapter whose B is non-zero (so its
    gradients depend on the attention), on `implementation`."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    base = LlamaForCausalLM(config)
    base.config.use_cache = False  # as the train step sets it
    if implementation == PER_EXAMPLE_SDPA:
        assert use_packed_attention(base) == PER_EXAMPLE_SDPA  # what sdpa models train on when packed
    else:
        base.set_attn_implementation(implementation)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.2)
    return model


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def learned(labels: list[int]) -> int:
    """Labels the shifted causal-LM loss counts."""
    return sum(x != -100 for x in labels[1:])


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS[:-1])  # flex_attention has no backward on CPU
def test_packed_loss_and_gradients_equal_examples_run_one_by_one(implementation):
    model = tiny_lora(implementation)
    exs = examples()
    total = sum(learned(e["labels"]) for e in exs)

    # One by one: each example's token-mean loss, weighted by its learned tokens, as a batch loss is.
    model.zero_grad()
    reference = 0.0
    for e in exs:
        loss = model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss
        if learned(e["labels"]):
            (loss * learned(e["labels"]) / total).backward()
            reference += loss.item() * learned(e["labels"]) / total
    expected = lora_grads(model)

    model.zero_grad()
    batch = PackedCollator()(exs)
    packed = model(**batch).loss
    packed.backward()
    got = lora_grads(model)

    assert packed.item() == pytest.approx(reference, rel=1e-6)
    assert len(got) == 2 * 2 * 7  # A and B of 7 linear layers in 2 layers
    for name, grad in got.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_padded_batch_has_the_same_loss_as_the_packed_row(builtin_tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(builtin_tokenizer_dir)
    model = tiny_lora(PER_EXAMPLE_SDPA)
    exs = examples()
    padded = model(**PaddedCollator(tok)(exs)).loss.item()
    packed = model(**PackedCollator()(exs)).loss.item()
    assert padded == pytest.approx(packed, rel=1e-5)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_no_position_attends_across_an_example_boundary(implementation):
    model = tiny_lora(implementation).eval()
    exs = examples()
    bounds = PackedCollator()(exs)["cu_seq_lens_q"].tolist()

    def logits(rows: list[dict]) -> torch.Tensor:
        with torch.no_grad():
            return model(**PackedCollator()(rows)).logits[0]

    before = logits(exs)
    for changed in (0, 1, 3):  # the first, one in the middle, a later one
        other = [dict(e) for e in exs]
        other[changed]["input_ids"] = [(t * 7 + 11) % 96 + 3 for t in exs[changed]["input_ids"]]
        after = logits(other)
        for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            if i == changed:
                assert not torch.equal(after[a:b], before[a:b])  # the perturbation is visible where it is
            else:
                assert torch.equal(after[a:b], before[a:b]), (implementation, changed, i)
    # And each example's logits in the row are its logits alone.
    for e, a, b in zip(exs, bounds[:-1], bounds[1:]):
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([e["input_ids"]])).logits[0]
        torch.testing.assert_close(before[a:b], alone, rtol=1e-5, atol=1e-5)


def test_the_boundary_check_sees_a_leak():
    """The same row with an attention_mask of ones: transformers then takes it for one sequence, and the
    later examples' logits change with the earlier ones (what packing must never do)."""
    model = tiny_lora("sdpa").eval()
    exs = examples()
    batch = PackedCollator()(exs)
    other = dict(batch, input_ids=batch["input_ids"].clone())
    other["input_ids"][0, 0] = (other["input_ids"][0, 0] + 1) % 96 + 3
    with torch.no_grad():
        a = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits
        b = model(input_ids=other["input_ids"], attention_mask=torch.ones_like(other["input_ids"])).logits
    second = slice(SHAPES[0][0], SHAPES[0][0] + SHAPES[1][0])
    assert (a[0, second] - b[0, second]).abs().max() > 1e-3


def test_packed_row_layout():
    exs = examples()
    collator = PackedCollator()
    batch = collator(exs)
    ids, labels, pos = (batch[k][0].tolist() for k in ("input_ids", "labels", "position_ids"))
    assert "attention_mask" not in batch and batch["input_ids"].shape == (1, sum(n for n, _ in SHAPES))
    bounds = batch["cu_seq_lens_q"].tolist()
    assert bounds == [0, 7, 19, 20, 24, 33] and batch["max_length_q"] == 12
    for e, a, b in zip(exs, bounds[:-1], bounds[1:]):
        assert ids[a:b] == e["input_ids"] and pos[a:b] == list(range(b - a))
        assert labels[a] == -100 and labels[a + 1:b] == e["labels"][1:]  # prompt -100, reply learned
        if b - a > 1:
            assert labels[b - 1] == EOS  # every example's eos stays a label
    assert collator.efficiency() == 1.0 and collator.real == 33


def test_padding_efficiency_counts_the_built_batches(builtin_tokenizer_dir):
    collator = PaddedCollator(AutoTokenizer.from_pretrained(builtin_tokenizer_dir))
    exs = examples()
    assert collator.efficiency() is None
    first = collator(exs[:2])  # 7 and 12 tokens: padded to 2 x 12
    assert first["input_ids"].shape == (2, 12) and collator.efficiency() == pytest.approx(19 / 24)
    collator(exs[2:] + [dict(exs[0], length=7)])  # 1, 4, 9, 7 tokens: 4 x 9; an extra column is dropped
    assert collator.efficiency() == pytest.approx((19 + 21) / (24 + 36))


def test_refused_attention():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    model.config._attn_implementation = "paged|eager"  # a cache-managed kernel: not for packed training
    with pytest.raises(ParamsError, match=r"train\.packing: .*'paged\|eager'"):
        use_packed_attention(model)

    class OwnCode(LlamaForCausalLM):  # a class outside transformers, as trust_remote_code loads
        pass

    with pytest.raises(ParamsError, match=r"train\.packing: OwnCode runs its own modeling code"):
        use_packed_attention(OwnCode(config))
    # A sliding-window model keeps sdpa, whose packed mask honours the window.
    sliding = Qwen2ForCausalLM(Qwen2Config(vocab_size=128, hidden_size=64, intermediate_size=128,
                                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, use_sliding_window=True,
                                           sliding_window=8, max_window_layers=0))
    assert "sliding_attention" in sliding.config.layer_types and use_packed_attention(sliding) == "sdpa"


def test_params_refuse_packing_with_own_model_code_and_fingerprint_the_new_keys(tmp_path):
    with pytest.raises(ParamsError, match=r"tiny-bf16-single: train\.packing .*trust_remote_code"):
        load_params(params_with(tmp_path, train={"packing": True}, models={"tiny": {"trust_remote_code": True}},
                                matrix={"precision": ["bf16"]}))
    plain = load_params(params_with(tmp_path))
    assert not plain.train.packing and not plain.train.group_by_length
    prints = {variant_fingerprint(load_params(params_with(tmp_path, train=change)), "tiny", "bf16", "single")
              for change in ({}, {"packing": True}, {"group_by_length": True})}
    assert len(prints) == 3
    nf4_only = load_params(params_with(tmp_path, variants={"nf4": {"packing": True}}))
    assert nf4_only.variant_train("nf4").packing and not nf4_only.variant_train("bf16").packing


def test_grouped_sampler_is_seeded_by_seed_and_epoch():
    gen = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, 400, (400,), generator=gen).tolist()
    sampler = GroupedSampler(lengths, 8, seed=42)
    first = list(sampler)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(GroupedSampler(lengths, 8, seed=42)) == first and sorted(first) == list(range(400))
    sampler.set_epoch(1)
    assert list(sampler) != first
    spread = [max(lengths[i] for i in first[k:k + 8]) - min(lengths[i] for i in first[k:k + 8])
              for k in range(0, 400, 8)]
    assert sum(spread) / len(spread) < 40  # random batches of 8 of U(1, 400) spread ~300


STEPS = 8


def run(params, builtin_model_dir, tiny_data_dir, out, resume="never"):
    return train_step.train_variant(params, "tiny", "bf16", "single", builtin_model_dir, tiny_data_dir, out,
                                    resume=resume, checkpoint_dir=out.parent / f"checkpoints-{out.name}")


def test_train_step_packs_and_groups(builtin_model_dir, tiny_data_dir, tmp_path):
    train = {"max_steps": STEPS, "logging_steps": 1, "save_steps": 4}
    padded = run(load_params(params_with(tmp_path, train=train)), builtin_model_dir, tiny_data_dir,
                 tmp_path / "padded")
    packed = run(load_params(params_with(tmp_path, train={**train, "packing": True})), builtin_model_dir,
                 tiny_data_dir, tmp_path / "packed")
    grouped_params = load_params(params_with(tmp_path, train={**train, "group_by_length": True}))
    grouped = run(grouped_params, builtin_model_dir, tiny_data_dir, tmp_path / "grouped")

    lengths = example_lengths(load_from_disk(str(tiny_data_dir / "train")))
    assert min(lengths) < max(lengths)  # else there is no padding to remove
    eff = {k: r.timing["padding_efficiency"] for k, r in (("padded", padded), ("packed", packed),
                                                          ("grouped", grouped))}
    assert eff["packed"] == 1.0 and 0 < eff["padded"] < eff["grouped"] < 1, eff
    # The same batches: the same tokens and (up to bf16 rounding of other shapes) the same losses.
    assert packed.metrics["train_tokens"] == padded.metrics["train_tokens"]
    for a, b in zip(padded.loss_curve, packed.loss_curve, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), (a, b)
    assert packed.model.base_model.model.config._attn_implementation == PER_EXAMPLE_SDPA

    # A grouped run resumed from its checkpoint at step 4 ends exactly where the unbroken one ended.
    unbroken = load_file(tmp_path / "grouped/adapter_model.safetensors")
    resumed = run(grouped_params, builtin_model_dir, tiny_data_dir, tmp_path / "grouped", resume="require")
    assert resumed.timing["resumed_from"] == "checkpoint-4"
    assert resumed.loss_curve == grouped.loss_curve
    again = load_file(tmp_path / "grouped/adapter_model.safetensors")
    assert all(torch.equal(unbroken[k], again[k]) for k in unbroken)
