"""Which GPUs a job uses, and what the machine its jobs run on can do. Imports no torch.

Snakemake's `--resources gpu=N` limits how many GPU jobs run at once but never tells a job *which* GPUs are
free, so every job would pick GPU 0. A job leases N GPUs instead: an exclusive `flock` on
`<lock_dir>/gpu-<key>.lock` for each, held by the job's process and released by the kernel when it exits,
crash or SIGKILL included, so a dead job never keeps a GPU. The ids go into `CUDA_VISIBLE_DEVICES` before
CUDA is initialised.

A lock's key is the GPU's identity, not its index: the index says nothing across jobs that were given
different `CUDA_VISIBLE_DEVICES` (under SLURM's cgroups every job sees its GPU as `0`). Outside SLURM the
key is the GPU's UUID from nvidia-smi, whose indices are read in PCI bus order (the lease sets
`CUDA_DEVICE_ORDER=PCI_BUS_ID` so CUDA counts the same way). Inside a SLURM job that was given GPUs the key
is scoped by the job id: SLURM gives concurrent jobs disjoint GPUs, so leases only have to keep one job's
own steps apart (a local run inside an allocation), and no assumption about how nvidia-smi numbers the GPUs
of a cgroup is needed.

The lock directory is shared by every user of the machine (the GPUs are): created mode 1777 (sticky and
world-writable, like /tmp), its lock files mode 0666, and existing files are opened without O_CREAT (which
the kernel's protected_regular refuses for other users' files in a sticky directory).
"""

from __future__ import annotations

import fcntl
import logging
import os
import re
import shutil
import stat
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
BF16_CAPABILITY = (8, 0)  # native bf16 tensor-core math: Ampere and newer
QUERY = ("index", "uuid", "compute_cap", "name")  # nvidia-smi --query-gpu fields, name last (it may hold commas)


@dataclass(frozen=True)
class Gpu:
    """One GPU a job may use."""

    id: str  # as CUDA_VISIBLE_DEVICES names it: what the job's processes are given
    key: str  # the identity its lease locks (UUID, or SLURM job + id): the same GPU gets the same key
    capability: tuple[int, int] | None = None  # CUDA compute capability (nvidia-smi), None: not known
    name: str = ""


@dataclass(frozen=True)
class Machine:
    """What the jobs of this machine compute on: `device` "cuda" (with its GPUs) or "cpu"."""

    device: str
    gpus: tuple[Gpu, ...] = ()

    def described(self) -> list[tuple[str, tuple[int, int]]]:
        """(name, compute capability) of each GPU whose capability is known, for the refusals."""
        return [(g.name or f"GPU {g.id}", g.capability) for g in self.gpus if g.capability is not None]


def bf16_capable(capability: tuple[int, int]) -> bool:
    """Whether a GPU of this compute capability computes bf16 natively (8.0+). `torch.cuda.is_bf16_supported()`
    answers True on V100 (7.0) and T4 (7.5) too, by default counting emulation, which is slow and not bf16 math."""
    return tuple(capability) >= BF16_CAPABILITY


def _capability(text: str) -> tuple[int, int] | None:
    match = re.fullmatch(r"(\d+)\.(\d+)", text.strip())
    return (int(match.group(1)), int(match.group(2))) if match else None


_inventory_cache: dict[tuple, list[Gpu]] = {}


def inventory(environ: dict[str, str] | None = None) -> list[Gpu]:
    """Every GPU nvidia-smi lists (index, UUID, capability, name); empty without GPUs or without nvidia-smi.
    Asks nvidia-smi, not torch: torch would initialise CUDA before CUDA_VISIBLE_DEVICES is set. nvidia-smi
    ignores CUDA_VISIBLE_DEVICES, so the answer is cached per process (and per nvidia-smi executable)."""
    env = os.environ if environ is None else environ
    exe = shutil.which("nvidia-smi", path=env.get("PATH"))
    if exe is None:
        return []
    cache_key = (exe, os.stat(exe).st_mtime_ns)
    if cache_key not in _inventory_cache:
        _inventory_cache[cache_key] = _query(exe)
    return _inventory_cache[cache_key]


