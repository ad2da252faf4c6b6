"""What each step reads: its params.yaml keys and its code. Shared by the Snakefile and the DAG tests.

dvc.yaml lists the same keys and code files per stage (tests/test_dag_agreement.py checks it), so a
change to one variant's params or to one step's code reruns the same jobs in both orchestrators.
"""

from __future__ import annotations

import json

_COMMON = ["workflow/cli.py", "workflow/io.py", "workflow/params.py"]
_MODEL = _COMMON + ["workflow/modeling.py", "workflow/precision.py", "workflow/templates.py",
                    "workflow/tokenize.py"]  # the template sets the tokenizer's pad

CODE: dict[str, list[str]] = {
    "download": _COMMON + ["workflow/download.py", "workflow/builtin.py", "workflow/tasks.py",
                           "workflow/templates.py"],
    "preprocess": _COMMON + ["workflow/preprocess.py", "workflow/data.py", "workflow/tokenize.py",
                             "workflow/tasks.py", "workflow/templates.py"],
    "train": _MODEL + ["workflow/train.py"],
    "merge": _MODEL + ["workflow/merge.py"],
    "evaluate": _MODEL + ["workflow/evaluate.py", "workflow/merge.py", "workflow/quality.py"],
    "report": _COMMON + ["workflow/report.py"],
}

# params.yaml keys per step; {model}/{precision} are filled per job (DVC: ${item.model}, ${item.precision}).
PARAM_KEYS: dict[str, list[str]] = {
    "download": ["seed", "models.{model}", "builtin", "download"],
    "preprocess": ["seed", "models.{model}", "data"],
    "train": ["seed", "models.{model}", "lora", "train", "variants.{precision}"],
    "merge": ["models.{model}", "merge", "evaluate"],
    "evaluate": ["seed", "models.{model}", "evaluate", "generate"],
    "report": ["matrix", "models"],
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
