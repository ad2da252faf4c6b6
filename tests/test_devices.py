"""GPUs on a CPU machine: a fake `nvidia-smi` on PATH answers like the real one (index, UUID, compute
capability, name), so the GPU pool, the leases' lock keys, the bf16 refusal and the one device decision are
exercised as a GPU machine would exercise them."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import params_with
from workflow import cli, devices, train
from workflow.errors import ParamsError, StepError
from workflow.params import load_params, refusal

ROOT = Path(__file__).resolve().parents[1]
H100 = ("0", "GPU-5e1b6a4c-0000-4000-8000-000000000001", "9.0", "NVIDIA H100 80GB HBM3")
A10 = ("1", "GPU-9d0f2a71-0000-4000-8000-000000000002", "8.6", "NVIDIA A10")
V100 = ("0", "GPU-77aa13c2-0000-4000-8000-000000000003", "7.0", "Tesla V100-SXM2-32GB")


def fake_nvidia_smi(bin_dir: Path, *gpus: tuple[str, str, str, str], compute_cap: bool = True) -> Path:
    """An `nvidia-smi` that answers `--query-gpu=<fields> --format=csv,noheader` for `gpus` as the real one
    does (and, like drivers before 510 without `compute_cap`, fails on that field when told to)."""
    bin_dir.mkdir(parents=True, exist_ok=True)
    rows = {g[0]: dict(zip(("index", "uuid", "compute_cap", "name"), g)) for g in gpus}
    script = bin_dir / "nvidia-smi"
    script.write_text(f"""#!{sys.executable}
import sys
rows = {list(rows.values())!r}
fields = next(a for a in sys.argv[1:] if a.startswith("--query-gpu=")).split("=", 1)[1].split(",")
if "compute_cap" in fields and not {compute_cap!r}:
    print('Field "compute_cap" is not a valid field to query.', file=sys.stderr)
    sys.exit(2)
for row in rows:
    print(", ".join(row[f] for f in fields))
""")
    script.chmod(0o755)
    return bin_dir


def env_with(bin_dir: Path | None, **extra: str) -> dict[str, str]:
    """An environment whose PATH starts with `bin_dir` (or has no nvidia-smi at all), without lease variables."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("CUDA_VISIBLE_DEVICES", devices.LEASED, devices.SIMULATED) and not k.startswith("SLURM_")}
    env["PATH"] = os.pathsep.join([str(bin_dir)] if bin_dir else []) + os.pathsep + "/usr/bin:/bin"
    env.update(extra)
    return env


# --- bf16 needs compute capability 8.0 -------------------------------------------------------------------------


def test_bf16_needs_compute_capability_8():
    assert [devices.bf16_capable(c) for c in ((6, 1), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0))] == \
        [False, False, False, True, True, True, True, True]  # P100, V100, T4 | A100, A10, L4, H100, Blackwell


def test_bf16_and_nf4_are_refused_on_pre_ampere_gpus():
    params = load_params(ROOT / "params.yaml")
    v100, a100 = [("Tesla V100-SXM2-32GB", (7, 0))], [("NVIDIA A100-SXM4-80GB", (8, 0))]
    for precision in ("bf16", "nf4"):
        reason = refusal(params, "tiny", precision, "single", "cuda", v100)
        assert reason.startswith(f"tiny-{precision}-single: {precision} computes in bfloat16, which needs GPUs of "
                                 "compute capability 8.0+") and "Tesla V100-SXM2-32GB (7.0)" in reason, reason
        assert refusal(params, "tiny", precision, "single", "cuda", a100) is None
        assert refusal(params, "tiny", precision, "single", "cuda", a100 + v100) is not None  # a lease may get it
        assert refusal(params, "tiny", precision, "single", "cpu") is None  # CPU autocast has bf16
    assert refusal(params, "tiny", "fp16", "single", "cuda", v100) is None
    assert refusal(params, "tiny", "int8", "zero2", "cuda", v100) is None


