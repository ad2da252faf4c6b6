"""Qwen-1 -> native Qwen2 (workflow/convert/qwen.py) on the tiny replica (tests/replicas/qwen1.py).

The converted model's logits are compared with a plain-torch forward of Qwen-1's architecture written here
from the Qwen-1-named weights; the converted tokenizer with the `tiktoken` package's encoding of the same
qwen.tiktoken, as Qwen-1's own tokenizer builds it.
"""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from replicas import qwen1 as replica

from workflow.convert import qwen
from workflow.convert.shards import INDEX, source_tensors
from workflow.errors import StepError
from workflow.modeling import load_tokenizer
from workflow.templates import TEMPLATES
from workflow.tokenize import encode

TOLERANCE = 1e-4
# tokenization_qwen.py's PAT_STR and special tokens, transcribed here independently of the converter
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
           r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{i}|>" for i in range(205)]
TEXTS = [
    "你好，世界！Hello, world.",
    "第一行\n第二行\n\n  缩进的 code:\n    return value  # 注释",
    "   leading spaces and trailing   ",
    "digits 1234567890 和 3.14159，年份 2024 年",
    "emoji 😀🚀 and rare 鑫龘 characters",
    "contractions: don't, it's, WE'RE, I'll, they've, she'd, O'Neil's, 'SOMETHING' 'Tis 'LL'D",
    "MiXeD CaSe Tokenizer LoRA fine-tuning GPU",
    "tab\tseparated\tfields\r\nwindows line\r\n\r\n",
    "<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\nhi<|im_end|><|endoftext|>",
    "text around <|extra_0|> and <|extra_204|>, and a broken <|im_start| marker",
    "e\u0301 composed by NFC, Å vs A\u030a",
    "!!!!!!!! ...... ?? " + " " * 17 + "x\n\n\n   \n",
    "\n",
    " ",
    "",
]


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, Path]:
    """(replica dir, its conversion): float32 weights, so the comparisons are exact up to summation order."""
    root = tmp_path_factory.mktemp("qwen1")
    src = replica.build(root / "src", seed=0, dtype="float32")
    dst = root / "dst"
    dst.mkdir()
    info = qwen.convert(src, dst, 2 * 10**9)
    assert info["converted_from"] == "qwen" and info["architecture"] == "Qwen2ForCausalLM"
    assert info["tensors"] == len(qwen.expected_shapes(qwen.dimensions(src, config_of(src))))
    assert info["tokenizer"] == "qwen.tiktoken -> tokenizer.json"
    return src, dst


