"""ChatGLM2/3 -> native Glm (workflow/convert/chatglm.py) on the tiny replica (tests/replicas/chatglm.py).

The converted model's logits are compared with a plain-torch forward of ChatGLM's architecture written here
from the ChatGLM-named weights; the converted tokenizer with SentencePiece's own encoder.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from replicas import chatglm as replica

from workflow.convert import chatglm
from workflow.convert.shards import INDEX, source_tensors
from workflow.errors import StepError
from workflow.modeling import load_tokenizer
from workflow.templates import TEMPLATES
from workflow.tokenize import encode

TOLERANCE = 1e-4
TEXTS = [
    "你好，世界！Hello, world.",
    "第一行\n第二行\n\n  缩进的 code:\n    return value  # 注释",
    "   leading spaces and trailing   ",
    "digits 1234567890 和 3.14159，年份 2024 年",
    "emoji 😀🚀 and rare 鑫龘 characters",
    "MiXeD CaSe Tokenizer LoRA fine-tuning GPU",
    "tab\tseparated\tfields\r\nwindows line",
    "sop eop [gMASK] <|user|> typed as text",
    "哈哈哈哈哈哈哈 !!!!!!!! ...... " + " " * 17 + "x",  # runs: where equal-piece merges overlap
    "\n",
    " ",
    "",
]


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(replica dir, its conversion): float32 weights, so the comparisons are exact up to summation order."""
    root = tmp_path_factory.mktemp("chatglm")
    src = replica.build(root / "src", seed=0, dtype="float32")
    dst = root / "dst"
    dst.mkdir()
    info = chatglm.convert(src, dst, 2 * 10**9)
    assert info["converted_from"] == "chatglm" and info["architecture"] == "GlmForCausalLM"
    assert info["tensors"] == len(chatglm.expected_shapes(chatglm.dimensions(src, config_of(src))))
    return src, dst


@pytest.fixture(scope="module")
def sp(converted):
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(converted[0] / "tokenizer.model"))


@pytest.fixture(scope="module")
def tok(converted):
    return load_tokenizer(converted[1], template="chatglm3")


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


def chatglm_weights(src: Path) -> dict[str, torch.Tensor]:
    return {name: t.float() for name, t in source_tensors(src)}


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """ChatGLM's RMSNorm."""
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope_cache(cfg: dict, seq: int) -> torch.Tensor:
    """ChatGLM's RotaryEmbedding(kv_channels // 2).forward_impl: [seq, n_elem / 2, (cos, sin)], base
    10000 x rope_ratio."""
    n_elem = cfg["kv_channels"] // 2
    base = 10000 * cfg.get("rope_ratio", 1)
    theta = 1.0 / (base ** (torch.arange(0, n_elem, 2, dtype=torch.float) / n_elem))
    angles = torch.outer(torch.arange(seq, dtype=torch.float), theta)
    return torch.stack([angles.cos(), angles.sin()], dim=-1)


