"""GPU acceptance run: what only a GPU can show, read from a real run's own metrics files.

Copies the project's code into `results/gpu_check/` with its own params.yaml: the builtin Llama built offline
at ~100M parameters, the default matrix's single-device variants (fp16, bf16, int8, nf4) plus bf16 under
ZeRO-2 with one GPU. Runs Snakemake there (`--resources gpu=1`: one GPU job at a time, on a leased GPU), then
fails unless the run's metrics show

- the resolved dtypes, quantization, mixed precision and optimizer of `resolve_precision` on CUDA, and the
  linear layers stored as that quantization says;
- fp16 trained under a GradScaler (its final scale recorded), nf4 with paged_adamw_32bit (paged);
- peak CUDA memory of training ordered nf4 < int8 < bf16 ~ fp16 (within BF16_FP16);
- merge and evaluate within one model's memory (ONE_MODEL x the larger of the model as trained and merged).

It prints one table and the failures. No network: the model and the data are built offline. Under 10 minutes
on one recent GPU. `scripts/gpu_check.sh` runs it; `--check-only DIR` checks an earlier run's copy again.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402 (after the path)

from workflow.params import PRECISIONS, Params, validate_params, variants  # noqa: E402

WORKDIR = ROOT / "results" / "gpu_check"
CODE = ("Snakefile", "rules", "workflow", "envs")  # what a copy of the project needs to run
BF16_FP16 = 0.10  # bf16 and fp16 train with the same weight and activation sizes: peaks within 10 %
ONE_MODEL = 1.5  # a step holding one model at a time peaks below 1.5 models (activations, CUDA workspaces);
# holding two (the seeds' 24 GB card cannot) is 2 models for fp16/bf16
MB = 2**20

# ~100M parameters: 8 layers x (4 x 1024^2 attention + 3 x 1024 x 2752 MLP) = 101M in the linear layers,
# where quantization acts. No pre-training (it runs on one CPU thread): memory and dtypes do not need it.
BUILTIN = {"hidden_size": 1024, "intermediate_size": 2752, "num_layers": 8, "num_heads": 16, "vocab_size": 1024,
           "max_position_embeddings": 256, "pretrain_steps": 0, "pretrain_batch_size": 4, "pretrain_lr": 1e-3,
           "pretrain_seq_len": 64, "corpus_size": 3000}
OVERRIDES = {
    "matrix": {"model": ["tiny"], "precision": list(PRECISIONS), "strategy": ["single"]},
    "matrix_zero": {"model": ["tiny"], "precision": ["bf16"], "strategy": ["zero2"]},
    "models": {"tiny": {"source": "builtin:tiny-llama", "template": "human_assistant"}},
    "builtin": {"tiny-llama": BUILTIN},
    "variants": {p: {} for p in PRECISIONS},
    "strategies": {"single": {}, "zero2": {"gpus": 1, "nodes": 1}},
    "data": {"source": "builtin:tasks", "builtin_rows": 480, "eval_size": 32, "max_length": 96},
    "train": {"max_steps": 30, "save_steps": 1000, "logging_steps": 5,  # no checkpoint: peaks come early
              "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": True},
    "evaluate": {"max_eval_rows": 32, "per_device_eval_batch_size": 4},
    "generate": {"batch_size": 4},
    "lora": {"target_modules": "all-linear"},
}
WHOLE = ("models", "builtin", "variants", "strategies")  # replaced, not merged: a preset's entries do not apply


def merged_over(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, mapping into mapping (other values replace)."""
    out = dict(base)
    for key, value in changes.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict) and key not in WHOLE
        out[key] = merged_over(out[key], value) if both else value
    return out


def check_params(base: Path = ROOT / "params.yaml") -> dict:
    """The acceptance run's params.yaml: the project's (or a preset copied over it), with OVERRIDES."""
    return merged_over(yaml.safe_load(base.read_text(encoding="utf-8")), OVERRIDES)


def make_copy(workdir: Path, params: dict) -> None:
    """A fresh copy of the project's code with the acceptance params."""
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    for name in CODE:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, workdir / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, workdir / name)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")


