"""Qwen-1 (config.json `model_type: qwen`, e.g. Qwen-1_8B-Chat) -> transformers' native `Qwen2ForCausalLM`.

Qwen-1 is Qwen2's architecture under other names: RMSNorm pre-norm blocks, a fused QKV projection with bias,
full multi-head attention, rotate-half RoPE over the whole head, SwiGLU MLP without biases, untied lm_head.
Weights are renamed and the fused QKV split; config.json is derived field by field; qwen.tiktoken (the
ranks of tiktoken's byte-level BPE) becomes a tokenizer.json whose ids equal tiktoken's, with Qwen-1's
special tokens after the ranks. Layouts the mapping would get wrong are refused. Nothing of the model's own
Python is imported or run: only config.json, the safetensors and qwen.tiktoken are read.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from workflow.convert.checks import check_complete, number, read_json_config, shape_checker
from workflow.convert.shards import write_converted
from workflow.errors import StepError

MODEL_TYPE = "qwen"
ARCHITECTURE = "Qwen2ForCausalLM"
RANKS_FILE = "qwen.tiktoken"
# tokenization_qwen.py's PAT_STR (tiktoken's pre-split); Qwen2's tokenizer splits with the same pattern
PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
# tokenization_qwen.py: these, in this order, from SPECIAL_START_ID = 151643, the size of Qwen-1's ranks
# file; here from len(ranks), the same id for the real file
SPECIALS = (ENDOFTEXT, IM_START, IM_END) + tuple(f"<|extra_{i}|>" for i in range(205))
# The ChatML template Qwen2 instruct models ship (what the project's `qwen` template reproduces)
CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# config.json field -> (QWenConfig's default, the one value the conversion handles, why)
LAYOUT = {
    "rotary_pct": (1.0, 1.0, "Qwen2 rotates every dim of a head"),
    # no_bias false gives attn.c_proj and the MLP's w1/w2/c_proj biases (c_attn has one either way)
    "no_bias": (True, True, "Qwen2's o_proj and MLP projections have no bias"),
    "tie_word_embeddings": (False, False, "Qwen-1's lm_head is its own matrix"),
    "emb_dropout_prob": (0.0, 0.0, "Qwen2 has no dropout after the embedding, which changes training"),
}
# Not listed, as they change nothing Qwen2 computes within seq_length (see write_configs for the last two):
# scale_attn_weights (QWenAttention sets self.scale_attn_weights = True whatever config.json says: scores are
# always divided by sqrt(head_dim), as Qwen2's), softmax_in_fp32 / use_flash_attn (precision and kernels),
# use_cache_quantization / use_cache_kernel (an inference-time int8 KV cache, not the weights),
# use_dynamic_ntk and use_logn_attn.
LAYER = re.compile(r"transformer\.h\.(\d+)\.(.+)")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def convert(src: Path, dst: Path, max_shard_bytes: int) -> dict:
    """Write a native Qwen2 model dir into `dst` (exists, empty) from the Qwen-1 checkpoint in `src`; return
    what source.json records about the conversion."""
    src, dst = Path(src), Path(dst)
    cfg = read_config(src)
    dims = dimensions(src, cfg)
    ranks = read_ranks(src)
    if dims["vocab"] < len(ranks) + len(SPECIALS):
        raise StepError(f"{src}/config.json: vocab_size {dims['vocab']} is smaller than {RANKS_FILE}'s "
                        f"{len(ranks)} ranks + {len(SPECIALS)} specials; the files are not from one checkpoint")
    write_tokenizer(src, dst, ranks, dims)
    stored: list[torch.dtype] = []
    written = write_converted(src, dst, tensor_mapping(src, dims, stored), max_shard_bytes)
    check_complete(src, written, expected_shapes(dims))
    dtype = weights_dtype(src, cfg, stored)
    write_configs(dst, dims, len(ranks), dtype)
    return {
        "converted_from": MODEL_TYPE,
        "architecture": ARCHITECTURE,
        "tensors": len(written),
        "parameters": sum(written.values()),
        "dtype": dtype,
        "tokenizer": f"{RANKS_FILE} -> tokenizer.json",
        "specials": {t: len(ranks) + k for k, t in enumerate(SPECIALS[:3])},
    }


# --- config ---------------------------------------------------------------------------------------------


def read_config(src: Path) -> dict:
    """src/config.json, checked to be a Qwen-1 layout this module converts."""
    path = src / "config.json"
    cfg = read_json_config(src, MODEL_TYPE)
    for field, (default, needed, why) in LAYOUT.items():
        value = cfg.get(field, default)
        if value is None or value != needed:
            raise StepError(f"{path}: {field} is {value!r}; the Qwen2 conversion needs {needed!r} ({why}); "
                            "use a Qwen-1 checkpoint of the standard layout")
    if cfg.get("quantization_config"):
        method = cfg["quantization_config"].get("quant_method", "?") if isinstance(
            cfg["quantization_config"], dict) else "?"
        raise StepError(f"{path}: quantization_config ({method}) marks a pre-quantized checkpoint (Qwen-1 Int4/Int8)"
                        "; use the unquantized checkpoint (the workflow quantizes at load time)")
    flags = [f for f in DTYPES if cfg.get(f)]
    if len(flags) > 1:
        raise StepError(f"{path}: {' and '.join(flags)} are both true (Qwen-1 allows one); keep the one matching "
                        "the weights")
    return cfg


def dimensions(src: Path, cfg: dict) -> dict:
    """The sizes the mapping and Qwen2's config need, from Qwen-1's field names."""
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "kv_channels", "seq_length"):
        if number(src, cfg, field) < 1:
            raise StepError(f"{src}/config.json: {field} is {cfg[field]}; re-download the model")
    hidden, heads = number(src, cfg, "hidden_size"), number(src, cfg, "num_attention_heads")
    kv_channels = number(src, cfg, "kv_channels")
    # QWenAttention splits c_attn's output at hidden_size and its heads at hidden_size // heads, while
    # c_attn is 3 * kv_channels * heads wide and RoPE covers kv_channels: one head dim only if they agree
    if kv_channels * heads != hidden:
        raise StepError(f"{src}/config.json: kv_channels {kv_channels} x num_attention_heads {heads} is not "
                        f"hidden_size {hidden}; Qwen-1's own code cannot run this config either")
    ffn2 = number(src, cfg, "intermediate_size")
    if ffn2 % 2:
        raise StepError(f"{src}/config.json: intermediate_size {ffn2} is odd; Qwen-1 stores twice its MLP "
                        "width there (w1, w2 are intermediate_size // 2 wide); re-download the model")
    return {
        "vocab": number(src, cfg, "vocab_size"), "hidden": hidden, "heads": heads, "head_dim": kv_channels,
        "ffn": ffn2 // 2,  # QWenMLP: ff_dim_in = config.intermediate_size // 2
        "layers": number(src, cfg, "num_hidden_layers"), "seq": number(src, cfg, "seq_length"),
        "eps": number(src, cfg, "layer_norm_epsilon", 1e-6, float),
        "theta": number(src, cfg, "rotary_emb_base", 10000, float),
        "dropout": number(src, cfg, "attn_dropout_prob", 0.0, float),
        "init": number(src, cfg, "initializer_range", 0.02, float),
    }


def weights_dtype(src: Path, cfg: dict, stored: list[torch.dtype]) -> str:
    """The dtype the converted model loads in: Qwen-1's bf16/fp16/fp32 flag (its model casts itself to it),
    else config.json's torch_dtype, else the stored embedding's dtype (with no flag Qwen-1 picks one per
    device: bf16 where supported, which is how Qwen-1_8B-Chat's weights are stored)."""
    flag = next((DTYPES[f] for f in DTYPES if cfg.get(f)), None)
    dtype = flag or cfg.get("torch_dtype") or cfg.get("dtype") or str(stored[0]).removeprefix("torch.")
    if dtype not in DTYPES.values():
        raise StepError(f"{src}/config.json: the weights' dtype {dtype!r} is not bfloat16, float16 or float32; "
                        "set bf16, fp16 or fp32 to true to choose one")
    return dtype


def write_configs(dst: Path, dims: dict, n_ranks: int, dtype: str) -> None:
    """config.json (Qwen2Config) and generation_config.json (ChatML's stops) into `dst`."""
    from transformers import GenerationConfig, Qwen2Config

    eot, im_end = n_ranks + SPECIALS.index(ENDOFTEXT), n_ranks + SPECIALS.index(IM_END)
    qwen2 = Qwen2Config(
        architectures=[ARCHITECTURE],
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["heads"],  # Qwen-1 is plain multi-head attention
        hidden_act="silu",
        rms_norm_eps=dims["eps"],
        # Qwen-1's RotaryEmbedding: inv_freq = 1 / base^(2i/kv_channels), cos/sin of cat(freqs, freqs) with
        # rotate-half, as Qwen2's default rope. Beyond that Qwen-1 stretches context at inference only:
        # use_dynamic_ntk raises the base by ntk_alpha = 2^ceil(log2(len / seq_length) + 1) - 1, floored at 1,
        # and use_logn_attn scales queries by log_seq_length(position) for positions > seq_length (1 below).
        # Both are off in training and are exactly 1 for every sequence up to seq_length, so dropping them is
        # exact there; max_position_embeddings = seq_length says the converted model has no longer context.
        rope_parameters={"rope_type": "default", "rope_theta": dims["theta"]},
        max_position_embeddings=dims["seq"],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=dims["layers"],
        attention_dropout=dims["dropout"],  # Qwen-1's attn_dropout_prob: dropout on attention probabilities
        initializer_range=dims["init"],
        tie_word_embeddings=False,
        bos_token_id=eot,  # as Qwen2's configs; the tokenizer adds no bos (neither does Qwen-1's)
        eos_token_id=im_end,
        pad_token_id=eot,
        use_cache=True,
        dtype=dtype,
    )
    qwen2.save_pretrained(str(dst))
    # Qwen-1's chat() stops at <|im_end|> (ChatML) and generate() at <|endoftext|>: both stop generation
    GenerationConfig(eos_token_id=[eot, im_end], pad_token_id=eot, bos_token_id=eot).save_pretrained(str(dst))


# --- weights --------------------------------------------------------------------------------------------


def expected_shapes(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every Qwen2 tensor the conversion must write, with its shape."""
    h, ffn, vocab = dims["hidden"], dims["ffn"], dims["vocab"]
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(dims["layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn), p + "self_attn.o_proj.weight": (h, h)}
        for proj in "qkv":
            out |= {p + f"self_attn.{proj}_proj.weight": (h, h), p + f"self_attn.{proj}_proj.bias": (h,)}
    return out


# Qwen-1's name inside a block -> Qwen2's (the fused c_attn is split separately)
LAYER_NAMES = {
    "ln_1.weight": "input_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    # QWenMLP.forward: c_proj(w1(x) * silu(w2(x))); Qwen2MLP: down_proj(silu(gate_proj(x)) * up_proj(x)).
    # So w2, the one through silu, is the gate and w1 is up.
    "mlp.w2.weight": "mlp.gate_proj.weight",
    "mlp.w1.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "transformer.wte.weight": "model.embed_tokens.weight",
    "transformer.ln_f.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
# buffers an older save may hold, which Qwen-1 itself ignores on load and recomputes
BUFFERS = ("attn.masked_bias", "rotary_emb.inv_freq")


def tensor_mapping(src: Path, dims: dict, stored: list[torch.dtype]):
    """The (name, tensor) -> Qwen2 tensors function `write_converted` applies to every source tensor;
    appends the embedding's dtype to `stored`."""
    shapes = expected_shapes(dims)
    h = dims["hidden"]

    checked = shape_checker(src, shapes)

    def mapping(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith(BUFFERS):
            return
        if name in TOP_NAMES:
            if name == "transformer.wte.weight":
                stored.append(tensor.dtype)
            yield checked(name, TOP_NAMES[name], tensor)
            return
        match = LAYER.fullmatch(name)
        rest = match.group(2) if match else None
        if rest in LAYER_NAMES:
            yield checked(name, f"model.layers.{match.group(1)}.{LAYER_NAMES[rest]}", tensor)
        elif rest in ("attn.c_attn.weight", "attn.c_attn.bias"):
            kind = rest.rsplit(".", 1)[1]
            if tensor.shape[0] != 3 * h:
                raise StepError(f"{src}: tensor {name} has {tensor.shape[0]} rows, config.json implies 3 x {h}; "
                                "the weights do not belong to this config.json")
            # QWenAttention: query, key, value = c_attn(x).split(hidden_size), then each viewed as
            # (heads, head_dim): the row blocks [q | k | v] with each head's dims contiguous, as Qwen2's
            for proj, part in zip("qkv", torch.split(tensor, h, dim=0)):
                yield checked(name, f"model.layers.{match.group(1)}.self_attn.{proj}_proj.{kind}", part)
        else:
            raise StepError(f"{src}: tensor {name} is not part of the Qwen-1 layout this conversion maps "
                            "(quantized weights, or a bias no_bias: true rules out); use the plain Qwen-1 "
                            "checkpoint")

    return mapping


# --- tokenizer ------------------------------------------------------------------------------------------


def read_ranks(src: Path) -> dict[bytes, int]:
    """qwen.tiktoken (lines `base64(token bytes) rank`), checked to be a complete byte-level BPE vocab."""
    path = src / RANKS_FILE
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise StepError(f"{path}: cannot be read ({e.strerror}); Qwen-1's tokenizer is this file: "
                        "re-download the model") from None
    ranks: dict[bytes, int] = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise StepError(f"{path}: line {n} is not `base64-token rank`; re-download the model") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise StepError(f"{path}: the ranks are not 0..{len(ranks) - 1}, each once (duplicate tokens or "
                        "gaps); re-download the model")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:
        raise StepError(f"{path}: {len(missing)} single bytes (e.g. 0x{missing[0]:02x}) have no rank, so some "
                        "text cannot be encoded; not a byte-level BPE vocab")
    return ranks


def byte_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which tokenizers' ByteLevel uses: printable Latin-1 bytes
    stand for themselves, the others (controls, space, ...) for 256, 257, ... in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """tiktoken's byte-pair merge of `token` using only ranks < `below`: join the adjacent pair whose join
    ranks lowest (the leftmost on ties) until none is left."""
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 1:
        best, at = below, -1
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], below)
            if rank < best:
                best, at = rank, i
        if at < 0:
            break
        parts[at:at + 2] = [parts[at] + parts[at + 1]]
    return parts


def bpe_merges(src: Path, ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merges, in rank order, that make a rank-ordered BPE reproduce tiktoken's: the token of rank r
    comes from the two parts tiktoken's merge leaves of its bytes when only ranks < r may join."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise StepError(f"{src}/{RANKS_FILE}: token of rank {rank} ({token!r}) is not a merge of two "
                            "lower-ranked tokens; not a BPE ranks file")
        merges.append((parts[0], parts[1]))
    return merges


def backend(src: Path, ranks: dict[bytes, int]):
    """The `tokenizers.Tokenizer` equal to Qwen-1's tokenizer (tiktoken over `ranks`, NFC first)."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    table = byte_chars()

    def chars(token: bytes) -> str:
        return "".join(table[b] for b in token)

    vocab = {chars(token): rank for token, rank in ranks.items()}
    merges = [(chars(a), chars(b)) for a, b in bpe_merges(src, ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None,
                               continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                               byte_fallback=False))
    tok.normalizer = normalizers.NFC()  # QWenTokenizer.tokenize: unicodedata.normalize("NFC", text) first
    # tiktoken splits with PAT_STR, then merges the UTF-8 bytes of each piece; ByteLevel without its own
    # regex only maps bytes to characters (no prefix space)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()  # bytes back to text; invalid UTF-8 replaced, as Qwen-1's errors="replace"
    # Qwen-1's tokenize() uses allowed_special="all": the special tokens typed in text are recognised
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_tokenizer(src: Path, dst: Path, ranks: dict[bytes, int], dims: dict) -> None:
    """tokenizer.json + tokenizer_config.json (with the ChatML chat_template) into `dst`."""
    from transformers import PreTrainedTokenizerFast

    tok = backend(src, ranks)
    got = [tok.token_to_id(t) for t in SPECIALS]
    if got != list(range(len(ranks), len(ranks) + len(SPECIALS))):  # a special that is also a rank keeps its id
        raise StepError(f"{src}/{RANKS_FILE}: Qwen-1's special tokens would get ids {got[:3]}..., not "
                        f"{len(ranks)}..{len(ranks) + len(SPECIALS) - 1}; the file is not Qwen-1's")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        # Qwen-1's tokenizer has no eos (nor bos, pad): its chat() stops at <|im_end|>, the ChatML stop the
        # project's `qwen` template trains, so that is eos; <|endoftext|> pads (pad = eos would mask the stop)
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        bos_token=None,  # nothing is added in front: Qwen-1 prepends no bos, ChatML starts with <|im_start|>
        unk_token=None,  # byte-level: every text has ids
        additional_special_tokens=list(SPECIALS[1:]),
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,  # decode gives the bytes' text back, as tiktoken's decode
        errors="replace",
        model_max_length=dims["seq"],
    )
    fast.save_pretrained(str(dst))
