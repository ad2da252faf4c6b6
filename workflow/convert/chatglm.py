"""ChatGLM2/3 (config.json `model_type: chatglm`) -> transformers' native Glm (`GlmForCausalLM`).

ChatGLM2/3 is Glm's architecture under other names: RMSNorm pre-norm blocks, fused QKV with bias and
multi-query K/V, interleaved RoPE on the first half of each head, fused SwiGLU, untied output layer. Weights
are renamed and the fused QKV split; config.json is derived field by field; tokenizer.model (SentencePiece
BPE) becomes a tokenizer.json whose ids equal SentencePiece's own, with ChatGLM3's specials appended.
Layouts the mapping would get wrong are refused. Nothing of the model's own Python is imported or run.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import torch

from workflow.convert.checks import check_complete, number, read_json_config, shape_checker
from workflow.convert.shards import write_converted
from workflow.errors import StepError

MODEL_TYPE = "chatglm"
ARCHITECTURE = "GlmForCausalLM"
# ChatGLM3's SPTokenizer appends these, in this order, after the SentencePiece vocab (ids sp_size + k)
SPECIALS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop", "<|system|>", "<|user|>", "<|assistant|>",
            "<|observation|>")
STOP_ROLES = ("<|user|>", "<|observation|>")  # ChatGLM3's chat() stops at eos and at these
# config.json field -> (ChatGLMConfig's default, the one value the conversion handles, why). Not listed, as
# they change no function Glm computes: fp32_residual_connection (precision only), hidden_dropout (training
# only, 0 in ChatGLM3), apply_query_key_layer_scaling and attention_softmax_in_fp32 (see write_configs).
LAYOUT = {
    "rmsnorm": (True, True, "LayerNorm blocks have no Glm counterpart (Glm uses RMSNorm)"),
    "apply_residual_connection_post_layernorm": (False, False, "Glm's residual is the block input"),
    "post_layer_norm": (True, True, "Glm always applies a final norm"),
    "add_bias_linear": (False, False, "Glm's dense/MLP projections have no bias"),
    "original_rope": (True, True, "only ChatGLM's original RoPE layout is mapped"),
}
LAYER = re.compile(r"transformer\.encoder\.layers\.(\d+)\.(.+)")


def convert(src: Path, dst: Path, max_shard_bytes: int) -> dict:
    """Write a native Glm model dir into `dst` (exists, empty) from the ChatGLM2/3 checkpoint in `src`;
    return what source.json records about the conversion."""
    src, dst = Path(src), Path(dst)
    cfg = read_config(src)
    dims = dimensions(src, cfg)
    check_rope(src, cfg, dims["rope_ratio"])
    sp_size = write_tokenizer(src, dst, dims)
    if dims["vocab"] < sp_size + len(SPECIALS):
        raise StepError(f"{src}/config.json: padded_vocab_size {dims['vocab']} is smaller than tokenizer.model's "
                        f"{sp_size} pieces + {len(SPECIALS)} specials; the files are not from one checkpoint")
    written = write_converted(src, dst, tensor_mapping(src, dims), max_shard_bytes)
    check_complete(src, written, expected_shapes(dims))
    write_configs(dst, dims, sp_size)
    return {
        "converted_from": MODEL_TYPE,
        "architecture": ARCHITECTURE,
        "tensors": len(written),
        "parameters": sum(written.values()),
        "tokenizer": "tokenizer.model -> tokenizer.json",
        "specials": {t: sp_size + k for k, t in enumerate(SPECIALS)},
    }


# --- config ---------------------------------------------------------------------------------------------


def read_config(src: Path) -> dict:
    """src/config.json, checked to be a ChatGLM2/3 layout this module converts."""
    path = src / "config.json"
    cfg = read_json_config(src, MODEL_TYPE)
    for field, (default, needed, why) in LAYOUT.items():
        if bool(cfg.get(field, default)) != needed:
            raise StepError(f"{path}: {field} is {cfg.get(field)!r}; the Glm conversion needs {needed} ({why}); "
                            "use a ChatGLM2/3 checkpoint of the standard layout")
    if cfg.get("quantization_bit"):
        raise StepError(f"{path}: quantization_bit is {cfg['quantization_bit']}, a checkpoint quantized by its "
                        "own code; use the unquantized checkpoint (the workflow quantizes at load time)")
    if cfg.get("pre_seq_len") is not None:
        raise StepError(f"{path}: pre_seq_len is {cfg['pre_seq_len']} (a P-tuning prefix encoder); Glm has "
                        "none: use the base checkpoint without the prefix")
    return cfg


def check_rope(src: Path, cfg: dict, rope_ratio: float) -> None:
    """ChatGLM3 scales RoPE's base by rope_ratio; ChatGLM2-32k's code instead divides the positions by it,
    which a base change does not reproduce. Only the code text says which: it is read, never run."""
    if rope_ratio == 1:
        return
    code = src / "modeling_chatglm.py"
    text = code.read_text(encoding="utf-8", errors="replace") if code.is_file() else ""
    if re.search(r"/\s*self\.rope_ratio", text) and not re.search(r"base\s*\*\s*self\.rope_ratio", text):
        raise StepError(f"{src}/config.json: rope_ratio {cfg['rope_ratio']} scales positions in this model's "
                        "code (ChatGLM2-32k), which the Glm conversion does not map; use a ChatGLM3 checkpoint")


def dimensions(src: Path, cfg: dict) -> dict:
    """The sizes the mapping and Glm's config need, from ChatGLM's field names (ChatGLMConfig's defaults)."""
    sizes = ("num_attention_heads", "hidden_size", "num_layers", "ffn_hidden_size", "padded_vocab_size",
             "seq_length")
    for field in sizes:
        if number(src, cfg, field) < 1:
            raise StepError(f"{src}/config.json: {field} is {cfg[field]}; re-download the model")
    heads, hidden = number(src, cfg, "num_attention_heads"), number(src, cfg, "hidden_size")
    dims = {"hidden": hidden, "heads": heads, "layers": number(src, cfg, "num_layers"),
            "ffn": number(src, cfg, "ffn_hidden_size"), "vocab": number(src, cfg, "padded_vocab_size"),
            "seq": number(src, cfg, "seq_length"),
            # ChatGLM's head dim is kv_channels (hidden / heads when unset) ...
            "head_dim": number(src, cfg, "kv_channels", hidden // heads),
            "eps": number(src, cfg, "layernorm_epsilon", 1e-5, float),
            "rope_ratio": number(src, cfg, "rope_ratio", 1, float),
            "qkv_bias": bool(cfg.get("add_qkv_bias", False)),
            "eos": number(src, cfg, "eos_token_id", 2), "pad": number(src, cfg, "pad_token_id", 0),
            "dropout": number(src, cfg, "attention_dropout", 0.0, float),
            # transformers 4 wrote torch_dtype, 5 writes dtype; ChatGLM3 ships float16
            "dtype": cfg.get("torch_dtype") or cfg.get("dtype") or "float16"}
    if dims["dtype"] not in ("float16", "bfloat16", "float32"):
        raise StepError(f"{src}/config.json: torch_dtype {dims['dtype']!r} is not float16, bfloat16 or float32; "
                        "set it to the dtype of the checkpoint's weights")
    # ... and its K/V heads are the multi-query groups (every head has its own K/V without multi-query)
    groups = number(src, cfg, "multi_query_group_num", 1) if cfg.get("multi_query_attention") else heads
    if groups < 1 or heads % groups:
        raise StepError(f"{src}/config.json: num_attention_heads {heads} is not a multiple of "
                        f"multi_query_group_num {groups}; the checkpoint is inconsistent")
    dims["kv_heads"] = groups
    return dims


def write_configs(dst: Path, dims: dict, sp_size: int) -> None:
    """config.json (GlmConfig) and generation_config.json (ChatGLM3's stop ids) into `dst`."""
    from transformers import GenerationConfig, GlmConfig

    eos, pad = dims["eos"], dims["pad"]
    glm = GlmConfig(
        architectures=[ARCHITECTURE],
        vocab_size=dims["vocab"],
        hidden_size=dims["hidden"],
        intermediate_size=dims["ffn"],
        num_hidden_layers=dims["layers"],
        num_attention_heads=dims["heads"],
        num_key_value_heads=dims["kv_heads"],
        head_dim=dims["head_dim"],
        hidden_act="silu",  # ChatGLM's swiglu: silu(first half) * second half
        rms_norm_eps=dims["eps"],
        max_position_embeddings=dims["seq"],
        # ChatGLM rotates kv_channels // 2 dims of each head in interleaved pairs, as Glm does with
        # partial_rotary_factor 0.5; ChatGLM3 multiplies the base 10000 by rope_ratio
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0 * dims["rope_ratio"],
                         "partial_rotary_factor": 0.5},
        attention_bias=dims["qkv_bias"],  # Glm: bias on q/k/v only, none on o_proj, as add_qkv_bias
        attention_dropout=dims["dropout"],
        # apply_query_key_layer_scaling multiplies by layer_number then divides it out again, and Glm's
        # softmax runs in fp32: neither it nor attention_softmax_in_fp32 changes what is computed
        tie_word_embeddings=False,  # ChatGLM's output_layer is a separate matrix
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=None,  # ChatGLM never prepends <s>: its prompts start with [gMASK]sop
        use_cache=True,
        dtype=dims["dtype"],
    )
    glm.save_pretrained(str(dst))
    stops = [eos] + [sp_size + SPECIALS.index(t) for t in STOP_ROLES]
    GenerationConfig(eos_token_id=stops, pad_token_id=pad).save_pretrained(str(dst))


# --- weights --------------------------------------------------------------------------------------------


def expected_shapes(dims: dict) -> dict[str, tuple[int, ...]]:
    """Every Glm tensor the conversion must write, with its shape."""
    h, hd, ffn, vocab = dims["hidden"], dims["head_dim"], dims["ffn"], dims["vocab"]
    q, kv = dims["heads"] * hd, dims["kv_heads"] * hd
    out = {"model.embed_tokens.weight": (vocab, h), "model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    for i in range(dims["layers"]):
        p = f"model.layers.{i}."
        out |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
                p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
                p + "mlp.gate_up_proj.weight": (2 * ffn, h), p + "mlp.down_proj.weight": (h, ffn)}
        if dims["qkv_bias"]:
            out |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                    p + "self_attn.v_proj.bias": (kv,)}
    return out


