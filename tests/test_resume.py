"""Killed training resumes from its last complete checkpoint and ends exactly where an unbroken run ends.

Every run here is the real `python -m workflow.train` in a subprocess, in its own working directory (so its
checkpoints go to that directory's results/checkpoints).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import params_with
from workflow.checkpoints import COMPLETE

ROOT = Path(__file__).resolve().parents[1]
VARIANT = "tiny-fp16-single"  # fp16 is the slowest precision on CPU: the widest window to kill in
TRAIN = {"max_steps": 30, "logging_steps": 4, "save_steps": 5}  # saves between logs: pending loss is kept
# Steps to kill at: checkpointed ones that leave 3 save intervals (~1 s on 2 cores) for the signal to land in.
KILL_AT = range(TRAIN["save_steps"], TRAIN["max_steps"] - 3 * TRAIN["save_steps"] + 1, TRAIN["save_steps"])
TIMING = {"runtime_s", "tokens_per_s", "samples_per_s", "peak_memory_bytes", "resumed_from"}


def command(workdir: Path, params: Path, model_dir: Path, data_dir: Path, *extra: str,
            precision: str = "fp16", strategy: str = "single") -> list[str]:
    return [sys.executable, "-m", "workflow.train", "--params", str(params), "--model", "tiny",
            "--precision", precision, "--strategy", strategy, "--model-dir", str(model_dir), "--data", str(data_dir),
            "--out", str(workdir / "adapter"), "--metrics", str(workdir / "train.json"),
            "--timing", str(workdir / "timing.json"), "--live", str(workdir / "live"),
            "--curve", str(workdir / "loss.csv"), *extra]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "LOWPREC_LOG_LEVEL": "INFO"}


def run(workdir: Path, *args: str, extra: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.run(command(workdir, *args, *extra), cwd=workdir, env=env(), capture_output=True,
                          text=True, timeout=600)


def checkpoints(workdir: Path) -> Path:
    return workdir / "results/checkpoints" / VARIANT


def _default_sigint() -> None:
    """Ctrl-C as in a terminal: a suite started in the background (`cmd &`, as CI may) ignores SIGINT, and a
    child that inherits SIG_IGN never sees it (Python installs its KeyboardInterrupt handler only otherwise)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_wait_for(marker: Path, cmd: list[str], cwd: Path, environ: dict) -> subprocess.Popen:
    """Start `cmd` in its own process group; return once `marker` exists (fail if it ends first)."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=environ, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 600
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{cmd[:4]} made no {marker} (exit {proc.returncode}): {proc.stderr.read()[-2000:]}")
        time.sleep(0.02)
    return proc


def interrupt(workdir: Path, sig: int, *args: str) -> tuple[int, int, str]:
    """Start training, wait for a complete checkpoint at a random save step, then send `sig`.

    Returns (exit code, the step the kill aimed at, stderr).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    rng = random.Random()
    target = rng.choice(KILL_AT)
    marker = checkpoints(workdir) / f"checkpoint-{target}" / COMPLETE
    proc = start_and_wait_for(marker, command(workdir, *args), workdir, env())
    try:
        time.sleep(rng.uniform(0, 0.3))  # somewhere in the next few steps, maybe in the middle of a save
        assert proc.poll() is None, f"the run ended before the signal (aimed after step {target})"
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, target, err


