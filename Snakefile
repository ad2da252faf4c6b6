# Low-precision LoRA fine-tuning: download -> preprocess -> train -> merge -> evaluate -> report.
# Every rule runs `python -m workflow.<step>`, the same command as its dvc.yaml stage.
# All settings live in params.yaml; edit it (not --config) so both orchestrators see the same values.

import os

import yaml

from workflow.devices import this_machine
from workflow.provenance import RUN_ID, new_run_id
from workflow.params import PRECISIONS, STRATEGIES, ParamsError, check_machine, validate_params, variants
from workflow.stages import CODE, LIVE_KEYS, STALE, data_files, dvc_yaml_is_current, gpu_limit, node_count, param_values

configfile: "params.yaml"
os.environ.setdefault(RUN_ID, new_run_id())  # one id per invocation; every job inherits it (workflow/provenance.py)

with open("params.yaml", encoding="utf-8") as _f:
    if yaml.safe_load(_f) != config:
        raise ParamsError("params.yaml: --config/--configfile overrides do not reach the steps; edit params.yaml")
PARAMS = validate_params(config, "params.yaml")  # refuses impossible variants of the matrix, too
if not dvc_yaml_is_current(config):  # the DVC DAG must be this one (code deps, data.source)
    raise ParamsError(STALE)
VARIANTS = variants(PARAMS)
gpu_limit(PARAMS, VARIANTS, workflow.global_resources.get("gpu"))
# Do the jobs run on this machine? Snakemake reads the Snakefile before it settles the executor, but a cluster
# executor needs --jobs (the slurm profile sets it) while the local one folds --jobs into --cores, so a job
# count means a cluster run (so does a job itself, which Snakemake runs as `--mode remote` on its node). Only
# when they run here does this machine's GPU pool say what they can run; a cluster run's GPU jobs check on
# their nodes (every step checks its params against its machine: workflow/cli.py), so the submit host's lack
# of GPUs refuses nothing.
ON_CLUSTER = workflow.resource_settings.nodes is not None or not workflow.is_main_process
MACHINE = None if ON_CLUSTER else this_machine()  # this machine's device and GPUs (nvidia-smi)
GPU_POOL = MACHINE.gpus if MACHINE else ()  # none on a CPU-only machine, or here when the jobs run elsewhere
if MACHINE:  # what this machine cannot run: fp16 x zero3 on a CPU, bf16/nf4 on pre-Ampere GPUs
    check_machine(PARAMS, MACHINE.device, "params.yaml", MACHINE.described())


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