# ChatGLM's name inside a layer -> Glm's (the fused QKV is split separately)
LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    # ChatGLM's swiglu is silu(chunk 0) * chunk 1 and Glm's MLP is chunk 1 * silu(chunk 0): the same order
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
TOP_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}


def tensor_mapping(src: Path, dims: dict):
    """The (name, tensor) -> Glm tensors function `write_converted` applies to every source tensor."""
    shapes = expected_shapes(dims)
    q, kv = dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]

    checked = shape_checker(src, shapes)

    def mapping(name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        if name.endswith("rotary_pos_emb.inv_freq"):
            return  # a saved buffer ChatGLM's forward recomputes; Glm derives it from rope_parameters
        if name in TOP_NAMES:
            yield checked(name, TOP_NAMES[name], tensor)
            return
        match = LAYER.fullmatch(name)
        rest = match.group(2) if match else None
        if rest in LAYER_NAMES:
            yield checked(name, f"model.layers.{match.group(1)}.{LAYER_NAMES[rest]}", tensor)
        elif rest in ("self_attention.query_key_value.weight", "self_attention.query_key_value.bias"):
            kind = rest.rsplit(".", 1)[1]
            if tensor.shape[0] != q + 2 * kv:
                raise StepError(f"{src}: tensor {name} has {tensor.shape[0]} rows, config.json implies "
                                f"{q} + 2 x {kv}; the weights do not belong to this config.json")
            # ChatGLM splits the fused output as [all query heads | key groups | value groups], each head's
            # dims contiguous: exactly Glm's q/k/v projections (K/V head g serves query heads of group g)
            for proj, part in zip("qkv", torch.split(tensor, [q, kv, kv], dim=0)):
                yield checked(name, f"model.layers.{match.group(1)}.self_attn.{proj}_proj.{kind}", part)
        else:
            raise StepError(f"{src}: tensor {name} is not part of the ChatGLM2/3 layout this conversion maps "
                            "(a prefix encoder or quantized weights?); use the plain ChatGLM2/3 checkpoint")

    return mapping


# --- tokenizer ------------------------------------------------------------------------------------------


def read_spm(src: Path):
    """src/tokenizer.model as a SentencePiece ModelProto, refused unless this conversion reproduces it."""
    from google.protobuf.message import DecodeError
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    path = src / "tokenizer.model"
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except (OSError, DecodeError) as e:
        raise StepError(f"{path}: cannot be read as a SentencePiece model ({e}); re-download the model") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    kinds = {t.type for t in proto.pieces}
    refusals = [
        (trainer.model_type != spm_pb2.TrainerSpec.BPE, f"model_type {trainer.model_type} (only BPE is mapped)"),
        (not trainer.byte_fallback, "byte_fallback is false (unknown characters would need unk handling)"),
        (bool(norm.precompiled_charsmap), f"normalizer {norm.name!r} rewrites characters (only identity)"),
        (norm.remove_extra_whitespaces, "remove_extra_whitespaces is true (runs of spaces would collapse)"),
        (not norm.escape_whitespaces or trainer.treat_whitespace_as_suffix, "whitespace is not a ▁ prefix"),
        (bool(proto.denormalizer_spec.precompiled_charsmap), "it has a denormalizer"),
        (spm_pb2.ModelProto.SentencePiece.USER_DEFINED in kinds, "it has user-defined symbols"),
        (spm_pb2.ModelProto.SentencePiece.UNUSED in kinds, "it has unused pieces"),
        (not all(0 <= i < len(proto.pieces) for i in (trainer.unk_id, trainer.bos_id, trainer.eos_id)),
         "it lacks an unk, bos or eos piece"),
    ]
    for refused, what in refusals:
        if refused:
            raise StepError(f"{path}: {what}, which the tokenizer.json conversion does not reproduce; "
                            "only a ChatGLM2/3 tokenizer.model is supported")
    return proto


def bpe_merges(proto) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece's encoder: SentencePiece joins the adjacent pair whose joined
    piece scores highest, so every split (left, right) of a normal piece becomes a merge, ranked by that
    piece's score (ties: piece id, then the split's position). Exact while scores are distinct, as
    SentencePiece's BPE trainer writes them; one gap remains: where two overlapping pairs join into the same
    piece (▁ ▁▁ ▁ -> ▁▁▁ either way) SentencePiece takes the leftmost, a static rank the shorter left."""
    normal = {p.piece for p in proto.pieces if p.type == p.NORMAL}  # byte/control pieces never merge
    ranked = []
    for pid, p in enumerate(proto.pieces):
        if p.type != p.NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in normal and right in normal:
                ranked.append((-p.score, pid, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def backend(proto):
    """The `tokenizers.Tokenizer` equal to SentencePiece's encode/decode of `proto`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    pieces = proto.pieces
    vocab = {p.piece: i for i, p in enumerate(pieces)}
    unk = pieces[proto.trainer_spec.unk_id].piece
    # byte_fallback: a character outside the vocab becomes its UTF-8 bytes' <0xNN> pieces, as in SentencePiece
    tok = Tokenizer(models.BPE(vocab=vocab, merges=bpe_merges(proto), unk_token=unk, fuse_unk=True,
                               byte_fallback=True))
    # SentencePiece's identity normalizer: spaces become ▁ and, with add_dummy_prefix, one ▁ goes in front
    # of any non-empty text (even one starting with a space: remove_extra_whitespaces is off). No
    # pre-tokenizer: SentencePiece's BPE runs over the whole text, newlines and space runs included.
    steps = [normalizers.Prepend("▁")] if proto.normalizer_spec.add_dummy_prefix else []
    tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    # decoding: ▁ -> space, <0xNN> runs -> UTF-8 text, then drop the dummy prefix's space once
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if proto.normalizer_spec.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    return tok