@pytest.fixture(scope="module")
def setup(builtin_model_dir, tiny_data_dir, tmp_path_factory):
    """Params with frequent checkpoints, and the metrics + adapter of one unbroken run."""
    tmp = tmp_path_factory.mktemp("resume")
    params = params_with(tmp, train=TRAIN)
    reference = tmp / "unbroken"
    proc = run(reference, params, builtin_model_dir, tiny_data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return params, builtin_model_dir, tiny_data_dir, reference


def assert_same_result(workdir: Path, reference: Path) -> dict:
    """Same quality metrics, loss curve and adapter weights as the unbroken run; returns the metrics."""
    got, want = (json.loads((d / "train.json").read_text()) for d in (workdir, reference))
    assert {k: v for k, v in got.items() if k not in TIMING} == {k: v for k, v in want.items() if k not in TIMING}
    assert (workdir / "loss.csv").read_text() == (reference / "loss.csv").read_text()
    a, b = (load_file(d / "adapter/adapter_model.safetensors") for d in (workdir, reference))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return {**got, **json.loads((workdir / "timing.json").read_text())}  # resumed_from is a timing key


def test_sigkill_then_rerun_resumes_and_matches_an_unbroken_run(setup, tmp_path):
    params, model_dir, data_dir, reference = setup
    work = tmp_path / "killed"
    rc, target, err = interrupt(work, signal.SIGKILL, params, model_dir, data_dir)
    assert rc == -signal.SIGKILL, err[-2000:]
    assert not (work / "adapter").exists() and not (work / "train.json").exists()  # nothing looks finished
    done = [p for p in checkpoints(work).iterdir() if (p / COMPLETE).is_file()]
    assert done, "the kill left no complete checkpoint"
    last = max(int(p.name.split("-")[1]) for p in done)
    assert target <= last < TRAIN["max_steps"]

    # A half-written checkpoint beyond the last complete one (as a kill during a save leaves it) is ignored.
    half = checkpoints(work) / f"checkpoint-{last + 1}"
    shutil.copytree(checkpoints(work) / f"checkpoint-{last}", half, dirs_exist_ok=True)
    (half / COMPLETE).unlink()
    (half / "adapter_model.safetensors").write_bytes(b"\0" * 10)

    proc = run(work, params, model_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"checkpoint-{last + 1}: incomplete" in proc.stderr and not half.exists()
    metrics = assert_same_result(work, reference)
    assert metrics["resumed_from"] == f"checkpoint-{last}"
    assert json.loads((reference / "timing.json").read_text())["resumed_from"] is None


def test_rerun_after_the_final_checkpoint_matches_an_unbroken_run(setup, tmp_path):
    """A checkpoint at the last step (the unbroken run saves one: 30 % 5 == 0) is no place to resume: the
    Trainer would take step 31. The rerun redoes the last save interval instead, with identical metrics."""
    params, model_dir, data_dir, reference = setup
    work = tmp_path / "after-final"
    shutil.copytree(checkpoints(reference), checkpoints(work))
    assert (checkpoints(work) / f"checkpoint-{TRAIN['max_steps']}" / COMPLETE).is_file()
    proc = run(work, params, model_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = assert_same_result(work, reference)
    assert metrics["steps"] == TRAIN["max_steps"]
    assert metrics["resumed_from"] == f"checkpoint-{TRAIN['max_steps'] - TRAIN['save_steps']}"


def test_ctrl_c_exits_130_and_the_rerun_resumes(setup, tmp_path):
    params, model_dir, data_dir, reference = setup
    work = tmp_path / "interrupted"
    rc, _, err = interrupt(work, signal.SIGINT, params, model_dir, data_dir)
    assert rc == 130, err[-2000:]
    assert err.strip().splitlines()[-1] == ("interrupted: nothing was marked finished; rerun the same command "
                                            "to continue")
    # no adapter, metrics, curve or temp dirs; only dvclive's log, which streams by design while training
    assert sorted(p.name for p in work.iterdir()) == ["live", "results"]
    assert any((p / COMPLETE).is_file() for p in checkpoints(work).iterdir())

    proc = run(work, params, model_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert assert_same_result(work, reference)["resumed_from"]


def test_stale_checkpoint_is_refused_on_explicit_resume_and_replaced_by_default(setup, tmp_path):
    params, model_dir, data_dir, reference = setup
    work = tmp_path / "stale"
    shutil.copytree(reference / "results", work / "results")  # the unbroken run's checkpoints (steps 25, 30)
    changed = params_with(work, train={**TRAIN, "learning_rate": 1e-3})
    kept = sorted(p.name for p in checkpoints(work).iterdir())
    assert kept == ["checkpoint-25", "checkpoint-30"]

    proc = run(work, changed, model_dir, data_dir, extra=("--resume", "require"))
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: results/checkpoints/{VARIANT}/checkpoint-30: made with other params")
    assert "refusing to resume" in line and "--resume require" in line
    assert sorted(p.name for p in checkpoints(work).iterdir()) == kept  # nothing discarded
    assert not (work / "adapter").exists()

    # What `dvc repro` / Snakemake run after a params change: start over (the old checkpoints are removed).
    proc = run(work, changed, model_dir, data_dir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "made with other params or inputs" in proc.stderr and "starting over" in proc.stderr
    metrics = json.loads((work / "train.json").read_text())
    assert json.loads((work / "timing.json").read_text())["resumed_from"] is None
    assert metrics["steps"] == TRAIN["max_steps"]

    # The same params again: `require` resumes from the fresh run's own checkpoints (the one before its final
    # step, which is no place to resume: see test_rerun_after_the_final_checkpoint_matches_an_unbroken_run).
    proc = run(work, changed, model_dir, data_dir, extra=("--resume", "require"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((work / "timing.json").read_text())["resumed_from"] == "checkpoint-25"


def test_require_without_checkpoints_fails_and_never_starts_over(setup, tmp_path):
    params, model_dir, data_dir, reference = setup
    work = tmp_path / "none"
    proc = run(work, params, model_dir, data_dir, extra=("--resume", "require"))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: results/checkpoints/{VARIANT}: no complete checkpoint to resume from; run without --resume require")
    shutil.copytree(reference / "results", work / "results", dirs_exist_ok=True)
    proc = run(work, params, model_dir, data_dir, extra=("--resume", "never"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((work / "timing.json").read_text())["resumed_from"] is None
    assert_same_result(work, reference)


def test_zero2_sigkill_then_rerun_resumes_and_matches_an_unbroken_run(builtin_model_dir, tiny_data_dir, tmp_path):
    """The same under DeepSpeed ZeRO-2 with 2 processes: killing the job's first process takes its launcher and
    ranks down with it (no orphan rank keeps training or writing), and the rerun resumes every rank."""
    params = params_with(tmp_path, train=TRAIN)
    zero = {"precision": "bf16", "strategy": "zero2"}
    reference, work = tmp_path / "unbroken", tmp_path / "killed"
    for d in (reference, work):
        d.mkdir()
    proc = subprocess.run(command(reference, params, builtin_model_dir, tiny_data_dir, **zero), cwd=reference,
                          env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    target = random.choice(KILL_AT)
    ckpts = work / "results/checkpoints/tiny-bf16-zero2"
    proc = start_and_wait_for(ckpts / f"checkpoint-{target}" / COMPLETE,
                              command(work, params, builtin_model_dir, tiny_data_dir, **zero), work, env())
    time.sleep(random.uniform(0, 0.3))
    assert proc.poll() is None, f"the run ended before the kill (aimed after step {target})"
    proc.send_signal(signal.SIGKILL)  # the job's first process only, as an OOM killer or preemption would
    proc.wait()
    deadline = time.monotonic() + 30
    while orphans := subprocess.run(["pgrep", "-f", f"--params {params}"], capture_output=True, text=True).stdout:
        assert time.monotonic() < deadline, f"ranks outlived the killed job: {orphans}"
        time.sleep(0.2)
    assert not (work / "adapter").exists() and not (work / "train.json").exists()
    done = sorted(int(p.name.split("-")[1]) for p in ckpts.iterdir() if (p / COMPLETE).is_file())
    assert done and target <= done[-1] < TRAIN["max_steps"]
    with open(ckpts / f"checkpoint-{done[-1]}" / COMPLETE) as f:
        marker = json.load(f)
    assert marker["world_size"] == 2 and len(marker["loss_pending"]) == 2  # each rank's pending loss

    proc = subprocess.run(command(work, params, builtin_model_dir, tiny_data_dir, "--resume", "require", **zero),
                          cwd=work, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = assert_same_result(work, reference)
    assert metrics["resumed_from"] == f"checkpoint-{done[-1]}" and metrics["processes"] == 2


# --- through the orchestrators -------------------------------------------------------------------------------


def kill_tree_after_checkpoint(cmd: list[str], repo: Path, environ: dict) -> None:
    """Run an orchestrator command, SIGKILL it and its jobs once a complete checkpoint exists."""
    marker = repo / "results/checkpoints" / VARIANT / f"checkpoint-{TRAIN['save_steps']}" / COMPLETE
    proc = start_and_wait_for(marker, cmd, repo, environ)
    os.killpg(proc.pid, signal.SIGKILL)  # the orchestrator and the training job it started
    proc.wait()
    assert not (repo / "results/adapters" / VARIANT).exists()


def test_snakemake_rerun_incomplete_and_dvc_repro_resume(tmp_path):
    from tests.test_workflow import ENV, make_project, sh

    repo = make_project(tmp_path)
    params_with(repo, repo / "params.yaml", matrix={"precision": ["fp16"]}, train=TRAIN)
    sh(["snakemake", "--cores", "1", "results/data/tiny"], repo)
    metrics = repo / "results/metrics/train" / f"{VARIANT}.json"

    kill_tree_after_checkpoint(["snakemake", "--cores", "1", str(metrics.relative_to(repo))], repo, ENV)
    sh(["snakemake", "--unlock"], repo)  # a SIGKILLed Snakemake leaves its lock behind
    sh(["snakemake", "--cores", "1", "--rerun-incomplete", str(metrics.relative_to(repo))], repo)
    timing = repo / "results/metrics/timing" / f"{VARIANT}.json"
    resumed = json.loads(metrics.read_text())
    assert json.loads(timing.read_text())["resumed_from"] and resumed["steps"] == TRAIN["max_steps"]

    # DVC: the same from scratch (no checkpoints, no train outputs), with the upstream stages recorded.
    for path in (repo / "results/checkpoints", repo / "results/adapters"):
        shutil.rmtree(path)
    metrics.unlink()
    sh(["dvc", "init", "-q", "-f"], repo) if not (repo / ".dvc").is_dir() else None
    sh(["dvc", "commit", "-f", "-q", "download@tiny", "preprocess@tiny"], repo)
    kill_tree_after_checkpoint(["dvc", "repro", f"train@{VARIANT}"], repo, ENV)
    out = sh(["dvc", "repro", f"train@{VARIANT}"], repo).stdout
    assert f"Running stage 'train@{VARIANT}'" in out and "Running stage 'download" not in out
    again = json.loads(metrics.read_text())
    assert json.loads(timing.read_text())["resumed_from"]
    quality = {k: v for k, v in resumed.items() if k not in TIMING}
    assert {k: v for k, v in again.items() if k not in TIMING} == quality  # both resumed runs agree
