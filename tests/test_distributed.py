"""DeepSpeed strategies: the generated config and launch commands, GPU-id leases, the saved-adapter check,
the profiles, and real 2-process ZeRO training on CPU through both launchers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import params_with
from tests.test_devices import fake_nvidia_smi
from workflow import devices, distributed
from workflow.cli import StepError
from workflow.params import load_params, variants

ROOT = Path(__file__).resolve().parents[1]
ARGV = ["--params", "params.yaml", "--model", "tiny", "--precision", "bf16", "--strategy", "zero2"]
EIGHT = [(str(i), f"GPU-0000000{i}-0000-4000-8000-000000000000", "8.0", "NVIDIA A100-SXM4-80GB") for i in range(8)]


@pytest.fixture(scope="module")
def params():
    return load_params(ROOT / "params.yaml")


# --- the DeepSpeed config --------------------------------------------------------------------------------


def test_deepspeed_config_is_generated_from_params_with_auto_values_filled(params, builtin_model_dir):
    targs = params.train.model_copy(update={"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3})
    z2 = distributed.deepspeed_config("zero2", params.strategy("zero2"), targs, "bf16", 2, builtin_model_dir, False)
    assert z2["zero_optimization"]["stage"] == 2
    assert (z2["train_micro_batch_size_per_gpu"], z2["gradient_accumulation_steps"], z2["train_batch_size"]) == (4, 3, 24)
    assert z2["gradient_clipping"] == targs.max_grad_norm
    assert z2["bf16"] == {"enabled": True} and z2["fp16"]["enabled"] is False
    hidden = json.loads((builtin_model_dir / "config.json").read_text())["hidden_size"]
    assert z2["zero_optimization"]["reduce_bucket_size"] == hidden * hidden  # what "auto" would become
    assert "auto" not in json.dumps(z2)

    offload = params.strategy("zero3").model_copy(update={"offload_optimizer": True, "offload_params": True})
    z3 = distributed.deepspeed_config("zero3", offload, targs, "fp16", 4, builtin_model_dir, True)
    zero = z3["zero_optimization"]
    assert zero["stage"] == 3 and zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden and z3["train_batch_size"] == 48
    assert z3["fp16"]["enabled"] is True and z3["bf16"]["enabled"] is False


# --- launch commands ----------------------------------------------------------------------------------------


def with_distributed(params, strategy: str | None = None, **changes):
    """params with `distributed` keys (or, with `strategy`, that strategy's keys) changed."""
    if strategy:
        strategies = dict(params.strategies)
        strategies[strategy] = strategies[strategy].model_copy(update=changes)
        return params.model_copy(update={"strategies": strategies})
    return params.model_copy(update={"distributed": params.distributed.model_copy(update=changes)})


def test_single_node_torchrun_command(params):
    cmd = distributed.launch_command(params, "zero2", ARGV, environ={})
    assert cmd == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
                   "-m", "workflow.train", *ARGV]


