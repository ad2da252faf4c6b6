# Phase 1: get the base model and turn alpaca data into tokenized train/eval splits.


rule download:
    input:
        code=CODE["download"],
    output:
        model=directory("results/models/{model}"),
    params:
        values=lambda w: param_values(config, "download", model=w.model),
    log:
        "logs/download/{model}.log",
    benchmark:
        "benchmarks/download/{model}.tsv"
    conda:
        "../envs/lowprec.yaml"
    resources:
        gpu=0,
    shell:
        "python -m workflow.download --params params.yaml --model {wildcards.model} --out {output.model} 2> {log}"


rule preprocess:
    input:
        code=CODE["preprocess"],
        model=rules.download.output.model,
        data=data_files(config),  # data.source's file(s); none for builtin:tasks (code and params)
    output:
        data=directory("results/data/{model}"),
        report="results/metrics/data/{model}.json",
    params:
        values=lambda w: param_values(config, "preprocess", model=w.model),
    log:
        "logs/preprocess/{model}.log",
    conda:
        "../envs/lowprec.yaml"
    shell:
        "python -m workflow.preprocess --params params.yaml --model {wildcards.model} --model-dir {input.model}"
        " --out {output.data} --report {output.report} 2> {log}"
