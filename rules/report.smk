# Phase 3: one table comparing every variant.


rule summary:
    input:
        code=CODE["summary"],
        train=expand("results/metrics/train/{id}.json", id=[v["id"] for v in VARIANTS]),
        merge=expand("results/metrics/merge/{id}.json", id=[v["id"] for v in VARIANTS]),
        eval=expand("results/metrics/eval/{id}.json", id=[v["id"] for v in VARIANTS]),
    output:
        table=directory("results/summary"),
    params:
        values=param_values(config, "summary"),
    log:
        "logs/summary/summary.log",
    conda:
        "../envs/lowprec.yaml"
    shell:
        "python -m workflow.summary --params params.yaml --metrics-dir results/metrics --out {output.table} 2> {log}"
