"""Rewrite a checkpoint's tensors into another layout, one source shard at a time.

A converter gives a function from one source tensor (name, tensor) to the tensors it becomes; this module
reads the source safetensors shard by shard (memory-mapped), writes output shards as they fill up and the
`model.safetensors.index.json`, so a 12 GB model is never held twice in memory.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from workflow.errors import StepError

log = logging.getLogger("workflow.convert")

Mapping = Callable[[str, torch.Tensor], Iterable[tuple[str, torch.Tensor]]]
INDEX = "model.safetensors.index.json"


def parse_size(size: str | int) -> int:
    """Bytes of "2GB"/"500MB"/"1.5GiB" (decimal units as transformers reads them) or of an int."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    for unit, factor in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                         ("KB", 10**3), ("B", 1)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text)


def source_shards(src: Path) -> list[Path]:
    """The safetensors files holding the checkpoint in `src` (its index's shards, else every *.safetensors)."""
    index = src / INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [src / n for n in names]
    shards = sorted(src.glob("*.safetensors"))
    if not shards:
        raise StepError(f"{src}: no *.safetensors weights to convert; re-save the checkpoint with "
                        "save_pretrained(safe_serialization=True)")
    return shards


def source_tensors(src: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the checkpoint, loaded one at a time from memory-mapped shards."""
    from safetensors import safe_open

    for shard in source_shards(src):
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def write_converted(src: Path, dst: Path, mapping: Mapping, max_shard_bytes: int) -> dict[str, int]:
    """Write `mapping` applied to every tensor of `src` into `dst` as sharded safetensors; return
    {output tensor name: number of elements}. Output tensors are made contiguous copies, so no
    memory-mapped source shard stays referenced after it was read."""
    from safetensors.torch import save_file

    written: dict[str, int] = {}
    weight_map: dict[str, str] = {}
    buffer: dict[str, torch.Tensor] = {}
    buffered = total = 0
    parts: list[Path] = []

    def flush() -> None:
        nonlocal buffer, buffered
        if not buffer:
            return
        part = dst / f".part-{len(parts):05d}.safetensors"
        save_file(buffer, str(part), metadata={"format": "pt"})
        parts.append(part)
        for name in buffer:
            weight_map[name] = part.name
        buffer, buffered = {}, 0

    for name, tensor in source_tensors(src):
        for out_name, out in mapping(name, tensor):
            if out_name in written:
                raise StepError(f"{src}: two source tensors map to {out_name}; the checkpoint is not the "
                                "layout its config.json names")
            out = out.contiguous().clone()
            size = out.numel() * out.element_size()
            if buffered and buffered + size > max_shard_bytes:
                flush()
            buffer[out_name] = out
            buffered += size
            total += size
            written[out_name] = out.numel()
    flush()
    names = {p.name: (f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" if len(parts) > 1
                      else "model.safetensors") for i, p in enumerate(parts)}
    for part in parts:
        os.replace(part, dst / names[part.name])
    if len(parts) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: names[v] for k, v in sorted(weight_map.items())}}
        (dst / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    log.info("wrote %d tensors (%.1f MB) in %d shard(s) to %s", len(written), total / 1e6, len(parts), dst)
    return written
