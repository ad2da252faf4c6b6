"""The builtin tiny Llama: tokenizer, shapes, pre-training, determinism, loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from workflow.builtin import BOS, CHAT_TOKENS, EOS, PAD, UNK, build_builtin
from workflow.params import BuiltinModel

TEXT = "Human: 把这个汉字翻译成英文。\n猫\n\nAssistant: cat</s>  37 + 5 = 42. 三十七写成中文!\t«»"
SMALL = dict(hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2, vocab_size=512,
             max_position_embeddings=64, pretrain_steps=4, pretrain_batch_size=4, pretrain_lr=1e-3,
             pretrain_seq_len=16, corpus_size=200)


@pytest.fixture(scope="module")
def tok(builtin_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_model_dir)


@pytest.fixture(scope="module")
def model(builtin_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(builtin_model_dir).eval()


def test_special_tokens_are_single_ids(tok):
    ids = {t: tok.convert_tokens_to_ids(t) for t in (BOS, EOS, PAD, UNK, *CHAT_TOKENS)}
    assert len(set(ids.values())) == len(ids)
    for t, i in ids.items():
        assert tok(t, add_special_tokens=False).input_ids == [i], t
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ids[BOS], ids[EOS], ids[PAD])
    chat = tok("<|im_start|>user\nhi<|im_end|>[INST] x [/INST]", add_special_tokens=False).input_ids
    assert {ids["<|im_start|>"], ids["<|im_end|>"], ids["[INST]"], ids["[/INST]"]} <= set(chat)
    assert ids["sop"] not in tok("isopod sops", add_special_tokens=False).input_ids  # only as a whole word


def test_no_implicit_bos_eos(tok):
    for flag in (False, True):
        ids = tok("hello world", add_special_tokens=flag).input_ids
        assert tok.bos_token_id not in ids and tok.eos_token_id not in ids


def test_round_trip_chinese_english(tok):
    ids = tok(TEXT, add_special_tokens=False).input_ids
    assert tok.decode(ids) == TEXT
    assert tok.unk_token_id not in ids
    assert len(ids) < len(TEXT.encode()) // 2  # merges learned, not raw bytes


def test_linear_dims_multiple_of_64(model, tok):
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 * model.config.num_hidden_layers + 1  # q k v o gate up down per layer + lm_head
    for m in linears:
        assert m.in_features % 64 == 0 and m.out_features % 64 == 0, m
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= len(tok)
    assert not model.config.tie_word_embeddings
    assert model.config.eos_token_id == tok.eos_token_id == model.generation_config.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id == model.generation_config.pad_token_id


def test_pretraining_learned_the_corpus(builtin_model_dir, model, tok):
    info = json.loads((builtin_model_dir / "pretrain.json").read_text())
    assert info["loss_end"] < 0.6 * info["loss_start"], info
    assert info["num_parameters"] == model.num_parameters() < 1_000_000
    ids = tok("3 + 4 = 7.", return_tensors="pt", add_special_tokens=False).input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert loss < 0.5 * math.log(model.config.vocab_size)  # far better than uniform on a corpus fact


def test_generate_runs(model, tok):
    ids = tok("3 + 4 =", return_tensors="pt", add_special_tokens=False).input_ids
    out = model.generate(ids, max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1]


def test_deterministic_for_a_seed(tmp_path):
    spec = BuiltinModel(**SMALL)
    infos = [build_builtin("t", spec, seed, tmp_path / f"{n}") for n, seed in (("a", 1), ("b", 1), ("c", 2))]
    a, b, c = (load_file(tmp_path / n / "model.safetensors") for n in "abc")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a/tokenizer.json").read_bytes() == (tmp_path / "b/tokenizer.json").read_bytes()
    assert (tmp_path / "a/pretrain.json").read_bytes() == (tmp_path / "b/pretrain.json").read_bytes()
    assert infos[0] == infos[1]