@pytest.fixture(scope="module")
def enc(converted):
    """Qwen-1's own encoder: tiktoken over the ranks file, specials from len(ranks) in Qwen-1's order."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(converted[0] / "qwen.tiktoken"))
    specials = {t: len(ranks) + i for i, t in enumerate(SPECIALS)}
    return tiktoken.Encoding("qwen-replica", pat_str=PAT_STR, mergeable_ranks=ranks, special_tokens=specials)


@pytest.fixture(scope="module")
def tok(converted):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(converted[1]), trust_remote_code=False)


# --- Qwen-1's forward, written from its modeling_qwen.py ------------------------------------------------


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Qwen-1's apply_rotary_pos_emb: t * cos + rotate_half(t) * sin, rotate_half = cat(-second, first)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


def qwen1_logits(src: Path, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """QWenLMHeadModel's logits (eval, seq <= seq_length: dynamic NTK alpha 1, logn 1) from the Qwen-1 weights.
    Positions are 0..T-1 whatever the mask (QWenModel's default); masked keys get finfo.min added."""
    cfg = config_of(src)
    w = dict(source_tensors(src))
    heads, hd, hidden = cfg["num_attention_heads"], cfg["kv_channels"], cfg["hidden_size"]
    eps = cfg["layer_norm_epsilon"]
    batch, length = ids.shape
    inv_freq = 1.0 / (cfg["rotary_emb_base"] ** (torch.arange(0, hd, 2).float() / hd))
    freqs = torch.outer(torch.arange(length).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)[None, :, None, :]  # (1, T, 1, hd), Qwen-1's layout
    cos, sin = emb.cos(), emb.sin()
    allowed = torch.tril(torch.ones(length, length, dtype=torch.bool))[None, None] & mask.bool()[:, None, None, :]
    h = w["transformer.wte.weight"][ids]
    for i in range(cfg["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        x = rms_norm(h, w[p + "ln_1.weight"], eps)
        qkv = F.linear(x, w[p + "attn.c_attn.weight"], w[p + "attn.c_attn.bias"])
        q, k, v = (t.view(batch, length, heads, hd) for t in qkv.split(hidden, dim=2))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.permute(0, 2, 1, 3) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / hd**0.5
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
        ctx = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * hd)
        h = h + F.linear(ctx, w[p + "attn.c_proj.weight"])
        x = rms_norm(h, w[p + "ln_2.weight"], eps)
        a1, a2 = F.linear(x, w[p + "mlp.w1.weight"]), F.linear(x, w[p + "mlp.w2.weight"])
        h = h + F.linear(a1 * F.silu(a2), w[p + "mlp.c_proj.weight"])  # QWenMLP: w1(x) * silu(w2(x))
    return F.linear(rms_norm(h, w["transformer.ln_f.weight"], eps), w["lm_head.weight"])


def batch(vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three sequences of 24 ids (special ids among them); the last left-padded by 7."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[2, :7] = 0
    return ids, mask


def assert_matches_reference(src: Path, dst: Path) -> None:
    from transformers import AutoModelForCausalLM, Qwen2ForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(dst), trust_remote_code=False, dtype=torch.float32).eval()
    assert type(model) is Qwen2ForCausalLM
    ids, mask = batch(config_of(src)["vocab_size"])
    with torch.no_grad():
        got = model(input_ids=ids, attention_mask=mask).logits
    want = qwen1_logits(src, ids, mask)
    valid = mask.bool()
    diff = (got[valid] - want[valid]).abs().max().item()
    assert diff <= TOLERANCE, f"max |logit diff| {diff}"
    assert want[valid].abs().max().item() > 0.5  # the logits carry signal, not ~0 everywhere


# --- model ----------------------------------------------------------------------------------------------


def test_logits_equal_qwen1_forward(converted):
    src, dst = converted
    assert_matches_reference(src, dst)
    assert not list(dst.glob("*.py")) and "auto_map" not in config_of(dst)  # nothing of Qwen-1's code carried


def test_sharded_output_loads_and_matches(converted, tmp_path):
    src, _ = converted
    dst = tmp_path / "dst"
    dst.mkdir()
    qwen.convert(src, dst, 300_000)
    shards = sorted(dst.glob("model-*.safetensors"))
    assert len(shards) > 3 and not (dst / "model.safetensors").exists()
    index = json.loads((dst / INDEX).read_text(encoding="utf-8"))
    assert set(index["weight_map"].values()) == {s.name for s in shards}
    assert_matches_reference(src, dst)


def test_config_fields(converted):
    src, dst = converted
    cfg, gen = config_of(dst), json.loads((dst / "generation_config.json").read_text(encoding="utf-8"))
    n = len((src / "qwen.tiktoken").read_text(encoding="utf-8").splitlines())
    assert cfg["model_type"] == "qwen2" and cfg["architectures"] == ["Qwen2ForCausalLM"]
    assert cfg["intermediate_size"] == config_of(src)["intermediate_size"] // 2 == replica.DIMS["mlp_width"]
    assert cfg["num_key_value_heads"] == cfg["num_attention_heads"] == replica.DIMS["num_attention_heads"]
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0}
    assert cfg["max_position_embeddings"] == replica.DIMS["seq_length"]
    assert cfg["use_sliding_window"] is False and cfg["sliding_window"] is None
    assert cfg["tie_word_embeddings"] is False and cfg["dtype"] == "float32"
    assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (n + 2, n)
    assert gen["eos_token_id"] == [n, n + 2] and gen["pad_token_id"] == n


def test_stored_dtype_when_no_flag_is_set(tmp_path):
    """Qwen-1_8B-Chat ships bf16 weights with bf16/fp16/fp32 all false: the converted model is bf16."""
    src = replica.build(tmp_path / "src", seed=3, dtype="bfloat16")
    assert not any(config_of(src)[f] for f in ("bf16", "fp16", "fp32"))
    dst = tmp_path / "dst"
    dst.mkdir()
    assert qwen.convert(src, dst, 2 * 10**9)["dtype"] == "bfloat16"
    assert config_of(dst)["dtype"] == "bfloat16"
    assert {t.dtype for _, t in source_tensors(dst)} == {torch.bfloat16}


# --- tokenizer ------------------------------------------------------------------------------------------


def test_ids_equal_tiktoken(tok, enc, converted):
    """Through AutoTokenizer (transformers 5 loads model_type qwen2 as Qwen2Tokenizer, which rebuilds the
    normalizer and pre-tokenizer itself) and through tokenizer.json alone, as other tools read it."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(str(converted[1] / "tokenizer.json"))
    texts = TEXTS + replica.corpus(300, seed=11)  # unseen lines of the replica's training distribution
    for text in texts:
        want = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")  # QWenTokenizer: NFC first
        assert tok(text, add_special_tokens=False)["input_ids"] == want, repr(text)
        assert tok(text)["input_ids"] == want  # nothing implicit added
        assert raw.encode(text).ids == want, repr(text)
    # the split's case-insensitive contractions only show with merges across "'S" that the tiny vocab lacks
    split = json.loads(raw.to_str())["pre_tokenizer"]["pretokenizers"][0]
    assert split["pattern"] == {"Regex": PAT_STR} and split["behavior"] == "Isolated"
    assert tok("e\u0301", add_special_tokens=False)["input_ids"] != enc.encode("e\u0301")  # NFC does apply


def test_special_tokens(tok, enc, converted):
    n = enc.n_vocab - len(SPECIALS)
    for i, name in enumerate(SPECIALS):
        assert tok.convert_tokens_to_ids(name) == n + i == enc.encode_single_token(name)
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.unk_token) == ("<|im_end|>", "<|endoftext|>", None, None)
    assert tok.model_max_length == replica.DIMS["seq_length"]
    tok_cfg = json.loads((converted[1] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "auto_map" not in tok_cfg


def test_decode_round_trip(tok, enc):
    for text in TEXTS:
        norm = unicodedata.normalize("NFC", text)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == norm == enc.decode(ids)
    ids = tok("<|im_start|>user\nhi<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "user\nhi"


def test_qwen_template_equals_chat_template(converted):
    tok = load_tokenizer(converted[1], template="qwen")
    assert tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    row = {"system": "你是一个助手。", "instruction": "用一句话介绍 LoRA", "input": "要简短",
           "output": "LoRA 是一种低秩微调方法。"}
    ids, _, start = encode([row], tok, TEMPLATES["qwen"])[0]
    messages = [{"role": "system", "content": row["system"]},
                {"role": "user", "content": row["instruction"] + "\n" + row["input"]}]
    assert ids[:start] == tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    messages.append({"role": "assistant", "content": row["output"]})
    full = tok.apply_chat_template(messages, return_dict=False)
    assert ids + tok("\n", add_special_tokens=False)["input_ids"] == full  # ChatML ends each message with \n


# --- refusals -------------------------------------------------------------------------------------------


def edited(src: Path, tmp_path: Path, **fields) -> Path:
    """A copy of the replica with config.json fields changed (None deletes one)."""
    out = tmp_path / "edited"
    shutil.copytree(src, out)
    cfg = {k: v for k, v in {**config_of(src), **fields}.items() if v is not None or k not in fields}
    (out / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    return out


@pytest.mark.parametrize("field,value", [
    ("rotary_pct", 0.5),
    ("no_bias", False),
    ("tie_word_embeddings", True),
    ("emb_dropout_prob", 0.1),
    ("kv_channels", 16),
    ("intermediate_size", 511),
    ("quantization_config", {"quant_method": "gptq", "bits": 4}),
    ("fp16", True),  # with fp32 true already
    ("hidden_size", None),
])
def test_refuses_what_it_cannot_convert_exactly(converted, tmp_path, field, value):
    src = edited(converted[0], tmp_path, **{field: value})
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(StepError) as err:
        qwen.convert(src, dst, 2 * 10**9)
    message = str(err.value)
    assert "\n" not in message and f"{src}/config.json" in message and field in message


def test_refuses_foreign_tensors_and_bad_ranks(converted, tmp_path):
    from safetensors.torch import save_file

    src = edited(converted[0], tmp_path)
    save_file({"transformer.h.0.mlp.w1.bias": torch.zeros(replica.DIMS["mlp_width"])},
              str(src / "model-00002-of-00002.safetensors"))  # replaces a shard: also leaves tensors missing
    index = json.loads((src / INDEX).read_text(encoding="utf-8"))
    index["weight_map"]["transformer.h.0.mlp.w1.bias"] = "model-00002-of-00002.safetensors"
    (src / INDEX).write_text(json.dumps(index), encoding="utf-8")
    (tmp_path / "a").mkdir()
    with pytest.raises(StepError, match=r"transformer\.h\.0\.mlp\.w1\.bias"):
        qwen.convert(src, tmp_path / "a", 2 * 10**9)

    src = edited(converted[0], tmp_path / "b")
    lines = (src / "qwen.tiktoken").read_text(encoding="utf-8").splitlines()
    (src / "qwen.tiktoken").write_text("\n".join(lines[:300] + lines[301:]) + "\n", encoding="utf-8")
    (tmp_path / "b" / "dst").mkdir()
    with pytest.raises(StepError, match=r"qwen\.tiktoken: the ranks are not 0\.\."):
        qwen.convert(src, tmp_path / "b" / "dst", 2 * 10**9)
