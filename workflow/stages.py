"""The stage table: what each step reads and writes. The one place both DAGs take their decisions from.

`dvc.yaml` is generated from it (`python -m workflow.stages --write`; a test checks the committed file is
current). The Snakemake rules take their code deps and params keys from it, and a test checks that both DAGs
run the same commands with the same outputs. Adding a step: one `Stage` here, its module
`workflow/<step>.py` and its rule in `rules/`. Imports nothing heavy (the Snakefile imports it at parse time).
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent


def _module_files(name: str) -> list[Path]:
    """The files of module `workflow.x.y`: its .py file, or every .py file of a package (whose modules may be
    imported by name at run time, as workflow.convert's families are)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    if path.is_dir():
        return sorted(path.rglob("*.py"))
    return [path.with_suffix(".py")] if path.with_suffix(".py").is_file() else []


def _imports(path: Path) -> set[str]:
    """Names of the workflow modules a file imports, at the top or inside functions (both run)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.startswith("workflow.")}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module and \
                node.module.split(".")[0] == "workflow":
            if node.module != "workflow":
                names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}  # `from workflow import cli`
    return names


# Modules a step imports to decide whether it may run, not what it computes: this file (the DAG's names and
# checks, like the Snakefile) and the memory estimate (train's guard against a variant that cannot fit).
# Editing one reruns nothing but its own step.
GUARDS = frozenset({"stages.py", "estimate.py"})


def code_deps(step: str) -> list[str]:
    """Every file of `workflow/` that `python -m workflow.<step>` can run: its module's import closure, less
    the GUARDS other than the step's own module."""
    todo, seen = _module_files(f"workflow.{step}"), set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            todo += [f for f in _module_files(name) if f not in seen]
        if path.name != "__init__.py" and (path.parent / "__init__.py").is_file() and path.parent != PACKAGE:
            todo.append(path.parent / "__init__.py")  # importing a submodule runs its package's __init__
    for guard in GUARDS - {f"{step}.py"}:
        seen.discard(PACKAGE / guard)
    return sorted(p.relative_to(PACKAGE.parent).as_posix() for p in seen)


VARIANT = "{model}-{precision}-{strategy}"
LIVE_KEYS = ("loss", "learning_rate", "grad_norm")  # dvclive plot files the train step writes, one per key


@dataclass(frozen=True)
class Stage:
    """One step: its command's path options (in order), what it reads and writes, and its params keys.

    Paths use {model}/{precision}/{strategy}. `over`: "model" (a job per model), "variant" (a job per
    variant of `matrix` and of `matrix_zero`) or "" (one job). `options` are (flag, path); `inputs` lists
    the flags that are inputs. outs/metrics are paths (metrics: JSON files `dvc metrics` reads; both
    orchestrators' outputs); `plots` are (path, x, y) of outputs DVC also plots.
    """

    step: str
    over: str
    options: tuple[tuple[str, str], ...]
    inputs: tuple[str, ...]
    outs: tuple[str, ...]
    params: tuple[str, ...]
    metrics: tuple[str, ...] = ()
    plots: tuple[tuple[str, str, str], ...] = ()
    inputs_extra: tuple[str, ...] = ()  # inputs that are no option of the command (report: metric dirs)
    reads_data: bool = False  # depends on params' data.source (a file or dir; builtin:tasks is code + params)

    def command(self, **wildcards: str) -> str:
        """The step's command line; wildcards left as {model} etc. when not given."""
        return " ".join(self.command_parts(**wildcards))

    def command_parts(self, **wildcards: str) -> list[str]:
        """The command as the program and `--option value` pairs."""
        keys = {"model": "--model"} if self.over else {}
        if self.over == "variant":
            keys |= {"precision": "--precision", "strategy": "--strategy"}
        fill = {k: wildcards.get(k, "{" + k + "}") for k in ("model", "precision", "strategy")}
        parts = [f"python -m workflow.{self.step} --params params.yaml"]
        parts += [f"{flag} {fill[k]}" for k, flag in keys.items()]
        parts += [f"{flag} {path.format(**fill)}" for flag, path in self.options]
        return parts

    def deps(self) -> list[str]:
        """Data inputs (paths), after the code."""
        return [path for flag, path in self.options if flag in self.inputs] + list(self.inputs_extra)


_LIVE = f"results/live/{VARIANT}"
STAGES: dict[str, Stage] = {s.step: s for s in (
    Stage("download", "model", (("--out", "results/models/{model}"),), (),
          outs=("results/models/{model}",), params=("seed", "models.{model}", "builtin", "download")),
    Stage("preprocess", "model",
          (("--model-dir", "results/models/{model}"), ("--out", "results/data/{model}"),
           ("--report", "results/metrics/data/{model}.json")), ("--model-dir",),
          outs=("results/data/{model}",), metrics=("results/metrics/data/{model}.json",),
          params=("seed", "models.{model}", "data"), reads_data=True),
    Stage("quant", "model",
          (("--model-dir", "results/models/{model}"), ("--data", "results/data/{model}"),
           ("--out", "results/metrics/quant/{model}.json")), ("--model-dir", "--data"),
          outs=(), metrics=("results/metrics/quant/{model}.json",),
          params=("models.{model}", "evaluate")),  # the eval batches whose activations it reads
    Stage("estimate", "variant",
          (("--model-dir", "results/models/{model}"), ("--data-report", "results/metrics/data/{model}.json"),
           ("--out", f"results/metrics/estimate/{VARIANT}.json")), ("--model-dir", "--data-report"),
          outs=(), metrics=(f"results/metrics/estimate/{VARIANT}.json",),
          # its own variant's settings only (the alternatives a refusal names are read, not tracked)
          params=("models.{model}", "data", "lora", "train", "variants.{precision}", "strategies.{strategy}",
                  "distributed.gpu_memory_gb")),
    Stage("train", "variant",
          (("--model-dir", "results/models/{model}"), ("--data", "results/data/{model}"),
           ("--out", f"results/adapters/{VARIANT}"), ("--metrics", f"results/metrics/train/{VARIANT}.json"),
           ("--curve", f"results/plots/loss/{VARIANT}.csv"), ("--timing", f"results/metrics/timing/{VARIANT}.json"),
           ("--live", _LIVE)), ("--model-dir", "--data"),
          outs=(f"results/adapters/{VARIANT}", f"results/plots/loss/{VARIANT}.csv"),
          metrics=(f"results/metrics/train/{VARIANT}.json", f"results/metrics/timing/{VARIANT}.json",
                   f"{_LIVE}/metrics.json"),
          plots=tuple((f"{_LIVE}/plots/metrics/train/{k}.tsv", "step", k) for k in LIVE_KEYS),
          # distributed.gpu_memory_gb is read as a guard (workflow.estimate.budget_refusal), not tracked: a new
          # budget changes no adapter
          params=("seed", "models.{model}", "lora", "train", "variants.{precision}", "strategies.{strategy}")),
    Stage("merge", "variant",
          (("--model-dir", "results/models/{model}"), ("--adapter", f"results/adapters/{VARIANT}"),
           ("--data", "results/data/{model}"), ("--out", f"results/merged/{VARIANT}"),
           ("--metrics", f"results/metrics/merge/{VARIANT}.json")), ("--model-dir", "--adapter", "--data"),
          outs=(f"results/merged/{VARIANT}",), metrics=(f"results/metrics/merge/{VARIANT}.json",),
          params=("models.{model}", "merge", "evaluate")),
    Stage("evaluate", "variant",
          (("--model-dir", "results/models/{model}"), ("--adapter", f"results/adapters/{VARIANT}"),
           ("--merged", f"results/merged/{VARIANT}"), ("--data", "results/data/{model}"),
           ("--metrics", f"results/metrics/eval/{VARIANT}.json"),
           ("--predictions", f"results/predictions/{VARIANT}.jsonl"),
           ("--timing", f"results/metrics/eval_timing/{VARIANT}.json")),
          ("--model-dir", "--adapter", "--merged", "--data"),
          outs=(f"results/predictions/{VARIANT}.jsonl",),
          metrics=(f"results/metrics/eval/{VARIANT}.json", f"results/metrics/eval_timing/{VARIANT}.json"),
          params=("seed", "models.{model}", "merge.target", "evaluate", "generate")),
    Stage("report", "",
          (("--metrics-dir", "results/metrics"), ("--curves-dir", "results/plots/loss"),
           ("--out", "results/report")), (),
          inputs_extra=("results/metrics/quant", "results/metrics/estimate", "results/metrics/train", "results/metrics/timing", "results/metrics/merge",
                        "results/metrics/eval", "results/metrics/eval_timing", "results/plots/loss"),
          outs=tuple(f"results/report/{f}" for f in ("summary.md", "summary.csv", "loss_curves.png",
                                                     "memory_vs_eval_loss.png", "tokens_per_s.png",
                                                     "quant_error.png")),
          params=("matrix", "matrix_zero", "models", "report")),
)}
STEPS = tuple(STAGES)
# Code files each step depends on: a change to one reruns the step's jobs in both orchestrators.
CODE: dict[str, list[str]] = {step: code_deps(step) for step in STEPS}
PARAM_KEYS: dict[str, list[str]] = {step: list(stage.params) for step, stage in STAGES.items()}


def param_keys(step: str, **wildcards: str) -> list[str]:
    """The params.yaml keys `step` reads for one job."""
    return [key.format(**wildcards) for key in PARAM_KEYS[step]]


def param_values(raw: dict, step: str, **wildcards: str) -> str:
    """The values of those keys as canonical JSON: Snakemake reruns a job when this string changes."""
    values = {}
    for key in param_keys(step, **wildcards):
        node = raw
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        values[key] = node
    return json.dumps(values, sort_keys=True)


def data_source(raw: dict) -> str | None:
    """The path `data.source` names, as params.yaml spells it; None for a builtin source (its generator is
    code the step imports, its size and seed are params)."""
    source = (raw.get("data") or {}).get("source")
    return None if not isinstance(source, str) or source.startswith("builtin:") else source


def data_files(raw: dict) -> list[str]:
    """Snakemake's inputs for the data source: the file, or every file of a `datasets` directory."""
    source = data_source(raw)
    if source is None:
        return []
    path = Path(source)
    return sorted(str(p) for p in path.rglob("*") if p.is_file()) if path.is_dir() else [source]


def gpu_limit(params, variants: list[dict[str, str]], limit: object) -> None:
    """Refuse a matrix whose jobs ask for more GPUs than `snakemake --resources gpu=N` allows: Snakemake
    would otherwise wait for them forever or run the job with fewer than it needs."""
    value = getattr(limit, "value", limit)  # Snakemake wraps the parsed value
    if value is None or isinstance(value, str):
        return
    for v in variants:
        need = params.processes(v["strategy"])
        if need > int(value):
            from workflow.params import ParamsError

            raise ParamsError(f"{v['id']}: strategies.{v['strategy']}.gpus is {need} but --resources gpu={value}; "
                              f"run with --resources gpu={need} (or more), or lower strategies.{v['strategy']}.gpus")


def node_count(params, strategy: str) -> int:
    """Nodes one job of `strategy` asks the cluster for (`nodes: slurm` takes what `--set-resources` gives)."""
    nodes = params.strategy(strategy).nodes
    return nodes if isinstance(nodes, int) else 1


# --- dvc.yaml, generated ------------------------------------------------------------------------------------

DVC_YAML = Path("dvc.yaml")
_HEADER = """\
# GENERATED from the stage table in workflow/stages.py: edit that, then run `python -m workflow.stages --write`
# (tests/test_workflow.py fails while this file is out of date). The matrix is read from params.yaml at
# `dvc repro` time, so editing the matrix there needs no regeneration; a file or dir data.source and the `dvc`
# cache switches are written in (both orchestrators refuse to run while this file is stale).
# The same DAG as the Snakefile: each stage runs the same `python -m workflow.<step>` command as its rule.
# Outputs are cached, so `dvc checkout`, `dvc exp apply` and `dvc pull` bring an experiment's adapters and
# metrics back; downloaded bases and merged models only where params.yaml's `dvc` section asks (cache: false
# below). After DVC restores files, `python -m workflow.handoff` (scripts/run.sh runs it) tells Snakemake.
"""
_ITEM = {k: "${item." + k + "}" for k in ("model", "precision", "strategy")}
# Outputs DVC caches only when params.yaml's `dvc` section says so (a full model each); every other output is
# always cached.
CACHE_SWITCHES = {"results/models/{model}": "cache_models", f"results/merged/{VARIANT}": "cache_merged"}


def cached(path: str, raw: dict) -> bool:
    """Whether DVC stores output `path` (a stage table path) in its cache, for params `raw`."""
    from workflow.params import DvcCache  # the switches' defaults: params.yaml may leave the section out

    switch = CACHE_SWITCHES.get(path)
    if switch is None:
        return True
    return bool((raw.get("dvc") or {}).get(switch, DvcCache.model_fields[switch].default))


_TOP_PLOTS = """\
# `dvc plots show`: the training loss curve of every variant (one chart per variant CSV; the report's
# loss_curves.png has them all on one chart), and the report's images.
plots:
  - results/plots/loss:
      x: step
      y: loss
"""


def _wrap(parts: list[str], first: str, indent: str, width: int = 118) -> list[str]:
    """`first` + the parts as a YAML plain scalar folded over lines of at most `width` where it can (a line
    breaks between parts only: every `--option value` stays on one line)."""
    lines, line = [], first + parts[0]
    for part in parts[1:]:
        if len(line) + 1 + len(part) > width:
            lines.append(line)
            line = indent + part
        else:
            line = f"{line} {part}"
    return lines + [line]


def _stage_yaml(stage: Stage, name: str, raw: dict) -> list[str]:
    item = lambda path: path.format(**_ITEM)  # noqa: E731
    out = [f"  {name}:" + (f" &{name}" if stage.over == "variant" else "")]
    if stage.over:
        out.append("    matrix:")
        keys = ("model",) if stage.over == "model" else ("model", "precision", "strategy")
        out += [f"      {k}: ${{matrix.{k}}}" for k in keys]
    out += _wrap(stage.command_parts(**_ITEM), "    cmd: ", "      ")
    out.append("    deps:")
    out += [f"      - {f}" for f in CODE[stage.step]] + [f"      - {item(p)}" for p in stage.deps()]
    if stage.reads_data and data_source(raw):
        out.append(f"      - {json.dumps(data_source(raw))}  # data.source (DVC hashes a file or a whole dir)")
    out.append("    params:")
    out += [f"      - {item(k)}" for k in stage.params]
    for section, paths in (("outs", stage.outs), ("metrics", stage.metrics)):
        if paths:
            out.append(f"    {section}:")
            for path in paths:
                out += [f"      - {item(path)}"] if cached(path, raw) else \
                    [f"      - {item(path)}:", f"          cache: false  # dvc.{CACHE_SWITCHES[path]}"]
    if stage.plots:
        out.append("    plots:  # written live by dvclive while training (workflow/trainer.py LiveCallback)")
        for path, x, y in stage.plots:
            out += [f"      - {item(path)}:", f"          x: {x}", f"          y: {y}"]
    return out


def _params_yaml() -> dict:
    import yaml

    path = Path("params.yaml")
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {} if path.is_file() else {}


def dvc_yaml(raw: dict | None = None) -> str:
    """dvc.yaml's text for params `raw` (default: ./params.yaml, whose data.source is a dependency): a stage
    per step (variant steps over `matrix`, and again over `matrix_zero`)."""
    raw = _params_yaml() if raw is None else raw
    lines = [_HEADER, "stages:"]
    for stage in STAGES.values():
        if stage.step == "report":
            lines.append("  # The same stages over `matrix_zero` (the DeepSpeed runs): YAML merge keys copy all but the matrix.")
            first = True
            for other in STAGES.values():
                if other.over == "variant":
                    lines += [f"  {other.step}_zero:", f"    <<: *{other.step}"]
                    if first:
                        lines += ["    matrix: &zero"] + [f"      {k}: ${{matrix_zero.{k}}}"
                                                          for k in ("model", "precision", "strategy")]
                        first = False
                    else:
                        lines.append("    matrix: *zero")
                    lines.append("")
        lines += _stage_yaml(stage, stage.step, raw) + [""]
    plots = [f"  - {p}" for p in STAGES["report"].outs if p.endswith(".png")]
    return "\n".join(lines) + "\n" + _TOP_PLOTS + "\n".join(plots) + "\n"


STALE = ("dvc.yaml is out of date with workflow/stages.py or params.yaml's data.source or dvc section; "
         "run `python -m workflow.stages --write`")


def dvc_yaml_is_current(raw: dict | None = None) -> bool:
    """Whether ./dvc.yaml is what the stage table makes of `raw` (True where there is no dvc.yaml)."""
    return not DVC_YAML.is_file() or DVC_YAML.read_text(encoding="utf-8") == dvc_yaml(raw)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m workflow.stages", description="Write or check dvc.yaml.")
    p.add_argument("--write", action="store_true", help="write dvc.yaml from the stage table")
    args = p.parse_args(argv)
    text = dvc_yaml()
    if args.write:
        DVC_YAML.write_text(text, encoding="utf-8")
        return 0
    if not DVC_YAML.is_file() or DVC_YAML.read_text(encoding="utf-8") != text:
        print(f"error: {STALE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
