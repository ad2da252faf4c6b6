"""The conda env for --use-conda pins exactly what requirements.txt pins."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    return {line.split("==")[0].lower(): line.split("==")[1] for line in lines if "==" in line}


def test_conda_env_matches_requirements():
    reqs = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines() if l.strip()[:1].isalpha()]
    env = yaml.safe_load((ROOT / "envs/lowprec.yaml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert pins(pip) == pins(reqs)
    assert len(pins(reqs)) == len(reqs), "every requirement is pinned with =="
    assert "python=3.11" in env["dependencies"]
