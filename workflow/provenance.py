"""Where, when and with what a result was made: recorded by every step that measures, shown by the report.

A run id ties the jobs of one orchestrator invocation together: the Snakefile sets `LOWPREC_RUN_ID` once per
`snakemake` call (its jobs inherit it), so the report can tell the variants this invocation ran from those
it reused. Imports no torch (versions are read from the installed packages' metadata).
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import uuid
from importlib import metadata
from pathlib import Path

RUN_ID = "LOWPREC_RUN_ID"
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "deepspeed", "datasets")
ROOT = Path(__file__).resolve().parents[1]


def new_run_id() -> str:
    """A fresh id for one orchestrator invocation: UTC time plus a random suffix."""
    return f"{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def commit() -> str | None:
    """The project's git commit (`+dirty` with uncommitted changes), None outside a git checkout."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()
        # dirty: code or params changed; the orchestrators' own outputs (results/, dvc.lock) do not count
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":!results", ":!dvc.lock"], cwd=ROOT, capture_output=True, text=True,
                               timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{head}+dirty" if dirty else head


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries whose numbers the results depend on."""
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_name(device: str = "cpu") -> str:
    """The GPU's name on CUDA, the CPU model (from /proc/cpuinfo) otherwise."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


def provenance(device: str = "cpu") -> dict:
    """This process's machine (host, the `device`'s name), date, commit, versions and run id."""
    return {
        "host": socket.gethostname(),
        "device": device_name(device),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit(),
        "versions": versions(),
        "run_id": os.environ.get(RUN_ID),
    }
