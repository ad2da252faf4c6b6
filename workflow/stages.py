"""What each step reads: its params.yaml keys and its code. Shared by the Snakefile and the DAG tests.

dvc.yaml lists the same keys and code files per stage (tests/test_dag_agreement.py checks it), so a
change to one variant's params or to one step's code reruns the same jobs in both orchestrators.
"""

from __future__ import annotations

import json

_COMMON = ["workflow/cli.py", "workflow/devices.py", "workflow/io.py", "workflow/params.py"]
_MODEL = _COMMON + ["workflow/modeling.py", "workflow/precision.py", "workflow/templates.py",
                    "workflow/tokenize.py"]  # the template sets the tokenizer's pad

CODE: dict[str, list[str]] = {
    "download": _COMMON + ["workflow/download.py", "workflow/builtin.py", "workflow/tasks.py",
                           "workflow/templates.py"],
    "preprocess": _COMMON + ["workflow/preprocess.py", "workflow/data.py", "workflow/tokenize.py",
                             "workflow/tasks.py", "workflow/templates.py"],
    "train": _MODEL + ["workflow/train.py", "workflow/trainer.py", "workflow/checkpoints.py",
                       "workflow/distributed.py"],
    "merge": _MODEL + ["workflow/merge.py"],
    "evaluate": _MODEL + ["workflow/evaluate.py", "workflow/merge.py", "workflow/quality.py"],
    "report": _COMMON + ["workflow/report.py"],
}

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
