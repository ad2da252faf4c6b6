"""The README's main command on a fresh copy runs the whole experiment on this machine: results are DVC's
(its cache and remote), never in git, so a clone or an archive holds none to pass off as this machine's.
(A second run that has nothing to do says so: tests/test_workflow.py, on a real first run.)"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
       "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}


def fresh_copy(kind: str, dest: Path) -> Path:
    """`archive`: `git archive HEAD` unpacked (every file at the commit time); `clone`: `git clone`. The
    project's .venv is linked in, so setup installs nothing."""
    if kind == "archive":
        dest.mkdir()
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    else:
        subprocess.run(["git", "clone", "-q", str(ROOT), str(dest)], check=True)
    (dest / ".venv").symlink_to(ROOT / ".venv")
    return dest


def main_command(repo: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["scripts/run.sh", *args], cwd=repo, env=ENV, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("kind", ["archive", "clone"])
def test_fresh_copy_runs_every_job(kind, tmp_path):
    repo = fresh_copy(kind, tmp_path / kind)
    results = {p.relative_to(repo).as_posix() for p in (repo / "results").rglob("*") if p.is_file()}
    assert all(r.startswith("results/sources/") or r == "results/README.md" for r in results), results
    proc = main_command(repo, "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    assert int(counts["train"]) == int(counts["evaluate"]) > 0 and counts["report"] == "1"
    assert int(counts["download"]) == int(counts["preprocess"]) == 1
