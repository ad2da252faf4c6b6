"""Native transformers layouts for model families whose own code does not run under transformers 5.

The download step converts a checkpoint whose config.json names one of `FAMILIES` (ChatGLM2/3 -> Glm,
Qwen-1 -> Qwen2) into a model dir of a native architecture, weights, config and fast tokenizer alike, so
every later step loads it with `trust_remote_code: false`. Nothing of the model's own Python is imported:
the converters read config.json, the safetensors and the tokenizer's data files only.

Adding a family: a module here with `MODEL_TYPE` and `convert(src, dst, max_shard_bytes) -> dict`, listed
in `FAMILIES`.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from workflow.errors import StepError

# config.json model_type -> the module converting it (imported only when a model of that type is seen)
FAMILIES = {"chatglm": "workflow.convert.chatglm", "qwen": "workflow.convert.qwen"}
MAX_SHARD = "2GB"  # shard size of converted weights; the same as merge.max_shard_size's default


def model_type(model_dir: Path) -> str | None:
    """config.json's `model_type` (None when absent or unreadable: check_model_dir reports that)."""
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def needs_conversion(model_dir: Path) -> bool:
    """Whether the checkpoint in `model_dir` is of a family that is converted to a native architecture."""
    return model_type(model_dir) in FAMILIES


def convert(src: Path, dst: Path) -> dict:
    """Convert the checkpoint in `src` into the empty dir `dst`; return what source.json records of it."""
    from workflow.convert.shards import parse_size

    kind = model_type(src)
    if kind not in FAMILIES:
        raise StepError(f"{src}/config.json: model_type {kind!r} has no converter; known: {', '.join(FAMILIES)}")
    module = importlib.import_module(FAMILIES[kind])
    info = module.convert(Path(src), Path(dst), parse_size(MAX_SHARD))
    return {"model_type": kind, **info}
