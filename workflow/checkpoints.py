"""Training checkpoints: where they live, when one is complete, and whether a rerun may resume from it.

Checkpoints go to a directory outside the declared outputs (Snakemake deletes those when a job fails), carry
a fingerprint of everything the variant's training depends on, and count as complete only once
`complete.json` is written into them, last and atomically. Imports no torch.
"""

from __future__ import annotations

import hashlib
import logging
import re
import shutil
from pathlib import Path

from workflow import cli
from workflow.io import read_json
from workflow.params import Params
from workflow.stages import param_values

log = logging.getLogger(__name__)
CHECKPOINT_ROOT = Path("results/checkpoints")  # not a declared output: Snakemake deletes those on failure
COMPLETE = "complete.json"  # written last into a checkpoint-N dir: without it the checkpoint is half-written
RESUME_MODES = ("auto", "require", "never")


def variant_fingerprint(params: Params, model: str, precision: str, strategy: str, inputs: str = "") -> str:
    """Hash of the params keys the train step reads (the same keys that rerun it in both DAGs) and of its
    input files (the data among them); checkpoints carry it."""
    values = param_values(params.model_dump(mode="json"), "train", model=model, precision=precision,
                          strategy=strategy)
    return hashlib.sha256(f"{values}\n{inputs}".encode()).hexdigest()[:16]


def inputs_digest(model_dir: Path, data_dir: Path) -> str:
    """sha256 of the model's recorded file hashes and the tokenized train split: what else training reads."""
    h = hashlib.sha256()
    files = [Path(model_dir) / "source.json", *sorted((Path(data_dir) / "train").glob("*.arrow"))]
    for f in files:
        if f.is_file():
            h.update(f.name.encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:16]


def _step(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def is_final(checkpoint: Path) -> bool:
    """Whether a checkpoint was saved at the last step of its run (trainer_state.json's max_steps)."""
    try:
        state = read_json(checkpoint / "trainer_state.json")
    except cli.StepError:  # no readable trainer state: not a final checkpoint
        return False
    return state.get("max_steps", 0) > 0 and state.get("global_step", 0) >= state["max_steps"]


def resume_point(ckpt_dir: Path, fingerprint: str, mode: str = "auto") -> Path | None:
    """The checkpoint to resume from: the latest *complete* one made with `fingerprint`, or None.

    Incomplete checkpoints (a kill while saving: no `complete.json`) are removed. A complete checkpoint made
    with other params is stale: `auto` (what Snakemake and DVC run) removes it with a warning and starts
    over, since the params change is what the orchestrator is rerunning for; `require` refuses to go on
    and keeps it; `never` removes every checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    found = sorted((p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and _step(p) >= 0), key=_step)
    complete = []
    for path in found:
        if (path / COMPLETE).is_file():
            complete.append(path)
        else:
            log.warning("%s: incomplete (no %s); ignoring and removing it", path, COMPLETE)
            shutil.rmtree(path)
    if mode == "never":
        for path in complete:
            shutil.rmtree(path)
        return None
    if not complete:
        if mode == "require":
            raise cli.StepError(f"{ckpt_dir}: no complete checkpoint to resume from; run without --resume require")
        return None
    last = complete[-1]
    made_with = read_json(last / COMPLETE).get("fingerprint")
    if made_with == fingerprint:
        if is_final(last):
            # The Trainer resumed at its last step trains one step more (steps, tokens and loss then differ
            # from an unbroken run's), so redo the last save interval from the checkpoint before, or all.
            before = complete[-2] if len(complete) > 1 else None
            log.info("%s is the run's final step; resuming from %s instead", last, before or "the start")
            shutil.rmtree(last)
            return before
        log.info("resuming from %s", last)
        return last
    if mode == "require":
        raise cli.StepError(
            f"{last}: made with other params or inputs (fingerprint {made_with}, now {fingerprint}); refusing "
            "to resume from it: restore the params it was made with, or run without --resume require to start over"
        )
    log.warning("%s: made with other params or inputs (fingerprint %s, now %s); not resuming from it, "
                "removing the variant's checkpoints and starting over", last, made_with, fingerprint)
    for path in complete:
        shutil.rmtree(path)
    return None
