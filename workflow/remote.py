"""A model's own Python code (config.json `auto_map`): finding it, and failing clearly when it breaks.

Code written for transformers 4.x calls APIs that transformers 5 removed; loading such a model then dies
deep inside its own module. `own_code` turns that into one `error:` line naming the model, the missing
piece and what to do, with the traceback kept in the step's log. Imports nothing heavy.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from workflow.errors import StepError

log = logging.getLogger("workflow.remote")
# What code written against another transformers raises: a removed method or attribute, a changed
# signature, a removed import.
BROKEN = (AttributeError, TypeError, ImportError, NameError, NotImplementedError, KeyError)


def remote_code(path: str | Path) -> list[str]:
    """The code references (`auto_map` of config.json / tokenizer_config.json) a model dir asks to import."""
    refs = []
    for name in ("config.json", "tokenizer_config.json"):
        try:
            auto_map = json.loads((Path(path) / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: check_model_dir and the loaders report those
        values = auto_map.values() if isinstance(auto_map, dict) else auto_map
        refs += [v if isinstance(v, str) else next((x for x in v if x), "?") for v in values]
    return sorted(set(refs))


@contextlib.contextmanager
def own_code(model_dir: str | Path, trust_remote_code: bool, what: str) -> Iterator[None]:
    """Run the block (loading `what` from `model_dir`); if the model's own code is in use and breaks, raise a
    StepError that says so. Without trusted code in play, exceptions pass through untouched (bugs keep their
    traceback)."""
    refs = remote_code(model_dir) if trust_remote_code else []
    if not refs:
        yield
        return
    try:
        yield
    except BROKEN as exc:
        import transformers

        log.info("the %s's own code failed; traceback:", what, exc_info=True)
        detail = (str(exc).strip().splitlines() or [""])[0][:200]
        raise StepError(
            f"{model_dir}: the model's own code ({', '.join(refs[:2])}) fails under transformers "
            f"{transformers.__version__} while loading its {what} ({type(exc).__name__}: {detail}); "
            "ChatGLM2/3 and Qwen-1 need no code: set trust_remote_code: false and rerun download, which converts "
            "them to native models; for another family use a release of it with a native transformers "
            "architecture, or a transformers version its code was written for"
        ) from exc
