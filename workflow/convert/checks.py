"""What every converter checks of a source checkpoint: its config.json, its numbers, its tensors' shapes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from workflow.errors import StepError


def read_json_config(src: Path, model_type: str) -> dict:
    """src/config.json, which must name `model_type`."""
    path = src / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StepError(f"{path}: cannot be read as JSON ({e}); re-download the model") from None
    if cfg.get("model_type") != model_type:
        raise StepError(f"{path}: model_type is {cfg.get('model_type')!r}, not {model_type!r}")
    return cfg


def number(src: Path, cfg: dict, field: str, default: float | None = None, kind: type = int):
    """config.json's `field` as `kind`; StepError when it is missing (and has no default) or not a number."""
    value = cfg.get(field)
    if value is None and default is not None:
        return kind(default)
    try:
        if isinstance(value, bool):
            raise TypeError
        return kind(value)
    except (TypeError, ValueError):
        raise StepError(f"{src}/config.json: {field} is {value!r}, not a number; re-download the model") from None


def shape_checker(src: Path, shapes: dict[str, tuple[int, ...]]) -> Callable:
    """checked(name, out_name, tensor) -> (out_name, tensor), or a StepError when `out_name` is not expected
    or the tensor's shape is not the one config.json implies."""
    def checked(name: str, out_name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
        want = shapes.get(out_name)
        if want is None or tuple(tensor.shape) != want:
            raise StepError(f"{src}: tensor {name} has shape {tuple(tensor.shape)}, config.json implies "
                            f"{want} for {out_name}; the weights do not belong to this config.json")
        return out_name, tensor

    return checked


def check_complete(src: Path, written: dict[str, int], shapes: dict[str, tuple[int, ...]]) -> None:
    """Every expected tensor was written (a missing one would be randomly initialised at load time)."""
    missing = sorted(set(shapes) - set(written))
    if missing:
        raise StepError(f"{src}: the checkpoint lacks {len(missing)} tensor(s) its config.json implies (e.g. "
                        f"{missing[0]}); re-download the model")
