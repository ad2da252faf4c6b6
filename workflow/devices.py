"""Which GPUs a job uses: Snakemake's `--resources gpu=N` limits how many GPU jobs run at once but never
tells a job *which* GPUs are free, so every job would pick GPU 0. A job leases N device ids instead.

A lease is an exclusive `flock` on `<lock_dir>/gpu-<id>.lock` for each id, held by the job's process and
released by the kernel when it exits, crash or SIGKILL included, so a dead job never keeps a GPU. The ids
go into `CUDA_VISIBLE_DEVICES` before CUDA is initialised. Imports no torch.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from workflow.errors import StepError

log = logging.getLogger(__name__)
SIMULATED = "LOWPREC_GPU_COUNT"  # pretend the machine has this many GPUs (tests on a CPU machine)
POLL_S = 0.5  # how often a waiting job retries


def device_pool(environ: dict[str, str] | None = None) -> list[str]:
    """The GPU ids this machine (or this SLURM allocation) offers; empty on a CPU-only machine."""
    env = os.environ if environ is None else environ
    if env.get(SIMULATED):
        return [str(i) for i in range(int(env[SIMULATED]))]
    if env.get("CUDA_VISIBLE_DEVICES") is not None:  # set by SLURM or the user: lease within it
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() and d.strip() != "-1"]
    try:  # nvidia-smi, not torch: asking torch would initialise CUDA before CUDA_VISIBLE_DEVICES is set
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def job_device(pool: list[str] | None = None, environ: dict[str, str] | None = None) -> str:
    """Where this machine's jobs compute: "cuda" when it has GPUs (`pool`, default `device_pool()`), else "cpu".
    Simulated GPUs (SIMULATED, for tests) are leased like real ones but compute on the CPU."""
    env = os.environ if environ is None else environ
    pool = device_pool(env) if pool is None else pool
    return "cuda" if pool and not env.get(SIMULATED) else "cpu"


@dataclass
class Lease:
    """GPU ids held by this process until `release()` or exit."""

    ids: list[str]
    _files: list[IO] = field(default_factory=list, repr=False)

    def release(self) -> None:
        for f in self._files:
            f.close()  # closing the last descriptor drops the flock
        self._files.clear()


def _try_lock(path: Path) -> IO | None:
    f = open(path, "a+")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def acquire(n: int, lock_dir: str | Path, wait_s: float, job: str, pool: list[str] | None = None) -> Lease:
    """Lease `n` free ids of `pool` (default: `device_pool()`), waiting up to `wait_s` seconds for them.

    Never holds part of a lease while waiting (no two jobs can deadlock on each other's halves). On a machine
    without GPUs the lease is empty: the job runs on the CPU.
    """
    pool = device_pool() if pool is None else pool
    if not pool:
        return Lease([])
    if n > len(pool):
        raise StepError(f"{job}: needs {n} GPUs but this machine offers {len(pool)} ({','.join(pool)}); lower "
                        "strategies.<strategy>.gpus in params.yaml or run on a machine with more GPUs")
    lock_dir = Path(lock_dir)
    lock_dir.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        held: list[tuple[str, IO]] = []
        for dev in pool:
            f = _try_lock(lock_dir / f"gpu-{dev}.lock")
            if f is not None:
                held.append((dev, f))
                if len(held) == n:
                    break
        if len(held) == n:
            for dev, f in held:  # who holds it, for people looking at the lock directory
                f.seek(0)
                f.truncate()
                f.write(f"{os.getpid()} {job}\n")
                f.flush()
            lease = Lease([dev for dev, _ in held], [f for _, f in held])
            log.info("%s: leased GPU(s) %s from %s", job, ",".join(lease.ids), lock_dir)
            return lease
        for _, f in held:
            f.close()
        if time.monotonic() >= deadline:
            raise StepError(f"{job}: no {n} free GPU(s) among {','.join(pool)} within {wait_s:g} s (leases in "
                            f"{lock_dir}); wait for the other jobs or raise distributed.gpu_wait_s")
        if not waited:
            log.info("%s: waiting for %d free GPU(s) among %s", job, n, ",".join(pool))
            waited = True
        time.sleep(POLL_S)


LEASED = "LOWPREC_GPU_IDS"  # set once a job's GPUs are leased: its ranks, or its re-executed self, see them


def lease_gpus(n: int, lock_dir: str | Path, wait_s: float, job: str) -> Lease:
    """Lease `n` GPUs and make them this process's (and its children's) only visible CUDA devices."""
    lease = acquire(n, lock_dir, wait_s, job)
    if lease.ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(lease.ids)
    os.environ[LEASED] = ",".join(lease.ids)
    return lease


def leased_ids() -> list[str] | None:
    """The ids leased for this job by an earlier stage of the same process tree (None: not leased yet)."""
    ids = os.environ.get(LEASED)
    return None if ids is None else [i for i in ids.split(",") if i]


def lease_then_reexec(n: int, lock_dir: str | Path, wait_s: float, job: str, module: str, argv: list[str]) -> None:
    """For a step that has already imported torch (whose libraries may have initialised CUDA): lease `n`
    GPUs, then replace this process with a fresh run of the same command that sees only them. The lock files
    stay open across exec, so the lease lasts until that run ends. A no-op without GPUs or once leased."""
    if leased_ids() is not None or not device_pool():
        return
    lease = lease_gpus(n, lock_dir, wait_s, job)
    for f in lease._files:
        os.set_inheritable(f.fileno(), True)
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