def test_multi_node_torchrun_command_under_slurm(params):
    p = with_distributed(params, "zero3", nodes="slurm", gpus=4)
    env = {"SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    cmd = distributed.launch_command(p, "zero3", ARGV, environ=env)
    assert cmd == ["srun", "--overlap", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                   sys.executable, "-m", "torch.distributed.run",
                   "--nproc_per_node=4", "--nnodes=2", "--rdzv_backend=c10d", "--rdzv_endpoint=gpu07:29500",
                   "--rdzv_id=4242", "-m", "workflow.train", *ARGV]  # tests/test_cluster.py runs it in a job step
    # a fixed node count and rendezvous host from params.yaml, outside SLURM: no srun, one launcher per node
    p = with_distributed(with_distributed(params, "zero3", nodes=3), master_addr="10.0.0.5", master_port=6000)
    cmd = distributed.launch_command(p, "zero3", ARGV, environ={})
    assert cmd[:4] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    assert "--nnodes=3" in cmd and "--rdzv_endpoint=10.0.0.5:6000" in cmd and "--rdzv_id=lowprec" in cmd
    with pytest.raises(StepError, match="not a SLURM job"):
        distributed.launch_command(with_distributed(params, "zero2", nodes="slurm"), "zero2", ARGV, environ={})


def test_deepspeed_launcher_commands(params):
    p = with_distributed(params, launcher="deepspeed")
    cmd = distributed.launch_command(p, "zero2", ARGV, environ={})
    assert cmd[:4] == [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank"]
    assert re.fullmatch(r"--master_port=\d+", cmd[4]) and cmd[5:] == ["--module", "workflow.train", *ARGV]
    multi = with_distributed(with_distributed(p, hostfile="/etc/hostfile", master_addr="n1"), "zero2", nodes=2)
    cmd = distributed.launch_command(multi, "zero2", ARGV, environ={})
    assert cmd[4:8] == ["--master_port=29500", "--hostfile=/etc/hostfile", "--num_nodes=2", "--master_addr=n1"]
    with pytest.raises(StepError, match="needs distributed.hostfile"):
        distributed.launch_command(with_distributed(p, "zero2", nodes=2), "zero2", ARGV, environ={})


def test_first_host_of_a_slurm_nodelist():
    assert distributed.first_host("gpu[03-05,07],cpu1") == "gpu03"
    assert distributed.first_host("node12,node13") == "node12"
    assert distributed.first_host("a100-[1-4]") == "a100-1"


def test_cpu_launch_environment(params):
    env = distributed.launch_env(params, "zero2", [], environ={"PATH": "/bin"})
    assert env["DS_ACCELERATOR"] == "cpu" and env["LOCAL_SIZE"] == "2"
    assert int(env["OMP_NUM_THREADS"]) == max(1, len(os.sched_getaffinity(0)) // 2)
    budget = distributed.launch_env(params, "zero2", [], environ={"OMP_NUM_THREADS": "16"})  # Snakemake's threads
    assert budget["OMP_NUM_THREADS"] == budget["MKL_NUM_THREADS"] == "8"  # shared by the 2 ranks, not 16 each
    assert env["TORCH_EXTENSIONS_DIR"].endswith("results/cache/torch_extensions")
    gpu = distributed.launch_env(params, "zero2", ["2", "3"], environ={"PATH": "/bin"})
    assert "DS_ACCELERATOR" not in gpu and "LOCAL_SIZE" not in gpu


# --- GPU ids ------------------------------------------------------------------------------------------------

HOLDER = """
import sys, time
from workflow import devices
lease = devices.acquire(int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), "job", pool=["0", "1", "2"])
print(",".join(lease.ids), flush=True)
time.sleep(600)
"""


def hold(n: int, lock_dir: Path, wait_s: float = 0) -> tuple[subprocess.Popen, list[str]]:
    """A separate process that leases `n` of 3 simulated GPUs and keeps them; returns it and its ids."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(n), str(lock_dir), str(wait_s)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait()
        raise StepError(proc.stderr.read().strip().splitlines()[-1])
    return proc, line.split(",")


def test_concurrent_jobs_get_disjoint_gpu_ids_and_a_killed_job_frees_them(tmp_path):
    a, ids_a = hold(1, tmp_path)
    b, ids_b = hold(2, tmp_path)
    try:
        assert len(ids_a) == 1 and len(ids_b) == 2 and not set(ids_a) & set(ids_b)
        assert sorted(ids_a + ids_b) == ["0", "1", "2"]
        with pytest.raises(StepError, match=r"no 1 free GPU\(s\) among 0,1,2 within 0 s"):
            hold(1, tmp_path)  # all three are leased
        assert (tmp_path / f"gpu-{ids_a[0]}.lock").read_text().startswith(f"{a.pid} job")
        a.send_signal(signal.SIGKILL)  # a crash: the kernel drops its locks
        a.wait()
        c, ids_c = hold(1, tmp_path, wait_s=30)
        c.kill()
        assert ids_c == ids_a
    finally:
        for proc in (a, b):
            proc.kill()
            proc.wait()


def test_a_waiting_job_gets_the_ids_when_they_are_released(tmp_path):
    a, ids_a = hold(3, tmp_path)
    start = time.monotonic()
    waiter = subprocess.Popen([sys.executable, "-c", HOLDER, "2", str(tmp_path), "60"], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1.0)
        assert waiter.poll() is None  # still waiting, holding nothing
        a.kill()
        a.wait()
        got = waiter.stdout.readline().strip().split(",")
        assert len(got) == 2 and set(got) <= {"0", "1", "2"} and time.monotonic() - start < 60
    finally:
        waiter.kill()
        waiter.wait()


def test_lease_sets_cuda_visible_devices_and_refuses_more_than_the_machine_has(tmp_path, monkeypatch):
    monkeypatch.setenv(devices.SIMULATED, "2")
    for name in ("CUDA_VISIBLE_DEVICES", devices.LEASED):  # so that monkeypatch restores them after the lease
        monkeypatch.setenv(name, "")
    assert devices.device_pool() == ["0", "1"]
    lease = devices.lease_gpus(2, tmp_path, 0, "tiny-bf16-zero2")
    try:
        assert os.environ["CUDA_VISIBLE_DEVICES"] == os.environ[devices.LEASED] == "0,1" and lease.ids == ["0", "1"]
    finally:
        lease.release()
    with pytest.raises(StepError, match=r"tiny-bf16-zero2: needs 3 GPUs but this machine offers 2 \(0,1\)"):
        devices.acquire(3, tmp_path, 0, "tiny-bf16-zero2")
    monkeypatch.delenv(devices.SIMULATED)
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', *EIGHT)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")  # what SLURM gives a job: lease within it
    assert devices.device_pool() == ["4", "6"]
    assert devices.acquire(1, tmp_path, 0, "job", pool=[]).ids == []  # no GPUs: the job runs on the CPU


# --- the saved adapter of a ZeRO run ------------------------------------------------------------------------


def test_saved_adapter_check_catches_the_empty_zero3_save(tmp_path):
    from workflow.trainer import check_saved_adapter

    expected = {"a.lora_A.default.weight": (8, 128), "a.lora_B.default.weight": (128, 8)}
    good = {"a.lora_A.weight": torch.randn(8, 128), "a.lora_B.weight": torch.randn(128, 8)}
    save_file(good, tmp_path / "adapter_model.safetensors")
    check_saved_adapter(tmp_path, expected)
    for bad, message in (
        ({"a.lora_A.weight": torch.empty(0), "a.lora_B.weight": torch.empty(0)}, "empty or incomplete"),
        ({"a.lora_A.weight": torch.randn(8, 128)}, "empty or incomplete"),
        ({"a.lora_A.weight": torch.randn(8, 128), "a.lora_B.weight": torch.zeros(128, 8)}, "untrained"),
    ):
        save_file(bad, tmp_path / "adapter_model.safetensors")
        with pytest.raises(StepError, match=message):
            check_saved_adapter(tmp_path, expected)


# --- real ZeRO training on CPU, 2 processes -----------------------------------------------------------------


def train_cli(workdir: Path, params: Path, model_dir: Path, data_dir: Path, precision: str, strategy: str,
              environ: dict | None = None) -> subprocess.CompletedProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "workflow.train", "--params", str(params), "--model", "tiny",
           "--precision", precision, "--strategy", strategy, "--model-dir", str(model_dir), "--data", str(data_dir),
           "--out", "adapter", "--metrics", "train.json", "--timing", "timing.json", "--live", "live",
           "--curve", "loss.csv"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TORCH_EXTENSIONS_DIR": str(ROOT / distributed.TORCH_EXTENSIONS),
           **(environ or {})}
    return subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=900)


@pytest.mark.parametrize("precision, strategy", [("nf4", "zero3"), ("int8", "zero2")])
def test_quantized_zero_variants_train_and_save_real_adapters(precision, strategy, builtin_model_dir,
                                                              tiny_data_dir, tmp_path):
    """QLoRA under ZeRO-3 (bf16 storage, no device_map) and LLM.int8 under ZeRO-2, 2 processes on CPU."""
    params = params_with(tmp_path, train={"max_steps": 12, "logging_steps": 2, "save_steps": 100},
                         distributed={"gpu_lock_dir": str(tmp_path / "locks")})
    shm = set(distributed.SHM_DIR.glob("deepspeed_allreduce_buffer_*"))
    proc = train_cli(tmp_path / "run", params, builtin_model_dir, tiny_data_dir, precision, strategy,
                     {devices.SIMULATED: "2"})  # two simulated GPUs: the job leases both
    assert proc.returncode == 0, proc.stderr[-4000:]
    # DeepSpeed's CPU allreduce buffers (69 MB a rank) went with the ranks instead of staying in /dev/shm
    assert set(distributed.SHM_DIR.glob("deepspeed_allreduce_buffer_*")) <= shm
    run = tmp_path / "run"
    metrics = json.loads((run / "train.json").read_text())
    timing = json.loads((run / "timing.json").read_text())
    assert metrics["processes"] == timing["processes"] == 2 and timing["gpu_ids"] == ["0", "1"]
    assert metrics["deepspeed"]["zero_optimization"]["stage"] == int(strategy[-1])
    assert json.loads((run / "adapter/deepspeed_config.json").read_text()) == metrics["deepspeed"]
    assert metrics["train_loss_last"] < 0.5 * metrics["train_loss_first"]
    storage = {"nf4": "bfloat16", "int8": "int8"}[precision]
    assert metrics["resolved"]["quantization"]["storage_dtype"] == storage
    assert metrics["linear_storage"] == {"nf4": "nf4+double_quant", "int8": "llm.int8"}[precision]
    weights = load_file(run / "adapter/adapter_model.safetensors")
    assert weights and all(t.numel() > 0 for t in weights.values())
    assert not (run / "adapter/training_args.bin").exists()  # no pickle beside the adapter
    assert timing["launch_command"].split()[1:4] == ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    if precision != "int8":
        return
    # Merging the ZeRO-trained adapter, with GPU 0 of 2 (simulated) held by another job: the merge step
    # leases the free one, re-executes itself with only that id visible, and holds it until it ends.
    holder, held = hold(1, tmp_path / "locks")
    try:
        assert held == ["0"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), devices.SIMULATED: "2", "LOWPREC_LOG_LEVEL": "INFO"}
        merge = subprocess.run(
            [sys.executable, "-m", "workflow.merge", "--params", str(params), "--model", "tiny", "--precision",
             precision, "--strategy", strategy, "--model-dir", str(builtin_model_dir), "--adapter", "adapter",
             "--data", str(tiny_data_dir), "--out", "merged", "--metrics", "merge.json"],
            cwd=run, env=env, capture_output=True, text=True, timeout=600)
    finally:
        holder.kill()
        holder.wait()
    assert merge.returncode == 0, merge.stderr[-3000:]
    assert f"{precision}-{strategy}: leased GPU(s) 1 from {tmp_path / 'locks'}" in merge.stderr
    assert merge.stderr.count("leased GPU(s)") == 1  # the re-executed run reuses the lease
    assert json.loads((run / "merge.json").read_text())["merge_max_abs_logit_diff"] <= \
        json.loads((run / "merge.json").read_text())["merge_tolerance"]


def test_both_launchers_train_the_same_adapter(builtin_model_dir, tiny_data_dir, tmp_path):
    """`deepspeed` and `torchrun` start the same two ranks: same losses, same adapter weights."""
    results = {}
    for launcher in ("torchrun", "deepspeed"):
        (tmp_path / launcher).mkdir()
        params = params_with(tmp_path / launcher, train={"max_steps": 10, "logging_steps": 2, "save_steps": 100},
                             distributed={"launcher": launcher})
        proc = train_cli(tmp_path / launcher, params, builtin_model_dir, tiny_data_dir, "bf16", "zero2")
        assert proc.returncode == 0, proc.stderr[-4000:]
        results[launcher] = tmp_path / launcher
    a, b = (load_file(d / "adapter/adapter_model.safetensors") for d in results.values())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (results["torchrun"] / "loss.csv").read_text() == (results["deepspeed"] / "loss.csv").read_text()
    timing = json.loads((results["deepspeed"] / "timing.json").read_text())
    assert "deepspeed.launcher.runner" in timing["launch_command"]


def test_a_failing_rank_fails_the_step_with_its_own_message(builtin_model_dir, tmp_path):
    """The workers' one-line error becomes the step's last line (here: no tokenized data)."""
    params = params_with(tmp_path)
    proc = train_cli(tmp_path / "run", params, builtin_model_dir, tmp_path / "nodata", "bf16", "zero2")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nodata'}/train: no tokenized data; " \
                                                   "run the preprocess step first"
    assert not (tmp_path / "run/adapter").exists() and not (tmp_path / "run/train.json").exists()


# --- profiles -------------------------------------------------------------------------------------------------


def dry_run_resources(profile: str) -> dict[str, dict[str, str]]:
    """variant -> resources of its train job, from a forced dry run with the profile."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["snakemake", "-n", "--forceall", "--profile", profile], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    jobs = {}
    for block in out.stdout.split("\nrule train:")[1:]:
        wildcards = dict(re.findall(r"(\w+)=(\w+)", re.search(r"wildcards: (.*)", block).group(1)))
        resources = dict(re.findall(r"(\w+)=([^,\s]+)", re.search(r"resources: (.*)", block).group(1)))
        jobs["-".join(wildcards[k] for k in ("model", "precision", "strategy"))] = resources
    return jobs


def test_local_profile_dry_run(params):
    jobs = dry_run_resources("profiles/local")
    assert {v: r["gpu"] for v, r in jobs.items()} == {
        v["id"]: "1" if v["strategy"] == "single" else "2" for v in variants(params)}


# --- refusals before any compute, in both orchestrators -------------------------------------------------------


def test_snakemake_refuses_more_gpus_than_its_resources_at_parse_time():
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.run(["snakemake", "-n", "--cores", "1", "--resources", "gpu=1"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert ("tiny-fp16-zero2: strategies.zero2.gpus is 2 but --resources gpu=1; run with --resources gpu=2 (or "
            "more), or lower strategies.zero2.gpus") in proc.stdout + proc.stderr


@pytest.mark.parametrize("precision, reason", [
    ("int8", "tiny-int8-zero3: bitsandbytes LLM.int8 weights cannot be partitioned by ZeRO-3"),
    ("fp16", "tiny-fp16-zero3: DeepSpeed on CPU has no fp16 mode"),  # this machine's limit, not the matrix's
])
def test_an_impossible_matrix_stops_snakemake_and_dvc_before_any_job(tmp_path, precision, reason):
    from tests.test_workflow import ENV, make_project

    repo = make_project(tmp_path)
    params_with(repo, repo / "params.yaml", matrix_zero={"precision": [precision]})
    smk = subprocess.run(["snakemake", "--cores", "1"], cwd=repo, env=ENV, capture_output=True, text=True)
    assert smk.returncode != 0 and reason in smk.stdout + smk.stderr
    subprocess.run(["dvc", "init", "-q", "-f"], cwd=repo, env=ENV, check=True)
    dvc = subprocess.run(["dvc", "repro"], cwd=repo, env=ENV, capture_output=True, text=True)
    assert dvc.returncode != 0 and reason in dvc.stdout + dvc.stderr
    assert "Running stage 'download@tiny'" in dvc.stdout  # refused in the first stage, before any model exists
    assert not (repo / "results/models/tiny").exists()
