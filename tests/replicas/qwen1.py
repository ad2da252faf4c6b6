"""A tiny Qwen-1 (Qwen-1_8B-Chat) as the hub delivers it: config.json, safetensors shards, qwen.tiktoken, own code.

Field names, parameter names and shapes are Qwen-1's (`transformer.h.N.attn.c_attn` fused QKV with bias,
`mlp.w1`/`mlp.w2`/`mlp.c_proj`, config.json's `intermediate_size` twice the MLP width, bf16/fp16/fp32 all
false as shipped, ...), the dims tiny. Every Linear's in/out dim is a multiple of 64, which bitsandbytes'
CPU kernels need. The weights are random: built for exact comparisons, not for sense.

qwen.tiktoken is made here the way tiktoken vocabularies are: the 256 single bytes, then byte-pair merges
learned on generated Chinese + English text pre-split with Qwen-1's PAT_STR, each new token ranked after
the ones it joins. The corpus is segmented with tiktoken's own rule (join the lowest-ranked adjacent pair),
so the ranks are the consistent kind tiktoken's BPE and a converter expect.

The model's own .py files are placeholders that raise at import: any code path that runs them fails loudly.
"""

from __future__ import annotations

import base64
import functools
import itertools
import json
import random
from collections import Counter
from pathlib import Path

import torch

PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")  # tokenization_qwen.py's
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>") + tuple(f"<|extra_{i}|>" for i in range(205))
DIMS = {"hidden_size": 128, "num_attention_heads": 4, "kv_channels": 32, "mlp_width": 256,
        "num_hidden_layers": 2, "seq_length": 256}
MERGES = 700  # learned merges after the 256 bytes
PLACEHOLDER = ('raise RuntimeError("tests/replicas/qwen1.py: this is the model\'s own code, which nothing may '
               'import or run")\n')
OWN_CODE = ("configuration_qwen.py", "modeling_qwen.py", "tokenization_qwen.py", "qwen_generation_utils.py",
            "cpp_kernels.py")

ZH = ("我们", "今天", "天气", "很好", "学习", "机器", "模型", "训练", "数据", "中文", "问题", "回答", "北京",
      "上海", "朋友", "喜欢", "代码", "程序", "人工智能", "自然语言", "处理", "生成", "文本", "语言", "世界",
      "你好", "谢谢", "请问", "如何", "为什么", "可以", "没有", "一个", "这个", "什么", "非常", "重要", "的", "了")
EN = ("the", "model", "data", "learning", "language", "token", "hello", "world", "train", "test", "Python",
      "code", "function", "return", "value", "China", "GPU", "memory", "answer", "question", "please", "is",
      "a", "of", "and", "to", "in", "for", "with", "we", "you", "it", "that", "this", "AI", "don't", "it's",
      "we're", "I'll", "they've")
PUNCT = "，。！？：、（）,.!?;:()'\"-#=*/"


def line(rng: random.Random) -> str:
    """One line of the corpus: Chinese, English, digits, punctuation, runs of spaces, newlines."""
    parts: list[str] = []
    for _ in range(rng.randint(3, 12)):
        r = rng.random()
        if r < 0.35:
            parts.append(rng.choice(ZH))
        elif r < 0.7:
            word = rng.choice(EN)
            parts.append(" " + (word.capitalize() if rng.random() < 0.2 else word))
        elif r < 0.8:
            parts.append(" " + str(rng.randint(0, 10 ** rng.randint(1, 5))))
        elif r < 0.9:
            parts.append(rng.choice(PUNCT) * rng.randint(1, 3))
        else:
            parts.append(rng.choice(("\n", "\n\n", " " * rng.randint(2, 8), "\t", "    ")))
    return "".join(parts)