def run(workdir: Path) -> float:
    """Snakemake over the copy, its output into workdir/snakemake.log; the wall time in seconds."""
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1", "DVC_NO_ANALYTICS": "1"}
    start = time.monotonic()
    with open(workdir / "snakemake.log", "w", encoding="utf-8") as log:
        code = subprocess.run(["snakemake", "--cores", "all", "--resources", "gpu=1", "--printshellcmds"],
                              cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    if code:
        tail = (workdir / "snakemake.log").read_text(encoding="utf-8", errors="replace").splitlines()[-30:]
        raise SystemExit("gpu_check: the run failed (see {}/snakemake.log and logs/):\n{}".format(
            workdir, "\n".join(tail)))
    return time.monotonic() - start


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def expected_storage(resolved: dict) -> str:
    """What `linear_storage` (workflow/modeling.py) says for the resolved quantization."""
    q = resolved.get("quantization")
    if q is None:
        return resolved["load_dtype"]
    return q["method"] + ("+double_quant" if q.get("double_quant") else "")


def check(results: Path, params: Params) -> tuple[list[dict], list[str]]:
    """Rows of what each variant's metrics say, and every failed expectation (empty: the run passes)."""
    from workflow.precision import resolve_precision

    rows, failures = [], []

    def need(ok: bool, message: str) -> bool:
        if not ok:
            failures.append(message)
        return ok

    for v in variants(params):
        vid, precision, strategy = v["id"], v["precision"], v["strategy"]
        files = {"train": results / "metrics/train" / f"{vid}.json", "timing": results / "metrics/timing" / f"{vid}.json",
                 "merge": results / "metrics/merge" / f"{vid}.json",
                 "merge_memory": results / "merged" / vid / "merge_memory.json",
                 "eval_timing": results / "metrics/eval_timing" / f"{vid}.json"}
        m = {kind: _read(path) for kind, path in files.items()}
        missing = [str(files[k]) for k, d in m.items() if d is None]
        if not need(not missing, f"{vid}: missing or unreadable {', '.join(missing)}"):
            rows.append({"variant": vid, "verdict": "missing files"})
            continue
        train, timing = m["train"], m["timing"]
        targs, settings = params.variant_train(precision), params.strategy(strategy)
        want = resolve_precision(precision, "cuda", optim=targs.optim, adam_epsilon=targs.adam_epsilon,
                                 strategy=strategy, quant_storage=settings.nf4_quant_storage).describe()
        bad = len(failures)
        resolved = train.get("resolved") or {}
        for key in sorted(want.keys() | resolved.keys()):
            need(resolved.get(key) == want.get(key),
                 f"{vid}: resolved {key} is {resolved.get(key)!r}, resolve_precision on cuda says {want.get(key)!r}")
        need(train.get("linear_storage") == expected_storage(want),
             f"{vid}: linear layers stored as {train.get('linear_storage')!r}, not {expected_storage(want)!r}")
        for kind in ("timing", "merge_memory", "eval_timing"):
            need(m[kind].get("peak_memory_kind") == "cuda_max_memory_allocated",
                 f"{vid}: {kind} peak memory is {m[kind].get('peak_memory_kind')!r}: the step did not run on CUDA")
        scaler = train.get("loss_scaler")
        if precision == "fp16":
            want_by = "GradScaler" if strategy == "single" else "deepspeed"
            need(scaler is not None and want_by in str(scaler.get("by")) and _positive(scaler.get("scale")),
                 f"{vid}: fp16 without a {want_by} loss scale (loss_scaler: {scaler!r})")
        else:
            need(scaler is None, f"{vid}: {precision} has a loss scaler ({scaler!r}); only fp16 needs one")
        if precision == "nf4":
            need(want["optim"] == "paged_adamw_32bit" and train.get("optimizer_paged") is True
                 and str(train.get("optimizer", "")).startswith("bitsandbytes."),
                 f"{vid}: nf4 did not step with paged_adamw_32bit (optim {resolved.get('optim')!r}, optimizer "
                 f"{train.get('optimizer')!r}, paged {train.get('optimizer_paged')!r})")
        one_model = max(train.get("weight_footprint_bytes") or 0, m["merge"].get("merged_bytes") or 0)
        merge_peak, eval_peak = m["merge_memory"].get("peak_memory_bytes"), m["eval_timing"].get("peak_memory_bytes")
        need(_positive(merge_peak) and merge_peak <= ONE_MODEL * (m["merge"].get("merged_bytes") or 0),
             f"{vid}: merge peaked at {_mb(merge_peak)} MB, more than {ONE_MODEL} x the merged model "
             f"({_mb(m['merge'].get('merged_bytes'))} MB)")
        need(_positive(eval_peak) and eval_peak <= ONE_MODEL * one_model,
             f"{vid}: evaluate peaked at {_mb(eval_peak)} MB, more than {ONE_MODEL} x one model ({_mb(one_model)} MB)")
        rows.append({
            "variant": vid, "gpu": timing.get("device_name"),
            "weights": f"{resolved.get('load_dtype')}/{resolved.get('compute_dtype')}",
            "quantization": train.get("linear_storage"), "bits": train.get("linear_bits_per_param"),
            "amp": resolved.get("amp"), "loss scale": scaler.get("scale") if scaler else None,
            "optimizer": f"{resolved.get('optim')}{' (paged)' if train.get('optimizer_paged') else ''}",
            "train peak MB": _mb(timing.get("peak_memory_bytes")), "merge peak MB": _mb(merge_peak),
            "eval peak MB": _mb(eval_peak), "one model MB": _mb(one_model),
            "verdict": "ok" if len(failures) == bad else "FAIL",
        })
    _check_order(results, params, need)
    return rows, failures


def _check_order(results: Path, params: Params, need) -> None:
    """Peak CUDA memory of the single-device trainings: nf4 < int8 < bf16 ~ fp16."""
    peak = {}
    for v in variants(params):
        timing = _read(results / "metrics/timing" / f"{v['id']}.json") or {}
        if v["strategy"] == "single" and _positive(timing.get("peak_memory_bytes")):
            peak[v["precision"]] = timing["peak_memory_bytes"]
    if not need(set(peak) == set(PRECISIONS), f"memory order: no peak memory of the single-device "
                f"{', '.join(sorted(set(PRECISIONS) - set(peak)))} trainings"):
        return
    shown = ", ".join(f"{p} {_mb(peak[p])} MB" for p in ("nf4", "int8", "bf16", "fp16"))
    need(peak["nf4"] < peak["int8"] < min(peak["bf16"], peak["fp16"]),
         f"memory order: training peaks are {shown}; expected nf4 < int8 < bf16, fp16")
    need(abs(peak["bf16"] - peak["fp16"]) <= BF16_FP16 * max(peak["bf16"], peak["fp16"]),
         f"memory order: bf16 and fp16 peaks differ by more than {BF16_FP16:.0%} ({shown})")


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _mb(x) -> str:
    return f"{x / MB:.0f}" if _positive(x) else "?"


def table(rows: list[dict]) -> str:
    """The rows as one Markdown table."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    cell = lambda v: "" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def preflight() -> str:
    """The GPU this run will use, or SystemExit saying why there is none."""
    from workflow import devices
    from workflow.errors import StepError

    machine = devices.this_machine()
    if machine.device != "cuda":
        raise SystemExit("gpu_check: nvidia-smi lists no GPU here (or CUDA_VISIBLE_DEVICES hides them)")
    try:
        from workflow.precision import compute_device

        compute_device()
    except StepError as exc:
        raise SystemExit(f"gpu_check: {exc}") from None
    old = [f"{name} ({c[0]}.{c[1]})" for name, c in machine.described() if not devices.bf16_capable(c)]
    if old:
        raise SystemExit(f"gpu_check: bf16 and nf4 need compute capability 8.0+, and this machine has {', '.join(old)}; "
                         "hide those GPUs with CUDA_VISIBLE_DEVICES")
    return ", ".join(sorted({g.name for g in machine.gpus})) or "a GPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    p.add_argument("--workdir", type=Path, default=WORKDIR, help=f"the run's project copy (default {WORKDIR})")
    p.add_argument("--check-only", action="store_true", help="check the results already in --workdir")
    args = p.parse_args(argv)
    if not args.check_only:
        print(f"gpu_check: {preflight()}; running the acceptance matrix in {args.workdir}", flush=True)
        make_copy(args.workdir, check_params())
        wall = run(args.workdir)
        print(f"gpu_check: the run took {wall / 60:.1f} min", flush=True)
    raw = yaml.safe_load((args.workdir / "params.yaml").read_text(encoding="utf-8"))
    rows, failures = check(args.workdir / "results", validate_params(raw, args.workdir / "params.yaml"))
    text = table(rows) + "\n\n" + ("\n".join(f"FAIL: {f}" for f in failures) or "PASS: every check held") + "\n"
    (args.workdir / "gpu_check.md").write_text(text, encoding="utf-8")
    print(text, end="")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