def test_snakemake_refuses_bf16_on_a_v100_before_any_job(tmp_path):
    """Read from nvidia-smi at parse time (no CUDA in the Snakemake process), so download never starts."""
    from tests.test_workflow import make_project

    repo = make_project(tmp_path / "repo")
    env = env_with(fake_nvidia_smi(tmp_path / "bin", V100))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    proc = subprocess.run(["snakemake", "--cores", "1", "--resources", "gpu=2"], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "tiny-bf16-single: bf16 computes in bfloat16" in out, out[-3000:]
    assert "Tesla V100-SXM2-32GB (7.0)" in out and not (repo / "results/models/tiny").exists()


# --- the pool, read from nvidia-smi -----------------------------------------------------------------------------


def test_pool_reads_ids_uuids_and_capabilities_from_nvidia_smi(tmp_path):
    bin_dir = fake_nvidia_smi(tmp_path / "bin", H100, A10)
    pool = devices.gpu_pool(env_with(bin_dir))
    assert [(g.id, g.key, g.capability, g.name) for g in pool] == [
        ("0", H100[1], (9, 0), H100[3]), ("1", A10[1], (8, 6), A10[3])]
    assert [g.key for g in devices.gpu_pool(env_with(bin_dir, CUDA_VISIBLE_DEVICES="1"))] == [A10[1]]
    assert [g.id for g in devices.gpu_pool(env_with(bin_dir, CUDA_VISIBLE_DEVICES="1,-1,0"))] == ["1"]  # as CUDA
    by_uuid = devices.gpu_pool(env_with(bin_dir, CUDA_VISIBLE_DEVICES=A10[1][:12]))  # CUDA takes UUID prefixes
    assert [(g.id, g.key, g.capability) for g in by_uuid] == [(A10[1][:12], A10[1], (8, 6))]
    assert devices.gpu_pool(env_with(bin_dir, CUDA_VISIBLE_DEVICES="")) == []  # hidden: a CPU run
    machine = devices.this_machine(env_with(bin_dir))
    assert machine.device == "cuda" and machine.described() == [(H100[3], (9, 0)), (A10[3], (8, 6))]
    # no nvidia-smi: no GPUs, whatever CUDA_VISIBLE_DEVICES says (a CPU machine with the variable exported)
    assert devices.gpu_pool(env_with(None, CUDA_VISIBLE_DEVICES="0")) == []
    assert devices.job_device(environ=env_with(None, CUDA_VISIBLE_DEVICES="0")) == "cpu"
    # a driver without the compute_cap field: the GPUs are still there, their capability unknown
    old = fake_nvidia_smi(tmp_path / "old", V100, compute_cap=False)
    assert [(g.key, g.capability) for g in devices.gpu_pool(env_with(old))] == [(V100[1], None)]


HOLDER = """
import os, sys, time
from workflow import devices
if len(sys.argv) > 2:  # become another user once Python runs (its interpreter may sit in root's home)
    os.setgid(int(sys.argv[2]))
    os.setuid(int(sys.argv[2]))
lease = devices.acquire(1, sys.argv[1], 0, "job")
print(",".join(lease.keys), flush=True)
time.sleep(600)
"""


def hold_one(lock_dir: Path, env: dict[str, str], uid: int | None = None) -> tuple[subprocess.Popen, str]:
    """A job (of user `uid`) that leases one GPU of its pool and keeps it: the process and its lock key (or
    its error)."""
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock_dir), *([str(uid)] if uid else [])], cwd=ROOT,
                            env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = proc.stdout.readline().strip()
    if not line:
        proc.wait()
        return proc, proc.stderr.read().strip().splitlines()[-1]
    return proc, line


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.kill()
        proc.wait()


