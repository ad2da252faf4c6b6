"""A tiny ChatGLM3-6b(-base) as the hub delivers it: config.json, safetensors, tokenizer.model, own code.

Field names, parameter names and shapes are ChatGLM3's (`transformer.encoder.layers.N.self_attention.
query_key_value`, fused gate|up `mlp.dense_h_to_4h`, multi-query K/V, ...), the dims tiny. Every Linear's
in/out dim is a multiple of 64, which bitsandbytes' CPU kernels need. The weights are random: built for
exact comparisons, not for sense.

The tokenizer.model is a SentencePiece BPE trained here on generated Chinese + English text with the
settings ChatGLM2/3's own tokenizer.model carries (read from its ModelProto):
  model_type BPE; byte_fallback (ChatGLM3 encodes "\\n" as ▁ + <0x0A>: a byte piece); normalizer
  "identity" (no NFKC: full-width punctuation stays as typed); remove_extra_whitespaces false (runs of spaces
  survive, code keeps its indentation); add_dummy_prefix true (the leading ▁ of "\\n"'s encoding);
  split_digits true (numbers are single digits); unk/bos/eos = <unk>/<s>/</s> at ids 0/1/2, no pad piece
  (ChatGLM pads with unk).
Chosen for the replica, not known to be ChatGLM3's: allow_whitespace_only_pieces (pieces like ▁▁▁▁, so
runs of spaces take the merge path a converter can get wrong) and character_coverage 0.9995 (the rarest
characters of the corpus are left to byte fallback, as rare CJK characters are in the real vocab).

The model's own .py files are placeholders that raise at import: any code path that runs them fails loudly.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import torch

SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
            "<|observation|>")  # ChatGLM3's SPTokenizer appends these after the SentencePiece vocab
DIMS = {"hidden_size": 128, "num_attention_heads": 4, "kv_channels": 32, "multi_query_group_num": 2,
        "ffn_hidden_size": 256, "num_layers": 2, "seq_length": 256}
PLACEHOLDER = ('raise RuntimeError("tests/replicas/chatglm.py: this is the model\'s own code, which nothing may '
               'import or run")\n')
OWN_CODE = ("configuration_chatglm.py", "modeling_chatglm.py", "tokenization_chatglm.py", "quantization.py")

ZH_WORDS = ("我们", "今天", "天气", "很好", "学习", "机器", "模型", "训练", "数据", "中文", "英文", "问题", "回答",
            "时间", "北京", "上海", "公司", "工作", "朋友", "喜欢", "吃饭", "电脑", "手机", "文件", "代码", "程序",
            "人工智能", "自然语言", "处理", "生成", "文本", "语言", "世界", "中国", "大学", "老师", "学生", "历史",
            "经济", "发展", "科学", "技术", "你好", "谢谢", "请问", "如何", "为什么", "可以", "没有", "已经",
            "一个", "这个", "那个", "什么", "非常", "重要", "简单", "方法", "结果", "分析")
ZH_CHARS = "的了是在有和就不人都也很到说要去会着看好自己这上来个们地为子中大小多少天年月日水火山石"
EN_WORDS = ("the", "model", "data", "learning", "language", "token", "hello", "world", "train", "test", "Python",
            "code", "function", "return", "value", "China", "Beijing", "GPU", "memory", "fast", "slow", "answer",
            "question", "please", "thanks", "Tokenizer", "SentencePiece", "LoRA", "fine-tuning", "is", "a",
            "of", "and", "to", "in", "for", "with", "on", "we", "you", "it", "that", "this", "AI")
PUNCT_ZH = "，。！？；：、“”（）"
PUNCT_EN = ",.!?;:()'\"-"


def sentence(rng: random.Random) -> str:
    """One line of the training corpus: Chinese, English or both, with digits, punctuation and spacing."""
    parts: list[str] = []
    for _ in range(rng.randint(3, 12)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(ZH_WORDS) + (rng.choice(ZH_CHARS) if rng.random() < 0.3 else ""))
        elif r < 0.7:
            word = rng.choice(EN_WORDS)
            parts.append(" " + (word.capitalize() if rng.random() < 0.2 else word))
        elif r < 0.8:
            parts.append(" " + str(rng.randint(0, 10 ** rng.randint(1, 6))))
        elif r < 0.9:
            parts.append(rng.choice(PUNCT_ZH if rng.random() < 0.5 else PUNCT_EN))
        elif r < 0.95:
            parts.append(" " * rng.randint(2, 8) + rng.choice(EN_WORDS))  # indentation-like runs of spaces
        else:
            parts.append(rng.choice(ZH_CHARS))
    return "".join(parts).strip() or "你好"


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    """`n` generated bilingual lines (deterministic for a seed)."""
    rng = random.Random(seed)
    return [sentence(rng) for _ in range(n)]


def train_tokenizer(vocab_size: int, seed: int = 0) -> bytes:
    """A SentencePiece model (serialized ModelProto) with ChatGLM3's tokenizer settings (module docstring)."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus(seed=seed)), model_writer=model, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
        remove_extra_whitespaces=False, add_dummy_prefix=True, split_digits=True,
        allow_whitespace_only_pieces=True, character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1, minloglevel=2,
    )
    return model.getvalue()