def _query(exe: str) -> list[Gpu]:
    for fields in (QUERY, tuple(f for f in QUERY if f != "compute_cap")):  # drivers before 510 lack compute_cap
        try:
            out = subprocess.run([exe, f"--query-gpu={','.join(fields)}", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        gpus = []
        for line in out.splitlines():
            values = dict(zip(fields, (v.strip() for v in line.split(",", len(fields) - 1))))
            if values.get("index", "").isdigit():
                gpus.append(Gpu(values["index"], values.get("uuid") or values["index"],
                                _capability(values.get("compute_cap", "")), values.get("name", "")))
        return gpus
    return []


def in_slurm_job(environ: dict[str, str] | None = None) -> bool:
    """True inside a SLURM job (batch script, its steps, or an `salloc` shell)."""
    return bool((os.environ if environ is None else environ).get("SLURM_JOB_ID"))


def gpu_pool(environ: dict[str, str] | None = None) -> list[Gpu]:
    """The GPUs this job may lease: those of `CUDA_VISIBLE_DEVICES` (set by SLURM or the user), else every
    GPU nvidia-smi lists; empty on a machine without GPUs (or without nvidia-smi: see
    `workflow.precision.compute_device`, which fails when torch sees GPUs that nvidia-smi does not)."""
    env = os.environ if environ is None else environ
    if env.get(SIMULATED):
        return [Gpu(str(i), str(i)) for i in range(int(env[SIMULATED]))]
    listed = inventory(env)
    if not listed:
        return []
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        entries = [g.id for g in listed]
    else:
        entries = []
        for entry in (e.strip() for e in visible.split(",")):
            if not entry or entry.startswith("-"):
                break  # CUDA ignores everything from the first invalid entry on ("-1" hides all GPUs)
            entries.append(entry)
    same = {g.capability for g in listed}
    common = next(iter(same)) if len(same) == 1 else None  # for ids nvidia-smi's list does not name
    # SLURM gives concurrent jobs disjoint GPUs and says which in CUDA_VISIBLE_DEVICES; a job it gave none may
    # see every GPU of the node (no cgroup), and then only the UUIDs keep it off the others' GPUs.
    slurm = env.get("SLURM_JOB_ID") if in_slurm_job(env) and visible is not None else None
    pool = []
    for entry in entries:
        row = next((g for g in listed if entry in (g.id, g.key) or (entry.startswith("GPU-") and
                                                                     g.key.startswith(entry))), None)
        if slurm:
            key = f"slurm{slurm}-{entry}"  # other jobs have other GPUs: keep this job's own steps apart
        else:
            key = row.key if row else entry
        pool.append(Gpu(entry, key, row.capability if row else common, row.name if row else ""))
    return pool


def device_pool(environ: dict[str, str] | None = None) -> list[str]:
    """The ids of `gpu_pool()`: what this machine (or this SLURM allocation) offers; empty without GPUs."""
    return [g.id for g in gpu_pool(environ)]


def job_device(pool: list | None = None, environ: dict[str, str] | None = None) -> str:
    """The one decision of where this machine's jobs compute: "cuda" when it has GPUs (`pool`, default
    `gpu_pool()`), else "cpu". Simulated GPUs (SIMULATED, for tests) are leased like real ones but compute on
    the CPU. Torch must agree, or the step fails (`workflow.precision.compute_device`)."""
    env = os.environ if environ is None else environ
    pool = gpu_pool(env) if pool is None else pool
    return "cuda" if pool and not env.get(SIMULATED) else "cpu"


def this_machine(environ: dict[str, str] | None = None) -> Machine:
    """This machine's device and GPUs, read without initialising CUDA."""
    pool = gpu_pool(environ)
    return Machine(job_device(pool, environ), tuple(pool))


def step_machine(gpu_step: bool, environ: dict[str, str] | None = None) -> Machine | None:
    """The machine a step's params check is about: this one, except for a step that uses no GPU inside a
    SLURM job (download, preprocess, report of a cluster run), which may run on a node without GPUs while the
    GPU jobs run on other nodes: None, nothing to check there; the GPU steps check on their own nodes."""
    if not gpu_step and in_slurm_job(environ):
        return None
    return this_machine(environ)


@dataclass
class Lease:
    """GPUs held by this process until `release()` or exit."""

    ids: list[str]
    _files: list[IO] = field(default_factory=list, repr=False)
    keys: list[str] = field(default_factory=list)

    def release(self) -> None:
        for f in self._files:
            f.close()  # closing the last descriptor drops the flock
        self._files.clear()


def lock_directory(path: str | Path) -> Path:
    """The shared lock directory, created sticky and world-writable (1777) so that every user's jobs can
    lease the machine's GPUs; a directory this user owns with another mode (an older version made it 0755)
    is set to 1777."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.mkdir()
        os.chmod(path, 0o1777)  # mkdir's mode is cut by the umask
    except PermissionError:
        raise StepError(f"{path}: cannot create the GPU lock directory (no write permission in {path.parent}); "
                        "set distributed.gpu_lock_dir in params.yaml to a directory every user of these GPUs can "
                        "write, e.g. under /tmp") from None
    except FileExistsError:
        info = path.stat()
        if info.st_uid == os.geteuid() and stat.S_IMODE(info.st_mode) != 0o1777:
            os.chmod(path, 0o1777)
    return path


def _open_lock(path: Path) -> IO:
    """The lock file, opened for locking by any user: an existing one without O_CREAT (read-only when another
    user's file does not let us write: flock works on it all the same), a new one mode 0666."""
    try:
        return open(os.open(path, os.O_RDWR), "r+")
    except FileNotFoundError:
        pass
    except PermissionError:
        return open(os.open(path, os.O_RDONLY), "r")
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:  # another job made it just now
        return _open_lock(path)
    except PermissionError:
        info = path.parent.stat()
        raise StepError(
            f"{path.parent}: cannot create GPU lock files there (owner uid {info.st_uid}, mode "
            f"{stat.S_IMODE(info.st_mode):o}); ask its owner to `chmod 1777 {path.parent}` (every user of these "
            "GPUs must be able to lock them), or set distributed.gpu_lock_dir in params.yaml") from None
    os.fchmod(fd, 0o666)  # the umask cut it; other users must open it for writing too
    return open(fd, "r+")


def _try_lock(path: Path) -> IO | None:
    f = _open_lock(path)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _lock_name(key: str) -> str:
    return "gpu-" + re.sub(r"[^A-Za-z0-9._-]", "_", key) + ".lock"


def acquire(n: int, lock_dir: str | Path, wait_s: float, job: str, pool: list | None = None) -> Lease:
    """Lease `n` free GPUs of `pool` (Gpu records or plain ids; default `gpu_pool()`), waiting up to `wait_s`
    seconds for them.

    Never holds part of a lease while waiting (no two jobs can deadlock on each other's halves). On a machine
    without GPUs the lease is empty: the job runs on the CPU.
    """
    gpus = gpu_pool() if pool is None else [g if isinstance(g, Gpu) else Gpu(str(g), str(g)) for g in pool]
    if not gpus:
        return Lease([])
    ids = ",".join(g.id for g in gpus)
    if n > len(gpus):
        raise StepError(f"{job}: needs {n} GPUs but this machine offers {len(gpus)} ({ids}); lower "
                        "strategies.<strategy>.gpus in params.yaml or run on a machine with more GPUs")
    lock_dir = lock_directory(lock_dir)
    deadline = time.monotonic() + wait_s
    waited = False
    while True:
        held: list[tuple[Gpu, IO]] = []
        for gpu in gpus:
            f = _try_lock(lock_dir / _lock_name(gpu.key))
            if f is not None:
                held.append((gpu, f))
                if len(held) == n:
                    break
        if len(held) == n:
            for gpu, f in held:  # who holds it, for people looking at the lock directory
                if f.writable():
                    f.seek(0)
                    f.truncate()
                    f.write(f"{os.getpid()} {job} uid={os.geteuid()} id={gpu.id}\n")
                    f.flush()
            lease = Lease([g.id for g, _ in held], [f for _, f in held], [g.key for g, _ in held])
            log.info("%s: leased GPU(s) %s from %s (locks %s)", job, ",".join(lease.ids), lock_dir,
                     ",".join(lease.keys))
            return lease
        for _, f in held:
            f.close()
        if time.monotonic() >= deadline:
            raise StepError(f"{job}: no {n} free GPU(s) among {ids} within {wait_s:g} s (leases in "
                            f"{lock_dir}); wait for the other jobs or raise distributed.gpu_wait_s")
        if not waited:
            log.info("%s: waiting for %d free GPU(s) among %s", job, n, ids)
            waited = True
        time.sleep(POLL_S)


LEASED = "LOWPREC_GPU_IDS"  # set once a job's GPUs are leased: its ranks, or its re-executed self, see them


def lease_gpus(n: int, lock_dir: str | Path, wait_s: float, job: str) -> Lease:
    """Lease `n` GPUs and make them this process's (and its children's) only visible CUDA devices."""
    lease = acquire(n, lock_dir, wait_s, job)
    if lease.ids:
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"  # CUDA's indices = nvidia-smi's, which the keys came from
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
