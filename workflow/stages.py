"""What each step reads: its params.yaml keys and its code. Shared by the Snakefile and the DAG tests.

dvc.yaml lists the same keys and code files per stage (tests/test_workflow.py checks it), so a
change to one variant's params or to one step's code reruns the same jobs in both orchestrators.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
STEPS = ("download", "preprocess", "train", "merge", "evaluate", "report")


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


def code_deps(step: str) -> list[str]:
    """Every file of `workflow/` that `python -m workflow.<step>` can run: its module's import closure."""
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
    return sorted(p.relative_to(PACKAGE.parent).as_posix() for p in seen)


# Code files each step depends on: a change to one reruns the step's jobs in both orchestrators.
CODE: dict[str, list[str]] = {step: code_deps(step) for step in STEPS}

# params.yaml keys per step; {model}/{precision}/{strategy} are filled per job (DVC: ${item.model}, ...).
PARAM_KEYS: dict[str, list[str]] = {
    "download": ["seed", "models.{model}", "builtin", "download"],
    "preprocess": ["seed", "models.{model}", "data"],
    "train": ["seed", "models.{model}", "lora", "train", "variants.{precision}", "strategies.{strategy}"],
    "merge": ["models.{model}", "merge", "evaluate"],
    "evaluate": ["seed", "models.{model}", "evaluate", "generate"],
    "report": ["matrix", "matrix_zero", "models"],
}


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