def config(vocab_size: int, dtype: str) -> dict:
    """ChatGLM3's config.json fields and values, tiny dims; padded_vocab_size a multiple of 64."""
    padded = -(-(vocab_size + len(SPECIALS)) // 64) * 64
    return {
        "_name_or_path": "THUDM/chatglm3-6b-base",
        "model_type": "chatglm",
        "architectures": ["ChatGLMModel"],
        "auto_map": {
            "AutoConfig": "configuration_chatglm.ChatGLMConfig",
            "AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForCausalLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSeq2SeqLM": "modeling_chatglm.ChatGLMForConditionalGeneration",
            "AutoModelForSequenceClassification": "modeling_chatglm.ChatGLMForSequenceClassification",
        },
        "add_bias_linear": False,
        "add_qkv_bias": True,
        "apply_query_key_layer_scaling": True,
        "apply_residual_connection_post_layernorm": False,
        "attention_dropout": 0.0,
        "attention_softmax_in_fp32": True,
        "bias_dropout_fusion": True,
        "ffn_hidden_size": DIMS["ffn_hidden_size"],
        "fp32_residual_connection": False,
        "hidden_dropout": 0.0,
        "hidden_size": DIMS["hidden_size"],
        "kv_channels": DIMS["kv_channels"],
        "layernorm_epsilon": 1e-05,
        "multi_query_attention": True,
        "multi_query_group_num": DIMS["multi_query_group_num"],
        "num_attention_heads": DIMS["num_attention_heads"],
        "num_layers": DIMS["num_layers"],
        "original_rope": True,
        "padded_vocab_size": padded,
        "post_layer_norm": True,
        "rmsnorm": True,
        "seq_length": DIMS["seq_length"],
        "use_cache": True,
        "torch_dtype": dtype,
        "transformers_version": "4.30.2",
        "tie_word_embeddings": False,
        "eos_token_id": 2,
        "pad_token_id": 0,
    }


def weights(cfg: dict, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors under ChatGLM3's parameter names and shapes (RMSNorm weights near 1)."""
    g = torch.Generator().manual_seed(seed)
    h, heads, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["kv_channels"]
    qkv = heads * hd + 2 * cfg["multi_query_group_num"] * hd
    ffn, vocab = cfg["ffn_hidden_size"], cfg["padded_vocab_size"]

    def rand(*shape, scale=0.08):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    def norm():
        return (1.0 + torch.randn(h, generator=g) * 0.1).to(dtype)

    out = {"transformer.embedding.word_embeddings.weight": rand(vocab, h, scale=1.0)}
    # a persistent buffer of ChatGLM's RotaryEmbedding(kv_channels // 2): saved, but unused by its forward
    rot = hd // 2
    out["transformer.rotary_pos_emb.inv_freq"] = (1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)).to(dtype)
    for i in range(cfg["num_layers"]):
        p = f"transformer.encoder.layers.{i}."
        out[p + "input_layernorm.weight"] = norm()
        out[p + "self_attention.query_key_value.weight"] = rand(qkv, h)
        out[p + "self_attention.query_key_value.bias"] = rand(qkv, scale=0.5)
        out[p + "self_attention.dense.weight"] = rand(h, heads * hd)
        out[p + "post_attention_layernorm.weight"] = norm()
        out[p + "mlp.dense_h_to_4h.weight"] = rand(2 * ffn, h)
        out[p + "mlp.dense_4h_to_h.weight"] = rand(h, ffn)
    out["transformer.encoder.final_layernorm.weight"] = norm()
    out["transformer.output_layer.weight"] = rand(vocab, h)
    return out


def tokenizer_config() -> dict:
    """tokenizer_config.json as chatglm3-6b(-base) ships it: the class is its own code."""
    return {
        "name_or_path": "THUDM/chatglm3-6b-base",
        "remove_space": False,
        "do_lower_case": False,
        "tokenizer_class": "ChatGLMTokenizer",
        "auto_map": {"AutoTokenizer": ["tokenization_chatglm.ChatGLMTokenizer", None]},
    }


def build(out: Path, seed: int = 0, vocab_size: int = 1200, dtype: str = "float16",
          shards: int = 2) -> Path:
    """Write the replica into `out` (created) and return it. `dtype` as config.json's torch_dtype names it
    (ChatGLM3 ships float16); weights split over `shards` safetensors files with an index, as the hub's are."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config(vocab_size, dtype)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    tensors = weights(cfg, seed, getattr(torch, dtype))
    names = list(tensors)
    size = -(-len(names) // shards)
    weight_map = {}
    for k in range(shards):
        file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[k * size:(k + 1) * size]}
        save_file(part, str(out / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (out / "tokenizer.model").write_bytes(train_tokenizer(vocab_size, seed))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(), indent=2) + "\n", encoding="utf-8")
    for name in OWN_CODE:
        (out / name).write_text(PLACEHOLDER, encoding="utf-8")
    return out