def test_jobs_that_each_see_their_gpu_as_0_lease_by_identity(tmp_path):
    """Under SLURM's cgroups (or in containers) every job sees its own GPU as index 0: leases keyed by the
    index made the second job wait for the first one's lock on another GPU."""
    locks = tmp_path / "locks"
    mine = fake_nvidia_smi(tmp_path / "a", H100)
    other = fake_nvidia_smi(tmp_path / "b", ("0", *A10[1:]))
    # two containers on one machine, sharing /tmp, each given one GPU: the UUIDs tell them apart
    a, key_a = hold_one(locks, env_with(mine, CUDA_VISIBLE_DEVICES="0"))
    b, key_b = hold_one(locks, env_with(other, CUDA_VISIBLE_DEVICES="0"))
    c, key_c = hold_one(locks, env_with(mine, CUDA_VISIBLE_DEVICES="0"))  # the same GPU again
    try:
        assert (key_a, key_b) == (H100[1], A10[1])
        assert key_c.startswith("workflow.errors.StepError: job: no 1 free GPU(s) among 0 within 0 s"), key_c
    finally:
        stop(a, b, c)
    # two SLURM jobs on one node: SLURM gave them different GPUs, so their leases never collide ...
    a, key_a = hold_one(locks, env_with(mine, CUDA_VISIBLE_DEVICES="0", SLURM_JOB_ID="101"))
    b, key_b = hold_one(locks, env_with(mine, CUDA_VISIBLE_DEVICES="0", SLURM_JOB_ID="102"))
    # ... while two steps of one job (a local run inside an allocation) still share its GPUs out
    c, key_c = hold_one(locks, env_with(mine, CUDA_VISIBLE_DEVICES="0", SLURM_JOB_ID="101"))
    # a job SLURM gave no GPU may still see the node's (no cgroup): it leases by UUID, like any other process
    d, key_d = hold_one(locks, env_with(mine, SLURM_JOB_ID="103"))
    try:
        assert (key_a, key_b, key_d) == ("slurm101-0", "slurm102-0", H100[1])
        assert "no 1 free GPU(s) among 0" in key_c, key_c
    finally:
        stop(a, b, c, d)


def test_the_lock_directory_is_shared_by_every_user(tmp_path):
    """The first user's umask must not lock the others out: the directory is 1777, the lock files 0666."""
    locks = tmp_path / "shared" / "locks"
    before = os.umask(0o077)
    try:
        lease = devices.acquire(1, locks, 0, "job", pool=["0", "1"])
    finally:
        os.umask(before)
    try:
        assert stat.S_IMODE(locks.stat().st_mode) == 0o1777
        assert stat.S_IMODE((locks / "gpu-0.lock").stat().st_mode) == 0o666
    finally:
        lease.release()
    old = tmp_path / "old"  # a directory an older version made 0755 and this user owns: opened up
    old.mkdir(mode=0o755)
    devices.acquire(1, old, 0, "job", pool=["0"]).release()
    assert stat.S_IMODE(old.stat().st_mode) == 0o1777


def test_a_second_user_leases_from_the_first_users_lock_files(tmp_path):
    """Two real users (this test runs as root, as CI does, and switches to two unprivileged uids)."""
    assert os.geteuid() == 0, "this test switches users: run the suite as root (as .ci/run and this machine do)"
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="lowprec-users-"))
    try:
        os.chmod(top, 0o1777)  # like /tmp, where the default lock directory is made
        locks = top / "locks"
        env = env_with(None, **{devices.SIMULATED: "2"}, HOME=str(top))
        a, key_a = hold_one(locks, env, uid=54321)  # creates the directory and gpu-0.lock
        b, key_b = hold_one(locks, env, uid=54322)  # opens the first user's files
        c, key_c = hold_one(locks, env, uid=54322)
        try:
            assert (key_a, key_b) == ("0", "1"), (key_a, key_b)
            assert "no 1 free GPU(s) among 0,1" in key_c and "PermissionError" not in key_c, key_c
            assert (locks / "gpu-0.lock").stat().st_uid == 54321
        finally:
            stop(a)
        d, key_d = hold_one(locks, env, uid=54322)  # the first user's GPU, once free
        stop(b, c, d)
        assert key_d == "0", key_d
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


def test_a_lock_dir_the_user_cannot_write_is_a_one_line_error():
    assert os.geteuid() == 0, "this test switches users: run the suite as root (as .ci/run and this machine do)"
    env = env_with(None, **{devices.SIMULATED: "1"})
    top = Path(tempfile.mkdtemp(dir="/tmp", prefix="lowprec-ro-"))
    try:
        os.chmod(top, 0o755)
        (top / "locks").mkdir(mode=0o755)  # root's, not writable for the job's user
        proc, line = hold_one(top / "locks", env, uid=54323)
        assert line.startswith(f"workflow.errors.StepError: {top / 'locks'}: cannot create GPU lock files there"), line
        assert f"chmod 1777 {top / 'locks'}" in line and "distributed.gpu_lock_dir" in line
    finally:
        subprocess.run(["rm", "-rf", str(top)], check=True)