def corpus(n: int = 1500, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [line(rng) for _ in range(n)]


def segment(word: bytes, ranks: dict[bytes, int]) -> list[bytes]:
    """tiktoken's merge of one pre-split piece: join the lowest-ranked adjacent pair (leftmost) until none."""
    parts = [word[i:i + 1] for i in range(len(word))]
    while len(parts) > 1:
        pairs = [(ranks.get(parts[i] + parts[i + 1]), i) for i in range(len(parts) - 1)]
        pairs = [p for p in pairs if p[0] is not None]
        if not pairs:
            break
        _, i = min(pairs)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.lru_cache(maxsize=4)
def train_ranks(merges: int = MERGES, seed: int = 0) -> tuple[tuple[bytes, int], ...]:
    """(token bytes, rank) of a byte-level BPE learned on `corpus(seed)`: 256 bytes, then `merges` joins of
    the most frequent adjacent pair (ties: the larger pair) whose join is not a token yet."""
    import regex

    pat = regex.compile(PAT_STR)
    words = Counter(piece.encode() for text in corpus(seed=seed) for piece in pat.findall(text))
    ranks = {bytes([b]): b for b in range(256)}
    segs = {w: segment(w, ranks) for w in words}
    pairs: Counter = Counter()

    def count(word: bytes, sign: int) -> None:
        seg = segs[word]
        for pair in itertools.pairwise(seg):
            pairs[pair] += sign * words[word]
            if pairs[pair] <= 0:
                del pairs[pair]

    for w in words:
        count(w, 1)
    for _ in range(merges):
        best = max(((n, p) for p, n in pairs.items() if p[0] + p[1] not in ranks), default=None)
        if best is None:
            break
        a, b = best[1]
        ranks[a + b] = len(ranks)
        for w in [w for w in words if a + b in w]:  # re-segment, as tiktoken would, every word it can touch
            count(w, -1)
            segs[w] = segment(w, ranks)
            count(w, 1)
    return tuple(ranks.items())


def ranks_file(ranks: dict[bytes, int]) -> str:
    """qwen.tiktoken's format: `base64(token bytes) rank` per line, in rank order."""
    return "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in sorted(ranks.items(), key=lambda x: x[1]))


def qwen_config(vocab_size: int, dtype: str, **overrides) -> dict:
    """config.json as Qwen-1_8B-Chat ships it (its field names and defaults), with tiny dims."""
    cfg = {
        "architectures": ["QWenLMHeadModel"],
        "auto_map": {"AutoConfig": "configuration_qwen.QWenConfig",
                     "AutoModelForCausalLM": "modeling_qwen.QWenLMHeadModel"},
        "attn_dropout_prob": 0.0,
        "bf16": False,
        "emb_dropout_prob": 0.0,
        "fp16": False,
        "fp32": False,
        "hidden_size": DIMS["hidden_size"],
        "intermediate_size": 2 * DIMS["mlp_width"],  # Qwen-1 stores twice the MLP width (w1, w2 are half)
        "initializer_range": 0.02,
        "kv_channels": DIMS["kv_channels"],
        "layer_norm_epsilon": 1e-06,
        "max_position_embeddings": DIMS["seq_length"],
        "model_type": "qwen",
        "no_bias": True,
        "num_attention_heads": DIMS["num_attention_heads"],
        "num_hidden_layers": DIMS["num_hidden_layers"],
        "onnx_safe": None,
        "rotary_emb_base": 10000,
        "rotary_pct": 1.0,
        "scale_attn_weights": True,
        "seq_length": DIMS["seq_length"],
        "softmax_in_fp32": False,
        "tie_word_embeddings": False,
        "tokenizer_class": "QWenTokenizer",
        "transformers_version": "4.32.0",
        "use_cache": True,
        "use_cache_kernel": False,
        "use_cache_quantization": False,
        "use_dynamic_ntk": True,
        "use_flash_attn": "auto",
        "use_logn_attn": True,
        "vocab_size": vocab_size,
    }
    if dtype != "bfloat16":  # as shipped no flag is set (Qwen-1 picks bf16 per device, the stored dtype)
        cfg[{"float16": "fp16", "float32": "fp32"}[dtype]] = True
    return {**cfg, **overrides}


def weights(vocab: int, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Random tensors under Qwen-1's parameter names and shapes (nn.Linear: weight is (out, in))."""
    g = torch.Generator().manual_seed(seed)
    h, ffn = DIMS["hidden_size"], DIMS["mlp_width"]
    proj = DIMS["kv_channels"] * DIMS["num_attention_heads"]

    def rand(*shape: int, std: float = 0.08) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std).to(dtype)

    def norm() -> torch.Tensor:  # RMSNorm gains near 1, not exactly, so a dropped norm weight shows
        return (1 + 0.1 * torch.randn(h, generator=g)).to(dtype)

    out = {"transformer.wte.weight": rand(vocab, h, std=0.5)}
    for i in range(DIMS["num_hidden_layers"]):
        p = f"transformer.h.{i}."
        out |= {p + "ln_1.weight": norm(),
                p + "attn.c_attn.weight": rand(3 * proj, h), p + "attn.c_attn.bias": rand(3 * proj, std=0.3),
                p + "attn.c_proj.weight": rand(h, proj),
                p + "ln_2.weight": norm(),
                p + "mlp.w1.weight": rand(ffn, h), p + "mlp.w2.weight": rand(ffn, h),
                p + "mlp.c_proj.weight": rand(h, ffn)}
    out |= {"transformer.ln_f.weight": norm(), "lm_head.weight": rand(vocab, h)}
    return out


def write_shards(out: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two safetensors shards + index, as Qwen-1_8B-Chat ships (model-0000N-of-00002.safetensors)."""
    from safetensors.torch import save_file

    names = list(tensors)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:]), 1):
        fname = f"model-{k:05d}-of-00002.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(out / fname), metadata={"format": "pt"})
        weight_map |= {n: fname for n in part}
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def build(out: Path, seed: int = 0, dtype: str = "bfloat16", merges: int = MERGES, **config) -> Path:
    """Write the replica into `out` (created) and return it; `config` overrides config.json fields."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ranks = dict(train_ranks(merges, seed))
    n_vocab = len(ranks) + len(SPECIALS)
    vocab_size = -(-n_vocab // 64) * 64  # padded as Qwen-1's 151936 is, and a multiple of 64
    cfg = qwen_config(vocab_size, dtype, **config)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
    write_shards(out, weights(vocab_size, seed, getattr(torch, dtype)))
    (out / "qwen.tiktoken").write_text(ranks_file(ranks), encoding="utf-8")
    tok_cfg = {"model_max_length": DIMS["seq_length"], "tokenizer_class": "QWenTokenizer",
               "auto_map": {"AutoTokenizer": ["tokenization_qwen.QWenTokenizer", None]}}
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n", encoding="utf-8")
    eot = len(ranks)  # Qwen-1's generation_config: eos = pad = <|endoftext|>, ChatML sampling settings
    gen = {"chat_format": "chatml", "eos_token_id": eot, "pad_token_id": eot, "max_window_size": 6144,
           "max_new_tokens": 512, "do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1,
           "transformers_version": "4.31.0"}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n", encoding="utf-8")
    for name in OWN_CODE:
        (out / name).write_text(PLACEHOLDER, encoding="utf-8")
    return out
