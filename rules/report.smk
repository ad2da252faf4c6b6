# Phase 3: the precision comparison: tables and plots from every variant's metrics.
# Outputs marked with report() go into `snakemake --report report.html`.


rule report:
    input:
        code=CODE["report"],
        quant=expand("results/metrics/quant/{model}.json", model=sorted({v["model"] for v in VARIANTS})),
        estimate=expand("results/metrics/estimate/{id}.json", id=[v["id"] for v in VARIANTS]),
        train=expand("results/metrics/train/{id}.json", id=[v["id"] for v in VARIANTS]),
        timing=expand("results/metrics/timing/{id}.json", id=[v["id"] for v in VARIANTS]),
        merge=expand("results/metrics/merge/{id}.json", id=[v["id"] for v in VARIANTS]),
        eval=expand("results/metrics/eval/{id}.json", id=[v["id"] for v in VARIANTS]),
        eval_timing=expand("results/metrics/eval_timing/{id}.json", id=[v["id"] for v in VARIANTS]),
        curves=expand("results/plots/loss/{id}.csv", id=[v["id"] for v in VARIANTS]),
    output:
        markdown="results/report/summary.md",
        table=report("results/report/summary.csv", category="Summary", caption="report/summary.rst"),
        loss=report("results/report/loss_curves.png", category="Plots", caption="report/loss_curves.rst"),
        memory=report("results/report/memory_vs_eval_loss.png", category="Plots", caption="report/memory.rst"),
        speed=report("results/report/tokens_per_s.png", category="Plots", caption="report/speed.rst"),
        quant=report("results/report/quant_error.png", category="Plots", caption="report/quant.rst"),
    params:
        values=param_values(config, "report"),
    log:
        "logs/report/report.log",
    conda:
        "../envs/lowprec.yaml"
    shell:
        "python -m workflow.report --params params.yaml --metrics-dir results/metrics --curves-dir results/plots/loss"
        " --out results/report 2> {log}"