# --- one place decides the device ------------------------------------------------------------------------------


def test_a_gpu_machine_whose_torch_cannot_use_the_gpu_fails_instead_of_training_on_the_cpu(tmp_path, monkeypatch,
                                                                                           capsys):
    """nvidia-smi lists an H100, torch is this machine's CPU build: the train step leases the GPU, then fails
    before loading anything, where it used to train on the CPU."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", f"{fake_nvidia_smi(tmp_path / 'bin', H100)}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)  # the lease sets it: restored after the test
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    params = params_with(tmp_path, distributed={"gpu_lock_dir": str(tmp_path / "locks")})
    argv = ["--params", str(params), "--model", "tiny", "--precision", "bf16", "--strategy", "single",
            "--model-dir", "m", "--data", "d", "--out", "a", "--metrics", "t.json", "--curve", "c.csv",
            "--timing", "x.json", "--live", "live"]
    rc = cli.run(train.main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and "Traceback" not in "\n".join(err), err
    assert err[-1].startswith("error: this machine has 1 GPU(s) (NVIDIA H100 80GB HBM3) but torch ") and \
        "cannot use them (a CPU-only build)" in err[-1] and "CUDA_VISIBLE_DEVICES=" in err[-1], err[-1]
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "0"  # it did lease the GPU first (conftest restores the variable)


def test_torch_seeing_gpus_that_nvidia_smi_does_not_list_is_an_error(monkeypatch):
    import torch

    from workflow.precision import compute_device

    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no nvidia-smi: nothing to lease with
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(devices.SIMULATED, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # what a CUDA torch on a GPU machine says
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(StepError, match=r"torch sees 2 CUDA device\(s\) but nvidia-smi lists none"):
        compute_device()


def test_refusals_and_the_plan_follow_the_same_device(tmp_path, monkeypatch):
    """The device the refusals checked (nvidia-smi) is the one the plan is made for (torch only confirms)."""
    from workflow.precision import resolve_precision

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    monkeypatch.delenv(devices.SIMULATED, raising=False)
    assert devices.job_device() == "cpu" and resolve_precision("nf4").device == "cpu"
    monkeypatch.setenv(devices.SIMULATED, "2")  # the tests' pretend GPUs: leased, computed on the CPU
    assert devices.job_device() == "cpu" and resolve_precision("fp16").amp == "none"
    with pytest.raises(StepError, match=r"computes in bfloat16, which needs a GPU of compute capability 8.0\+"):
        resolve_precision("bf16", "cuda", capability=(7, 5))  # a T4
    assert resolve_precision("bf16", "cuda", capability=(8, 0)).amp == "bf16"


def test_a_step_without_gpus_inside_a_slurm_job_checks_no_device(tmp_path, monkeypatch):
    """The download, preprocess and report jobs of a cluster run may land on nodes without GPUs: they check
    params.yaml, not the node; the variant steps check the node they run on."""
    params = params_with(tmp_path, matrix_zero={"precision": ["fp16"]})  # fp16 x zero3: refused on a CPU
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    download = cli.parser("download", "download").parse_args(["--params", str(params), "--model", "tiny"])
    with pytest.raises(ParamsError, match="tiny-fp16-zero3: DeepSpeed on CPU has no fp16 mode"):
        cli.load_checked(download)  # outside SLURM: this machine runs every job
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    assert cli.load_checked(download).matrix_zero.precision == ["fp16"]
    for step in cli.GPU_STEPS:
        args = cli.parser(step, step, variant=True).parse_args(["--params", str(params), "--model", "tiny",
                                                               "--precision", "fp16", "--strategy", "zero3"])
        with pytest.raises(ParamsError, match="tiny-fp16-zero3: DeepSpeed on CPU has no fp16 mode"):
            cli.load_checked(args)
