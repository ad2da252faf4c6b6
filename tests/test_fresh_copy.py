"""The README's main command on a fresh copy runs the experiment on this machine, whatever the files'
timestamps; when nothing needs to run it says so and whose results are shown, never passing them off."""

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
    proc = main_command(repo, "-n", "--quiet", "rules")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running every job on this machine" in proc.stderr
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", proc.stdout, flags=re.M))
    assert int(counts["train"]) == int(counts["evaluate"]) > 0 and counts["report"] == "1"


def test_nothing_to_do_says_so_and_names_the_results_origin(tmp_path):
    repo = fresh_copy("archive", tmp_path / "archive")
    (repo / ".snakemake/metadata").mkdir(parents=True)
    (repo / ".snakemake/metadata/earlier-run").write_text("")  # as if Snakemake had run in this copy before
    summary = (repo / "results/report/summary.md").read_text()
    made = next(line for line in summary.splitlines() if line.startswith("Made on"))
    proc = main_command(repo)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Nothing ran" in proc.stderr and made in proc.stderr  # the committed results' machine and commit
    assert "commit " in made and "# Precision comparison" not in proc.stdout  # never shown as this run's
