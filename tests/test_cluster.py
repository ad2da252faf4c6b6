"""SLURM without a cluster: what the slurm profile makes snakemake-executor-plugin-slurm ask SLURM for (its
own functions build the sbatch and srun options from the dry run's resources), a multi-node launch inside
the plugin's job step (a fake `srun` that behaves as SLURM does there), and what a cluster run checks where."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

from tests.conftest import params_with
from tests.test_workflow import ENV, make_project

ROOT = Path(__file__).resolve().parents[1]


class Resources(dict):
    """A job's resources as the plugin reads them: `.get(name)` and `.name`."""

    __getattr__ = dict.get


def dry_run_jobs(repo: Path, *args: str) -> dict[tuple[str, str], Resources]:
    """(rule, variant) -> resources of every train/merge/evaluate job of a forced dry run."""
    proc = subprocess.run(["snakemake", "-n", "--forceall", *args], cwd=repo, env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    jobs = {}
    for rule, block in re.findall(r"^rule (train|merge|evaluate):\n((?:    .*\n)+)", proc.stdout, flags=re.M):
        wildcards = dict(re.findall(r"(\w+)=(\w+)", re.search(r"wildcards: (.*)", block).group(1)))
        found = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block).group(1)))
        variant = "-".join(wildcards[k] for k in ("model", "precision", "strategy"))
        jobs[rule, variant] = Resources({k: int(v) if v.isdigit() else v for k, v in found.items()})
    return jobs


def test_slurm_jobs_ask_for_their_gpus_per_node(tmp_path):
    """`gpu=N` became `sbatch --gpus=N`, a total over the job's nodes, while each node starts N ranks."""
    from snakemake_executor_plugin_slurm.submit_string import get_submit_command
    from snakemake_executor_plugin_slurm.utils import set_gres_string
    from snakemake_executor_plugin_slurm_jobstep import get_gpu_setting, get_node_setting

    repo = make_project(tmp_path, strategies={"zero2": {"gpus": 4, "nodes": 2}})
    jobs = dry_run_jobs(repo, "--profile", "profiles/slurm")
    assert {v for _, v in jobs} >= {"tiny-bf16-single", "tiny-bf16-zero2", "tiny-nf4-zero3"}
    submit = {"run_uuid": "x", "slurm_logfile": "x.log", "comment_str": "x", "account": "", "partition": "-p gpu",
              "workdir": str(repo)}
    for (rule, variant), resources in jobs.items():
        strategy = variant.rsplit("-", 1)[1]
        gpus, nodes = {"single": (1, 1), "zero2": (4, 2), "zero3": (2, 1)}[strategy] if rule == "train" else (1, None)
        job = SimpleNamespace(resources=resources, threads=1)
        sbatch = get_submit_command(job, submit) + set_gres_string(job)  # as the plugin composes it
        assert f" --gres=gpu:{gpus}" in sbatch and "--gpus" not in sbatch, (rule, variant, sbatch)
        if nodes is not None:
            assert f" --nodes={nodes}" in sbatch, (rule, variant, sbatch)
        # the plugin's own step inside the job asks for no GPUs of its own: it gets the job's (SLURM's default)
        assert get_gpu_setting(SimpleNamespace(resources=resources)) == "", (rule, variant)
        if rule == "train":
            assert get_node_setting(SimpleNamespace(resources=resources)) == f"--nodes={nodes}"
    local = dry_run_jobs(repo, "--cores", "1", "--resources", "gpu=4")
    assert {v: r["gpu"] for (rule, v), r in local.items() if rule == "train"} == {
        v: {"single": 1, "zero2": 4, "zero3": 2}[v.rsplit("-", 1)[1]] for (rule, v) in local if rule == "train"}


FAKE_SRUN = """#!/bin/sh
# SLURM's srun inside a job step: a new step that does not overlap waits for the resources the running step
# holds, here forever (`Job step creation temporarily disabled`). Records its arguments, starts nothing.
printf '%s\\n' "$@" > "$FAKE_SRUN_ARGS"
for arg in "$@"; do [ "$arg" = "--overlap" ] && exit 0; done
if [ -n "$SLURM_STEP_ID" ]; then
  echo "srun: Job step creation temporarily disabled, retrying (Requested nodes are busy)" >&2
  exec sleep 300
fi
exit 0
"""


def test_a_two_node_launch_inside_the_plugins_job_step_does_not_wait_for_itself(tmp_path):
    """The train step of a 2-node zero2 job, as the plugin runs it: inside its own one-task `srun` step
    (SLURM_STEP_ID set, SLURM_NNODES 1 for that step, the job's SLURM_JOB_NUM_NODES 2)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(FAKE_SRUN)
    (bin_dir / "srun").chmod(0o755)
    params = params_with(tmp_path, strategies={"zero2": {"nodes": "slurm", "gpus": 2}},
                         distributed={"gpu_lock_dir": str(tmp_path / "locks")})
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PYTHONPATH": str(ROOT),
           "FAKE_SRUN_ARGS": str(tmp_path / "srun.args"), "LOWPREC_GPU_COUNT": "2", "SLURM_JOB_ID": "4242",
           "SLURM_STEP_ID": "0", "SLURM_JOB_NUM_NODES": "2", "SLURM_NNODES": "1",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_CPUS_PER_TASK": "8"}
    argv = ["--params", str(params), "--model", "tiny", "--precision", "bf16", "--strategy", "zero2",
            "--model-dir", str(tmp_path / "m"), "--data", str(tmp_path / "d"), "--out", "a", "--metrics", "t.json",
            "--curve", "c.csv", "--timing", "x.json", "--live", "live"]
    proc = subprocess.run([sys.executable, "-m", "workflow.train", *argv], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    args = (tmp_path / "srun.args").read_text().split("\n")
    command = args.index(sys.executable)
    assert args[:command] == ["--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                              "--cpus-per-task=8"]
    launcher = args[command:]
    assert launcher[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert {"--nnodes=2", "--rdzv_endpoint=gpu07:29500", "--rdzv_id=4242"} <= set(launcher), launcher


def test_the_submit_host_checks_params_and_each_gpu_job_its_node(tmp_path):
    """fp16 under ZeRO-3 cannot run on a CPU. This machine has no GPUs: a local run refuses it at parse time;
    submitted to SLURM, the submit host (a login node without GPUs, like this one) does not, since the jobs
    run on GPU nodes, which check themselves (tests/test_devices.py: the steps' own checks)."""
    repo = make_project(tmp_path, matrix_zero={"precision": ["fp16"]})
    reason = "tiny-fp16-zero3: DeepSpeed on CPU has no fp16 mode"
    local = subprocess.run(["snakemake", "-n", "--cores", "1"], cwd=repo, env=ENV, capture_output=True, text=True,
                           timeout=300)
    assert local.returncode != 0 and reason in local.stdout + local.stderr
    jobs = dry_run_jobs(repo, "--profile", "profiles/slurm")  # no refusal on the submit host
    assert jobs["train", "tiny-fp16-zero3"]["gres"] == "gpu:2"
