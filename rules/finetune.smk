# Phase 2: one LoRA adapter per variant, merged into the unquantized base, then evaluated.


rule quant:
    input:
        code=CODE["quant"],
        model=rules.download.output.model,
        data=rules.preprocess.output.data,
    output:
        quant="results/metrics/quant/{model}.json",
    params:
        values=lambda w: param_values(config, "quant", model=w.model),
    log:
        "logs/quant/{model}.log",
    conda:
        "../envs/lowprec.yaml"
    resources:
        gpu=0 if ON_CLUSTER else 1,  # as train's: one GPU, leased (bitsandbytes quantizes on it)
        gres="gpu:1",
    shell:
        "python -m workflow.quant --params params.yaml --model {wildcards.model} --model-dir {input.model}"
        " --data {input.data} --out {output.quant} 2> {log}"


rule estimate:
    input:
        code=CODE["estimate"],
        model=rules.download.output.model,
        report=rules.preprocess.output.report,
    output:
        estimate="results/metrics/estimate/{model}-{precision}-{strategy}.json",
    params:
        values=lambda w: param_values(config, "estimate", model=w.model, precision=w.precision, strategy=w.strategy),
    log:
        "logs/estimate/{model}-{precision}-{strategy}.log",
    conda:
        "../envs/lowprec.yaml"
    resources:
        gpu=0,  # reads config.json and the data report only: no weights, no GPU
    shell:
        "python -m workflow.estimate --params params.yaml --model {wildcards.model} --precision {wildcards.precision}"
        " --strategy {wildcards.strategy} --model-dir {input.model} --data-report {input.report}"
        " --out {output.estimate} 2> {log}"


rule train:
    input:
        code=CODE["train"],
        model=rules.download.output.model,
        data=rules.preprocess.output.data,
    output:
        adapter=directory("results/adapters/{model}-{precision}-{strategy}"),
        metrics="results/metrics/train/{model}-{precision}-{strategy}.json",
        curve="results/plots/loss/{model}-{precision}-{strategy}.csv",
        timing="results/metrics/timing/{model}-{precision}-{strategy}.json",
        live_metrics="results/live/{model}-{precision}-{strategy}/metrics.json",
        live_plots=expand("results/live/{{model}}-{{precision}}-{{strategy}}/plots/metrics/train/{key}.tsv",
                          key=LIVE_KEYS),
    params:
        values=lambda w: param_values(config, "train", model=w.model, precision=w.precision, strategy=w.strategy),
    log:
        "logs/train/{model}-{precision}-{strategy}.log",
    benchmark:
        "benchmarks/train/{model}-{precision}-{strategy}.tsv"
    conda:
        "../envs/lowprec.yaml"
    # GPU machine or cluster: one core per process (SLURM's cpus_per_task sets the job's CPUs). CPU only: torch
    # trains on every core, so say so (and timings stay clean).
    threads: lambda w: PARAMS.processes(w.strategy) if GPU_POOL or ON_CLUSTER else workflow.cores
    # gpu: here, how many of `--resources gpu=N` the job holds (it leases that many GPU ids: workflow/devices.py).
    # gres: on a cluster, GPUs per node (the slurm plugin would turn gpu= into --gpus=, a total over the nodes).
    resources:
        gpu=lambda w: 0 if ON_CLUSTER else PARAMS.processes(w.strategy),
        gres=lambda w: f"gpu:{PARAMS.processes(w.strategy)}",
        nodes=lambda w: node_count(PARAMS, w.strategy),  # SLURM allocates these (strategies.<s>.nodes)
    shell:
        "python -m workflow.train --params params.yaml --model {wildcards.model} --precision {wildcards.precision}"
        " --strategy {wildcards.strategy} --model-dir {input.model} --data {input.data} --out {output.adapter}"
        " --metrics {output.metrics} --curve {output.curve} --timing {output.timing}"
        " --live results/live/{wildcards.model}-{wildcards.precision}-{wildcards.strategy} 2> {log}"


rule merge:
    input:
        code=CODE["merge"],
        model=rules.download.output.model,
        adapter=rules.train.output.adapter,
        data=rules.preprocess.output.data,
    output:
        merged=directory("results/merged/{model}-{precision}-{strategy}"),
        metrics="results/metrics/merge/{model}-{precision}-{strategy}.json",
    params:
        values=lambda w: param_values(config, "merge", model=w.model),
    log:
        "logs/merge/{model}-{precision}-{strategy}.log",
    benchmark:
        "benchmarks/merge/{model}-{precision}-{strategy}.tsv"
    conda:
        "../envs/lowprec.yaml"
    resources:
        gpu=0 if ON_CLUSTER else 1,  # as train's: one GPU, leased
        gres="gpu:1",
    shell:
        "python -m workflow.merge --params params.yaml --model {wildcards.model} --precision {wildcards.precision}"
        " --strategy {wildcards.strategy} --model-dir {input.model} --adapter {input.adapter} --data {input.data}"
        " --out {output.merged} --metrics {output.metrics} 2> {log}"


rule evaluate:
    input:
        code=CODE["evaluate"],
        model=rules.download.output.model,
        adapter=rules.train.output.adapter,
        merged=rules.merge.output.merged,
        data=rules.preprocess.output.data,
    output:
        metrics="results/metrics/eval/{model}-{precision}-{strategy}.json",
        predictions="results/predictions/{model}-{precision}-{strategy}.jsonl",
        timing="results/metrics/eval_timing/{model}-{precision}-{strategy}.json",
    params:
        values=lambda w: param_values(config, "evaluate", model=w.model),
    log:
        "logs/evaluate/{model}-{precision}-{strategy}.log",
    benchmark:
        "benchmarks/evaluate/{model}-{precision}-{strategy}.tsv"
    conda:
        "../envs/lowprec.yaml"
    resources:
        gpu=0 if ON_CLUSTER else 1,  # as train's: one GPU, leased
        gres="gpu:1",
    shell:
        "python -m workflow.evaluate --params params.yaml --model {wildcards.model} --precision {wildcards.precision}"
        " --strategy {wildcards.strategy} --model-dir {input.model} --adapter {input.adapter}"
        " --merged {input.merged} --data {input.data} --metrics {output.metrics}"
        " --predictions {output.predictions} --timing {output.timing} 2> {log}"
