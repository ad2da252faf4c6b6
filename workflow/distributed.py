"""DeepSpeed ZeRO strategies: the DeepSpeed config generated from params.yaml, and the launch command.

A ZeRO job runs the very same `python -m workflow.train …` command as a single-device job. That first
process leases the GPUs, then starts N copies of itself through a launcher (`torchrun` or `deepspeed`), one
per GPU (per CPU process on a machine without GPUs, over gloo); the copies see the launcher's environment
(`LOCAL_RANK`, …) and train. Imports no torch.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NoReturn

from workflow.errors import StepError
from workflow.devices import SIMULATED
from workflow.params import ZERO_STAGES, Params, Strategy, Train

TORCH_EXTENSIONS = "results/cache/torch_extensions"  # DeepSpeed JIT-builds a comm op once (~40 s); cached here
MODULE = "workflow.train"
# Thread counts of the math libraries torch may use; Snakemake sets them all to the job's `threads`.
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "GOTO_NUM_THREADS",
               "NUMEXPR_NUM_THREADS", "VECLIB_MAXIMUM_THREADS")


def is_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process started by a launcher (it sets LOCAL_RANK)."""
    return "LOCAL_RANK" in (os.environ if environ is None else environ)


def rank_info(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(global rank, local rank, world size) of this process; (0, 0, 1) outside a launcher."""
    env = os.environ if environ is None else environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def _hidden_size(model_dir: Path) -> int | None:
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("hidden_size") or config.get("d_model") or config.get("n_embd")


def deepspeed_config(strategy: str, settings: Strategy, targs: Train, amp: str, world_size: int,
                     model_dir: Path, on_gpu: bool) -> dict:
    """The DeepSpeed config of `strategy`, every value concrete: what the Hugging Face integration would
    fill in for "auto" (batch sizes, clipping, mixed precision, bucket sizes) comes from the training
    arguments and the model's hidden size, so the file written beside the adapter is exactly what ran."""
    stage = ZERO_STAGES[strategy]
    zero: dict[str, object] = {
        "stage": stage,
        "contiguous_gradients": True,
        "overlap_comm": on_gpu,  # overlapping needs CUDA streams; on CPU it only adds buffers
    }
    hidden = _hidden_size(model_dir)
    if hidden:  # the integration's "auto" values
        zero["reduce_bucket_size"] = hidden * hidden
        if stage == 3:
            zero["stage3_prefetch_bucket_size"] = int(0.9 * hidden * hidden)
            zero["stage3_param_persistence_threshold"] = 10 * hidden
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True  # else ZeRO-3 saves empty adapters
    if settings.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if settings.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": targs.per_device_train_batch_size,
        "gradient_accumulation_steps": targs.gradient_accumulation_steps,
        "train_batch_size": targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world_size,
        "gradient_clipping": targs.max_grad_norm,
        "bf16": {"enabled": amp == "bf16"},
        "fp16": {"enabled": amp == "fp16", "loss_scale": 0, "initial_scale_power": 16},  # 0: dynamic scaling
        # The Trainer's own optimizer (params.yaml's `optim`) also runs on offloaded states; DeepSpeed would
        # otherwise insist on its compiled CPUAdam.
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,  # the Trainer logs; DeepSpeed's own step prints only repeat it
        "wall_clock_breakdown": False,
    }


def nnodes(params: Params, strategy: str, environ: Mapping[str, str]) -> int:
    """Node count: the strategy's `nodes`, or the SLURM allocation's. The job's, not the step's: the slurm
    plugin runs each job inside a one-task `srun` step, whose SLURM_NNODES can be 1 on a 2-node job."""
    n = params.strategy(strategy).nodes
    if n == "slurm":
        count = environ.get("SLURM_JOB_NUM_NODES") or environ.get("SLURM_NNODES")
        if not count:
            raise StepError(f"strategies.{strategy}.nodes is \"slurm\" but this is not a SLURM job (no "
                            "SLURM_JOB_NUM_NODES); set a number or run through the slurm profile")
        return int(count)
    return n


def srun_prefix(nodes: int, environ: Mapping[str, str]) -> list[str]:
    """`srun` that starts one launcher on each node of this SLURM job. It runs inside a job step already (the
    slurm plugin's own `srun`, or the user's), which holds the node's CPUs and GPUs: without `--overlap` the
    new step would wait for them forever. Counts are explicit, so none is inherited from the outer step."""
    cmd = ["srun", "--overlap", f"--nodes={nodes}", f"--ntasks={nodes}", "--ntasks-per-node=1",
           "--kill-on-bad-exit=1"]
    cpus = environ.get("SLURM_CPUS_PER_TASK")
    if cpus:  # else each launcher (and its N ranks) would get one CPU
        cmd.append(f"--cpus-per-task={cpus}")
    return cmd


def first_host(nodelist: str) -> str:
    """The first host of a SLURM nodelist: `gpu[03-05,07],cpu1` -> `gpu03` (what `scontrol show hostnames`
    prints first), without needing scontrol."""
    head = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not head:
        raise StepError(f"cannot read the SLURM nodelist '{nodelist}'; set distributed.master_addr")
    prefix, ranges = head.group(1), head.group(3)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def master_addr(params: Params, environ: Mapping[str, str]) -> str:
    """The rendezvous host: params.yaml's, else the first node of the SLURM job, else this host."""
    if params.distributed.master_addr:
        return params.distributed.master_addr
    if environ.get("SLURM_JOB_NODELIST"):
        return first_host(environ["SLURM_JOB_NODELIST"])
    return "127.0.0.1"