def write_tokenizer(src: Path, dst: Path, dims: dict) -> int:
    """tokenizer.json + tokenizer_config.json into `dst`; return the SentencePiece vocab size."""
    from transformers import PreTrainedTokenizerFast

    proto = read_spm(src)
    tok = backend(proto)
    sp_size = len(proto.pieces)
    got = [tok.token_to_id(t) for t in SPECIALS]
    if got != list(range(sp_size, sp_size + len(SPECIALS))):  # a special that is also a piece keeps its id
        raise StepError(f"{src}/tokenizer.model: ChatGLM3's special tokens would get ids {got}, not "
                        f"{sp_size}..{sp_size + len(SPECIALS) - 1}; the file is not ChatGLM2/3's")
    trainer = proto.trainer_spec
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=proto.pieces[trainer.bos_id].piece,
        eos_token=proto.pieces[trainer.eos_id].piece,
        unk_token=proto.pieces[trainer.unk_id].piece,
        pad_token=proto.pieces[trainer.unk_id].piece,  # ChatGLM pads with unk (id 0)
        additional_special_tokens=list(SPECIALS),
        # text is always encoded as SentencePiece does (ChatGLM3's SPTokenizer.encode): "sop" or
        # "<|user|>" typed in a prompt stay text; the specials are inserted by id (workflow.tokenize)
        split_special_tokens=True,
        clean_up_tokenization_spaces=False,  # ChatGLM3's: decode gives SentencePiece's text back
        padding_side="left",  # ChatGLM3's default (workflow.tokenize sets right padding for training)
        model_max_length=dims["seq"],
    )
    fast.save_pretrained(str(dst))
    return sp_size
