# Low-precision LoRA fine-tuning: download -> preprocess -> train -> merge -> evaluate -> report.
# Every rule runs `python -m workflow.<step>`, the same command as its dvc.yaml stage.
# All settings live in params.yaml; edit it (not --config) so both orchestrators see the same values.

import os

import yaml

from workflow.devices import device_pool, job_device
from workflow.provenance import RUN_ID, new_run_id
from workflow.params import PRECISIONS, STRATEGIES, ParamsError, check_machine, validate_params, variants
from workflow.stages import CODE, LIVE_KEYS, gpu_limit, node_count, param_values

configfile: "params.yaml"
os.environ.setdefault(RUN_ID, new_run_id())  # one id per invocation; every job inherits it (workflow/provenance.py)

with open("params.yaml", encoding="utf-8") as _f:
    if yaml.safe_load(_f) != config:
        raise ParamsError("params.yaml: --config/--configfile overrides do not reach the steps; edit params.yaml")
PARAMS = validate_params(config, "params.yaml")  # refuses impossible variants of the matrix, too
VARIANTS = variants(PARAMS)
gpu_limit(PARAMS, VARIANTS, workflow.global_resources.get("gpu"))
GPU_POOL = device_pool()  # this machine's GPU ids (nvidia-smi; empty on a CPU-only machine)
check_machine(PARAMS, job_device(GPU_POOL), "params.yaml")  # what this machine cannot run (fp16 x zero3 on CPU)


wildcard_constraints:
    model="[A-Za-z0-9_]+",
    precision="|".join(PRECISIONS),
    strategy="|".join(STRATEGIES),


include: "rules/prepare.smk"
include: "rules/finetune.smk"
include: "rules/report.smk"


rule all:
    input:
        rules.report.output,
        expand("results/metrics/eval/{id}.json", id=[v["id"] for v in VARIANTS]),
    default_target: True