def free_port() -> int:
    """A TCP port nothing listens on now (for a one-machine rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_command(params: Params, strategy: str, argv: Sequence[str],
                   environ: Mapping[str, str] | None = None) -> list[str]:
    """The command that starts the workers of one ZeRO job: `argv` (this step's own arguments) under
    the launcher of `distributed.launcher`, N processes per node, `nnodes` nodes. Under SLURM with several
    nodes, `srun` starts one launcher per node, which meet at the first node."""
    env = os.environ if environ is None else environ
    nproc = params.processes(strategy)
    nodes = nnodes(params, strategy, env)
    d = params.distributed
    if d.launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
        if nodes == 1:
            cmd.append("--standalone")  # a local rendezvous on a free port: parallel jobs never collide
        else:
            job = env.get("SLURM_JOB_ID", "lowprec")
            cmd += [f"--nnodes={nodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={master_addr(params, env)}:"
                    f"{d.master_port}", f"--rdzv_id={job}"]
        cmd += ["-m", MODULE, *argv]
        if nodes > 1 and "SLURM_JOB_ID" in env:
            cmd = [*srun_prefix(nodes, env), *cmd]
        return cmd
    # deepspeed: GPUs come from CUDA_VISIBLE_DEVICES (the lease); on CPU, LOCAL_SIZE (see launch_env)
    port = d.master_port if nodes > 1 else free_port()  # one machine: parallel jobs must not share a port
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--no_local_rank", f"--master_port={port}"]
    if nodes > 1:
        if not d.hostfile:
            raise StepError("distributed.launcher deepspeed on several nodes needs distributed.hostfile "
                            "(lines `host slots=N`); or use launcher torchrun")
        cmd += [f"--hostfile={d.hostfile}", f"--num_nodes={nodes}", f"--master_addr={master_addr(params, env)}"]
    return cmd + ["--module", MODULE, *argv]


def launch_env(params: Params, strategy: str, gpu_ids: Sequence[str],
               environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The launcher's environment: each rank gets its share of the job's threads; on a machine without GPUs
    DeepSpeed runs on its CPU accelerator over gloo; JIT-built DeepSpeed ops are cached under results/cache."""
    env = dict(os.environ if environ is None else environ)
    nproc = params.processes(strategy)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path(TORCH_EXTENSIONS).resolve()))
    # The job's thread budget (Snakemake exports its `threads` as OMP_NUM_THREADS and the like) is shared by
    # the ranks: N ranks with the whole budget each oversubscribe the cores, and gloo then runs ~10x slower.
    budget = int(env.get("OMP_NUM_THREADS") or len(os.sched_getaffinity(0)))
    for var in THREAD_VARS:
        env[var] = str(max(1, budget // nproc))
    if not gpu_ids or env.get(SIMULATED):  # simulated GPU ids (tests) are leased, but the work runs on CPU
        env["DS_ACCELERATOR"] = "cpu"
        env["LOCAL_SIZE"] = str(nproc)  # DeepSpeed's CPU accelerator reads its device count from it
    return env


def _die_with_parent() -> None:
    """Linux: get SIGKILL when the parent process dies, so a killed job leaves no orphan rank training on."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def bind_to_parent() -> None:
    """Called first in every worker: die with the launcher (which dies with the job's first process)."""
    _die_with_parent()
    if os.getppid() == 1:  # the launcher died before the line above took effect
        os._exit(1)


SHM_DIR = Path("/dev/shm")


def release_shm_names() -> None:
    """Called on every rank right after DeepSpeed starts: its CPU allreduce gives each rank a 69 MB POSIX
    shared-memory buffer (`deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`) and never unlinks it, so
    every ZeRO run on CPU left 138 MB in /dev/shm until the machine's memory ran out. Once all ranks have
    opened all buffers (the barrier), each rank removes its buffer's name; the memory itself stays mapped
    until the ranks exit, and is then freed by the kernel, crash and SIGKILL included."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    name = f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_" \
           f"{os.environ.get('MASTER_PORT')}_{dist.get_rank()}"
    (SHM_DIR / name).unlink(missing_ok=True)


def exit_worker() -> NoReturn:
    """End a worker that succeeded: all ranks leave the process group together, then the process exits at
    once. The interpreter's normal teardown can abort in a native destructor ("terminate called without an
    active exception": rank 1 of about one nf4 ZeRO-3 run in ten here, after the step's files were written),
    which would fail a finished job. Every file of the step is written, closed and renamed before this."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # rank 0 has written the step's files
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_workers(cmd: Sequence[str], env: Mapping[str, str]) -> None:
    """Start the workers and wait, passing their log lines through. A failed run fails the step with the
    first worker's own one-line `error:` (the cause), else the launcher's exit code."""
    proc = subprocess.Popen(list(cmd), env=dict(env), stderr=subprocess.PIPE, text=True, bufsize=1,
                            preexec_fn=_die_with_parent)
    error = None
    try:
        for line in proc.stderr:
            sys.stderr.write(line)
            if error is None and line.startswith("error: "):
                error = line[len("error: "):].strip()
        code = proc.wait()
    except KeyboardInterrupt:
        proc.wait()  # the workers got the same Ctrl-C; the launcher reaps them
        raise
    if code:
        raise StepError(error or f"the training workers failed (launcher exit {code}); see the lines above")