def apply_rope(x: torch.Tensor, cache: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """ChatGLM's apply_rotary_pos_emb on x [batch, seq, heads, head_dim]: the first 2 x cache-width dims
    rotate as interleaved pairs (x[2i], x[2i+1]); the rest pass. interleaved=False pairs x[i] with
    x[i + half] instead (Llama's layout), for checking the comparison notices a wrong layout."""
    b, s, n, _ = x.shape
    rot_dim = cache.shape[-2] * 2
    rot, keep = x[..., :rot_dim], x[..., rot_dim:]
    if interleaved:
        pairs = rot.reshape(b, s, n, rot_dim // 2, 2)
        even, odd = pairs[..., 0], pairs[..., 1]
    else:
        even, odd = rot[..., : rot_dim // 2], rot[..., rot_dim // 2:]
    cos, sin = cache[None, :s, None, :, 0], cache[None, :s, None, :, 1]
    out = torch.stack([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
    out = out.flatten(3) if interleaved else torch.cat([out[..., 0], out[..., 1]], dim=-1)
    return torch.cat([out, keep], dim=-1)


def chatglm_logits(w: dict[str, torch.Tensor], cfg: dict, ids: torch.Tensor, interleaved: bool = True):
    """ChatGLM2/3's forward (no padding, positions 0..seq-1) in plain torch from its own weight names."""
    b, s = ids.shape
    heads, hd, groups = cfg["num_attention_heads"], cfg["kv_channels"], cfg["multi_query_group_num"]
    eps = cfg["layernorm_epsilon"]
    cache = rope_cache(cfg, s)
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    x = w["transformer.embedding.word_embeddings.weight"][ids]
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        y = rms_norm(x, w[p + "input_layernorm.weight"], eps)
        mixed = y @ w[p + "self_attention.query_key_value.weight"].T + w[p + "self_attention.query_key_value.bias"]
        q, k, v = mixed.split([heads * hd, groups * hd, groups * hd], dim=-1)
        q = apply_rope(q.reshape(b, s, heads, hd), cache, interleaved)
        k = apply_rope(k.reshape(b, s, groups, hd), cache, interleaved)
        v = v.reshape(b, s, groups, hd)
        # multi-query: each K/V group is repeated for its heads // groups consecutive query heads
        k = k.unsqueeze(-2).expand(b, s, groups, heads // groups, hd).reshape(b, s, heads, hd)
        v = v.unsqueeze(-2).expand(b, s, groups, heads // groups, hd).reshape(b, s, heads, hd)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(hd)
        probs = scores.masked_fill(~causal, float("-inf")).float().softmax(dim=-1)
        context = torch.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, s, heads * hd)
        x = x + context @ w[p + "self_attention.dense.weight"].T
        y = rms_norm(x, w[p + "post_attention_layernorm.weight"], eps)
        gate, up = (y @ w[p + "mlp.dense_h_to_4h.weight"].T).chunk(2, dim=-1)  # swiglu: silu(x[0]) * x[1]
        x = x + (F.silu(gate) * up) @ w[p + "mlp.dense_4h_to_h.weight"].T
    x = rms_norm(x, w["transformer.encoder.final_layernorm.weight"], eps)
    return x @ w["transformer.output_layer.weight"].T


def sample_ids(cfg: dict, batch: int = 3, seq: int = 48, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg["padded_vocab_size"], (batch, seq), generator=g)


def glm_logits(dst: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dst), trust_remote_code=False, dtype=torch.float32)
    assert type(model).__name__ == "GlmForCausalLM"
    with torch.no_grad():
        return model(input_ids=ids).logits


def max_diff(src: Path, dst: Path, seed: int = 0) -> float:
    cfg = config_of(src)
    ids = sample_ids(cfg, seed=seed)
    with torch.no_grad():
        want = chatglm_logits(chatglm_weights(src), cfg, ids)
    return (glm_logits(dst, ids) - want).abs().max().item()


# --- model ----------------------------------------------------------------------------------------------


def test_logits_equal_chatglm_reference(converted):
    src, dst = converted
    assert max_diff(src, dst) <= TOLERANCE


def test_reference_notices_a_wrong_rotary_layout(converted):
    """The comparison is sensitive: ChatGLM's forward with Llama-style (half-split) rotation differs."""
    src, dst = converted
    cfg = config_of(src)
    ids = sample_ids(cfg)
    with torch.no_grad():
        wrong = chatglm_logits(chatglm_weights(src), cfg, ids, interleaved=False)
    assert (glm_logits(dst, ids) - wrong).abs().max().item() > 100 * TOLERANCE


def test_config_is_native_glm(converted, sp):
    src, dst = converted
    cfg, glm = config_of(src), config_of(dst)
    assert glm["model_type"] == "glm" and glm["architectures"] == ["GlmForCausalLM"] and "auto_map" not in glm
    assert (glm["vocab_size"], glm["hidden_size"], glm["intermediate_size"], glm["num_hidden_layers"]) == (
        cfg["padded_vocab_size"], cfg["hidden_size"], cfg["ffn_hidden_size"], cfg["num_layers"])
    assert (glm["num_attention_heads"], glm["num_key_value_heads"], glm["head_dim"]) == (
        cfg["num_attention_heads"], cfg["multi_query_group_num"], cfg["kv_channels"])
    assert glm["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert glm["max_position_embeddings"] == cfg["seq_length"] and glm["rms_norm_eps"] == cfg["layernorm_epsilon"]
    assert glm["attention_bias"] is True and glm["tie_word_embeddings"] is False
    assert (glm["eos_token_id"], glm["pad_token_id"], glm["dtype"]) == (2, 0, "float32")
    assert not list(dst.glob("*.py")) and not (dst / "tokenizer.model").exists()
    sp_size = sp.get_piece_size()
    gen = json.loads((dst / "generation_config.json").read_text(encoding="utf-8"))
    assert gen["eos_token_id"] == [2, sp_size + 6, sp_size + 8] and gen["pad_token_id"] == 0


def test_sharded_output_loads_and_matches(converted, tmp_path):
    src, _ = converted
    dst = tmp_path / "dst"
    dst.mkdir()
    chatglm.convert(src, dst, 300_000)
    shards = sorted(dst.glob("model-*-of-*.safetensors"))
    index = json.loads((dst / INDEX).read_text(encoding="utf-8"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {p.name for p in shards}
    assert not (dst / "model.safetensors").exists()
    assert max_diff(src, dst, seed=1) <= TOLERANCE


def test_float16_checkpoint_keeps_its_dtype(tmp_path):
    """ChatGLM3 ships float16: the converted tensors stay float16, and match the reference upcast."""
    from safetensors.torch import load_file

    src = replica.build(tmp_path / "src", seed=3, dtype="float16")
    dst = tmp_path / "dst"
    dst.mkdir()
    chatglm.convert(src, dst, 2 * 10**9)
    assert config_of(dst)["dtype"] == "float16"
    assert {t.dtype for t in load_file(str(dst / "model.safetensors")).values()} == {torch.float16}
    assert max_diff(src, dst) <= TOLERANCE


def test_rope_ratio_scales_the_base(converted, tmp_path):
    """ChatGLM3-32k's rope_ratio multiplies the base; Glm gets rope_theta = 10000 x rope_ratio."""
    src = tmp_path / "src"
    shutil.copytree(converted[0], src)
    cfg = config_of(src) | {"rope_ratio": 50}
    (src / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    dst = tmp_path / "dst"
    dst.mkdir()
    chatglm.convert(src, dst, 2 * 10**9)
    assert config_of(dst)["rope_parameters"]["rope_theta"] == 500000.0
    assert max_diff(src, dst) <= TOLERANCE


# --- tokenizer ------------------------------------------------------------------------------------------


def test_ids_equal_sentencepiece(tok, sp):
    for text in TEXTS + replica.corpus(300, seed=7):
        assert tok(text)["input_ids"] == sp.encode(text), text  # default add_special_tokens: nothing added


def test_specials_newline_and_pad(tok, sp):
    n = sp.get_piece_size()
    for k, name in enumerate(chatglm.SPECIALS):
        assert tok.convert_tokens_to_ids(name) == n + k and tok.convert_ids_to_tokens(n + k) == name
    assert tok("\n", add_special_tokens=False)["input_ids"] == [sp.piece_to_id("▁"), sp.piece_to_id("<0x0A>")]
    assert (tok.eos_token, tok.eos_token_id) == ("</s>", sp.eos_id())
    assert (tok.bos_token, tok.bos_token_id) == ("<s>", sp.bos_id())
    assert tok.unk_token_id == tok.pad_token_id == sp.unk_id() == 0


def test_decode_round_trips(tok, sp):
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text == sp.decode(ids)
    ids = [tok.convert_tokens_to_ids("[gMASK]"), tok.convert_tokens_to_ids("sop")] + sp.encode("你好")
    assert tok.decode(ids, skip_special_tokens=True) == "你好"


def test_chatglm3_template_equals_build_chat_input(tok, sp):
    """workflow.tokenize with the chatglm3 template gives ChatGLM3's build_chat_input ids + reply + eos."""
    special = {name: tok.convert_tokens_to_ids(name) for name in chatglm.SPECIALS}
    nl = sp.encode("\n")

    def turn(role: str, text: str) -> list[int]:
        return [special[role]] + nl + sp.encode(text)

    rows = [
        {"instruction": "把下面的句子翻译成英文", "input": "今天天气很好。", "output": "The weather is nice today."},
        {"instruction": "What is 12 + 30?", "output": "42", "history": [["你好", "你好！有什么可以帮你？"]]},
    ]
    prefix = [special["[gMASK]"], special["sop"]]
    prompts = [
        prefix + turn("<|user|>", "把下面的句子翻译成英文\n今天天气很好。") + [special["<|assistant|>"]],
        prefix + turn("<|user|>", "你好") + turn("<|assistant|>", "你好！有什么可以帮你？")
        + turn("<|user|>", "What is 12 + 30?") + [special["<|assistant|>"]],
    ]
    for row, prompt, (ids, labels, start) in zip(rows, prompts, encode(rows, tok, TEMPLATES["chatglm3"])):
        reply = nl + sp.encode(row["output"]) + [sp.eos_id()]
        assert ids == prompt + reply and start == len(prompt)
        assert labels[start:] == reply and set(labels[: len(prefix) + 1]) == {-100}


# --- refusals -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("rmsnorm", False), ("apply_residual_connection_post_layernorm", True), ("post_layer_norm", False),
    ("add_bias_linear", True), ("original_rope", False), ("quantization_bit", 4), ("pre_seq_len", 128),
])
def test_unsupported_layout_is_refused(converted, tmp_path, field, value):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_of(converted[0]) | {field: value}), encoding="utf-8")
    with pytest.raises(StepError, match=f"config.json: {field} is") as e:
        chatglm.convert(src, tmp_path / "dst", 2 * 10**9)
    assert "\n" not in str(e.value)


def test_position_scaled_rope_is_refused(converted, tmp_path):
    """ChatGLM2-32k divides positions by rope_ratio (its code says so): no base change reproduces that."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(config_of(converted[0]) | {"rope_ratio": 16}), encoding="utf-8")
    (src / "modeling_chatglm.py").write_text("seq_idx = torch.arange(seq_len) / self.rope_ratio\n")
    with pytest.raises(StepError, match="rope_ratio 16 scales positions"):
        chatglm.convert(src, tmp_path / "dst", 2 * 10**9)


def test_unknown_tensor_is_refused(converted, tmp_path):
    from safetensors.torch import save_file

    src = tmp_path / "src"
    shutil.copytree(converted[0], src)
    save_file({"transformer.prefix_encoder.embedding.weight": torch.zeros(4, 64)}, str(src / "extra.safetensors"))
    index = json.loads((src / INDEX).read_text(encoding="utf-8"))
    index["weight_map"]["transformer.prefix_encoder.embedding.weight"] = "extra.safetensors"
    (src / INDEX).write_text(json.dumps(index), encoding="utf-8")
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(StepError, match="transformer.prefix_encoder.embedding.weight is not part"):
        chatglm.convert(src, dst, 2 * 10**9)


def test_unsupported_sentencepiece_setting_is_refused(converted, tmp_path):
    from sentencepiece import sentencepiece_model_pb2

    src = tmp_path / "src"
    shutil.copytree(converted[0], src)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((src / "tokenizer.model").read_bytes())
    proto.normalizer_spec.remove_extra_whitespaces = True
    (src / "tokenizer.model").write_bytes(proto.SerializeToString())
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(StepError, match="tokenizer.model: remove_extra_whitespaces"):
        chatglm.convert(src, dst, 2 * 10**9)
