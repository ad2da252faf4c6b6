"""Atomic outputs: nothing half-written ever looks finished.

Every step writes into a temporary sibling and renames it into place when complete, so a killed job
leaves either the old output or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from workflow.errors import StepError


@contextlib.contextmanager
def atomic_dir(out: str | Path, staged: Path | None = None) -> Iterator[Path]:
    """Yield a temporary directory that replaces `out` only if the block finishes without error.

    `staged`: an already written temporary sibling to finish (e.g. one that several processes wrote into).
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = staged or out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if staged is None:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` to `path` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill leaves no partial temporary file
        raise
    os.replace(tmp, path)


def write_json_atomic(path: str | Path, data: object) -> None:
    """Write `data` as indented JSON, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n")


def read_json(path: str | Path) -> dict:
    """Read a JSON object, with a one-line error naming the file."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StepError(f"{path}: not found; run the step that produces it first") from None
    except json.JSONDecodeError as exc:
        raise StepError(f"{path}: not valid JSON (line {exc.lineno}); delete it and rerun its step") from None
