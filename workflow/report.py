"""Step `report`: the precision comparison, from every variant's train, timing, merge and eval metrics.

Writes into `--out` (results/report/):
- `summary.csv`: one row per variant (model, template, precision, strategy) with every column below, plus the
  ratio of each variant to the bf16 row for peak memory, train tokens/s and merged eval loss;
- `summary.md`: the same rows as three tables (resources, quality, merge) for people;
- `loss_curves.png` (training loss of all variants), `memory_vs_eval_loss.png`, `tokens_per_s.png`;
- `quant_error.png`: each model's per-layer quantization error and outlier share (the quant step), also a
  table in summary.md.
Imports no torch; matplotlib renders off-screen (Agg).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from workflow import cli
from workflow.io import atomic_dir, read_json
from workflow.params import Params, variants
from workflow.provenance import provenance

PLOTS = ("loss_curves.png", "memory_vs_eval_loss.png", "tokens_per_s.png", "quant_error.png")
FORMAT_NAMES = {"int8_tensor": "int8 absmax, per tensor", "int8_row": "int8 absmax, per row (LLM.int8)",
                "nf4": "nf4, blocks of 64", "nf4_double_quant": "nf4 + double quant (QLoRA)"}

# (column, source, key, format, table): the columns in order. Sources: the variant itself ("variant"), the
# train/timing/merge/eval metrics files. Tables of summary.md: resources, quality, merge (the CSV has all).
COLUMNS = (
    ("model", "variant", "model", "{}", "all"),
    ("template", "variant", "template", "{}", "all"),
    ("precision", "variant", "precision", "{}", "all"),
    ("strategy", "variant", "strategy", "{}", "all"),
    ("weights MB", "train", "weight_footprint_bytes", "{:.2f}", "resources"),
    ("linear bits/param", "train", "linear_bits_per_param", "{:.3f}", "resources"),
    ("peak mem MB", "timing", "peak_memory_bytes", "{:.0f}", "resources"),
    ("peak mem kind", "timing", "peak_memory_kind", "{}", "resources"),
    ("mem x ref", "ratio", "peak mem MB", "{:.2f}", "resources"),
    ("train tokens/s", "timing", "tokens_per_s", "{:.0f}", "resources"),
    ("tokens/s x ref", "ratio", "train tokens/s", "{:.2f}", "resources"),
    ("samples/s", "timing", "samples_per_s", "{:.1f}", "resources"),
    ("padding efficiency", "timing", "padding_efficiency", "{:.3f}", "resources"),  # real / padded batch tokens
    ("train s", "timing", "runtime_s", "{:.1f}", "resources"),
    ("eval peak mem MB", "eval_timing", "peak_memory_bytes", "{:.0f}", "resources"),
    ("predicted GPU GB", "estimate", "total_gb", "{:.2f}", "resources"),  # workflow/estimate.py, per GPU
    ("measured / predicted", "measured", "predicted GPU GB", "{:.2f}", "resources"),  # CUDA runs only
    ("device", "timing", "device_name", "{}", "resources"),
    ("train loss first", "train", "train_loss_first", "{:.3f}", "quality"),
    ("train loss last", "train", "train_loss_last", "{:.3f}", "quality"),
    ("eval loss base", "eval", "eval_loss_base", "{:.4f}", "quality"),
    ("eval loss adapter", "eval", "eval_loss_adapter", "{:.4f}", "quality"),
    ("eval loss merged", "eval", "eval_loss_merged", "{:.4f}", "quality"),
    ("eval loss x ref", "ratio", "eval loss merged", "{:.3f}", "quality"),
    ("ppl merged", "eval", "perplexity_merged", "{:.3f}", "quality"),
    ("exact match base", "eval", "exact_match_base", "{:.3f}", "quality"),
    ("exact match adapter", "eval", "exact_match_adapter", "{:.3f}", "quality"),
    ("exact match merged", "eval", "exact_match_merged", "{:.3f}", "quality"),
    ("ROUGE-1 merged", "eval", "rouge1_merged", "{:.3f}", "quality"),
    ("ROUGE-2 merged", "eval", "rouge2_merged", "{:.3f}", "quality"),
    ("ROUGE-L merged", "eval", "rougeL_merged", "{:.3f}", "quality"),
    ("BLEU-4 merged", "eval", "bleu4_merged", "{:.3f}", "quality"),
    ("gen tokens merged", "eval", "avg_gen_tokens_merged", "{:.2f}", "quality"),
    ("eos-stop base", "eval", "eos_stop_rate_base", "{:.3f}", "quality"),
    ("eos-stop adapter", "eval", "eos_stop_rate_adapter", "{:.3f}", "quality"),
    ("eos-stop merged", "eval", "eos_stop_rate_merged", "{:.3f}", "quality"),
    ("merge check max |dlogit|", "merge", "merge_max_abs_logit_diff", "{:.2e}", "merge"),
    ("merge tolerance", "merge", "merge_tolerance", "{:.2e}", "merge"),
    ("trained vs merged max |dlogit|", "eval", "trained_vs_merged_max_abs_logit_diff", "{:.2e}", "merge"),
    ("trained vs merged loss gap", "eval", "trained_vs_merged_loss_gap", "{:+.4f}", "merge"),
    ("merge target", "eval", "merge_target", "{}", "merge"),  # merge.target as merged (base for fp16/bf16)
    # int8/nf4: both targets (the one not chosen merged in memory by the evaluate step)
    ("max |dlogit| base", "eval", "trained_vs_merged_max_abs_logit_diff_base", "{:.2e}", "merge"),
    ("max |dlogit| dequantized", "eval", "trained_vs_merged_max_abs_logit_diff_dequantized", "{:.2e}", "merge"),
    ("eval loss merged base", "eval", "eval_loss_merged_base", "{:.4f}", "merge"),
    ("eval loss merged dequantized", "eval", "eval_loss_merged_dequantized", "{:.4f}", "merge"),
)
_MB = {"weight_footprint_bytes", "peak_memory_bytes"}  # shown in MB
TABLES = {
    "resources": "Resources (timing and memory vary from run to run; the rest is deterministic)",
    "quality": "Quality (greedy decoding; deterministic for a given params.yaml)",
    "merge": "Merge: merged model vs base+adapter (merge step) and vs the model as trained (evaluate step)",
}


def _get(metrics: dict, dotted: str):
    value = metrics
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def collect(params: Params, metrics_dir: Path) -> list[dict]:
    """One row per variant with raw values, in matrix order, ratios to the reference row included."""
    rows = []
    for v in variants(params):
        files = {kind: read_json(metrics_dir / kind / f"{v['id']}.json")
                 for kind in ("estimate", "train", "timing", "merge", "eval", "eval_timing")}
        files["variant"] = {**v, "template": params.models[v["model"]].template}
        row = {"variant": v["id"], "made": files["eval_timing"].get("made") or files["timing"].get("made") or {}}
        for column, source, key, _, _ in COLUMNS:
            if source in ("ratio", "measured"):
                continue
            value = _get(files[source], key)
            row[column] = value / 1e6 if key in _MB and value is not None else value
        on_gpu = str(row["peak mem kind"] or "").startswith("cuda")  # CPU RSS is no GPU memory: no ratio
        row["measured / predicted"] = ratio(row["peak mem MB"] / 1e3, row["predicted GPU GB"]) if on_gpu else None
        rows.append(row)
    for row in rows:
        reference = reference_row(rows, row, params.report.reference)
        row["reference"] = reference["precision"]
        for column, source, key, _, _ in COLUMNS:
            if source == "ratio":
                row[column] = ratio(row[key], reference[key])
    return rows


def reference_row(rows: list[dict], row: dict, precision: str) -> dict:
    """The row `row`'s ratios divide by: `precision`'s of the same model and strategy, else that group's first
    (so every group has ratios, whatever precisions it runs)."""
    group = [r for r in rows if r["model"] == row["model"] and r["strategy"] == row["strategy"]]
    return next((r for r in group if r["precision"] == precision), group[0])


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference, or None when either is missing or the reference is 0."""
    if value is None or not reference:
        return None
    return value / reference


def made_here(rows: list[dict], now: dict) -> list[str]:
    """Where and when this report was made, and for each variant whether this invocation ran it (same run
    id) or reused it from an earlier run, naming that run's machine, date and commit."""
    lib = ", ".join(f"{k} {v}" for k, v in now["versions"].items() if v)
    lines = [f"Made on {now['host']} ({now['device']}) at {now['date']}, commit {now['commit'] or 'unknown'}; "
             f"{lib}.", ""]
    ran = [r["variant"] for r in rows if now["run_id"] and r["made"].get("run_id") == now["run_id"]]
    reused = [r for r in rows if r["variant"] not in ran]
    if now["run_id"]:
        lines.append(f"Ran by this invocation ({now['run_id']}): {', '.join(ran) or 'none'}.")
    else:
        lines.append("Run outside Snakemake (no run id): the variants below say where each was made.")
    for r in reused:
        m = r["made"]
        lines.append(f"- {'reused' if now['run_id'] else 'made'}: {r['variant']}, made on {m.get('host', '?')} "
                     f"({m.get('device', '?')}) at {m.get('date', '?')}, commit {m.get('commit') or 'unknown'}")
    return lines + [""]


def quant_reports(rows: list[dict], metrics_dir: Path) -> dict[str, dict]:
    """The quant step's report of each model in `rows`, by model."""
    return {m: read_json(metrics_dir / "quant" / f"{m}.json") for m in dict.fromkeys(r["model"] for r in rows)}


def quant_table(quant: dict[str, dict]) -> list[str]:
    """summary.md's quantization table: per model and format, bits per parameter and whole-model error."""
    if not quant:
        return []
    lines = ["## Quantization error of the base's linear layers (quant step; the plot has every layer)", "",
             "| model | format | bits/param | rel. error | layers | outlier input features |",
             "|---|---|---|---|---|---|"]
    for model, q in quant.items():
        share = f"{q['outlier_share_mean']:.4f} of features (threshold {q['outlier_threshold']:g}), " \
                f"{q['layers_with_outliers']} layers"
        for fmt, v in q["formats"].items():
            lines.append(f"| {model} | {FORMAT_NAMES.get(fmt, fmt)} | {v['bits_per_param']:.3f} | "
                         f"{v['rel_error']:.4f} | {q['layers_quantized']} | {share} |")
    return lines + [""]


def render(rows: list[dict], now: dict | None = None, quant: dict[str, dict] | None = None) -> tuple[str, str]:
    """The rows as markdown (where it was made, then three tables and the quantization table) and as CSV
    (every column)."""
    fmt = {c[0]: c[3] for c in COLUMNS}
    lines = ["# Precision comparison", ""] + made_here(rows, now or provenance())
    for table, title in TABLES.items():
        head = ["variant"] + [c[0] for c in COLUMNS if c[4] == table]
        lines += [f"## {title}", "", _md_row(head), "|" + "---|" * len(head)]
        for row in rows:
            lines.append(_md_row([row["variant"]] + ["-" if row[h] is None else fmt[h].format(row[h])
                                                     for h in head[1:]]))
        lines.append("")
    lines += merge_target_advice(rows)
    lines += quant_table(quant or {})
    refs = sorted({f"{r['model']}/{r['strategy']}: {r['reference']}" for r in rows})
    lines.append(f"Ratios (x ref) divide by the reference precision's row of the same model and strategy "
                 f"(report.reference, else the group's first precision): {', '.join(refs)}. ROUGE and BLEU "
                 "tokenize by characters (every non-space character is a token).")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["variant"] + [c[0] for c in COLUMNS] + ["reference", "made_on",
                                                                                   "made_at", "made_commit"],
                            lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**r, "made_on": f"{r['made'].get('host')} ({r['made'].get('device')})",
                      "made_at": r["made"].get("date"), "made_commit": r["made"].get("commit")} for r in rows)
    return "\n".join(lines) + "\n", buf.getvalue()


def _md_row(cells: list[str]) -> str:
    """A markdown table row; a `|` inside a cell (|dlogit|) is escaped, not a column break."""
    return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"


def merge_target_advice(rows: list[dict]) -> list[str]:
    """For each int8/nf4 variant, the merge target whose merged model has the lower eval loss (what will be
    served), with both gaps to the model as trained."""
    lines = []
    for r in rows:
        base, deq = r["eval loss merged base"], r["eval loss merged dequantized"]
        if base is None or deq is None:
            continue
        pick = "dequantized" if deq < base else "base"
        lines.append(f"- {r['variant']}: merge.target {pick} (merged eval loss {min(base, deq):.4f} vs "
                     f"{max(base, deq):.4f}; max |dlogit| to the model as trained: base "
                     f"{r['max |dlogit| base']:.2e}, dequantized {r['max |dlogit| dequantized']:.2e})")
    if lines:
        lines = ["Merge target for the quantized variants (the lower merged eval loss; both measured):", ""] + lines
    return lines + ([""] if lines else [])


def read_curve(path: Path) -> tuple[list[int], list[float]]:
    """A loss curve CSV (step,loss) written by the train step."""
    steps, losses = [], []
    for record in csv.DictReader(path.read_text(encoding="utf-8").splitlines()):
        steps.append(int(record["step"]))
        losses.append(float(record["loss"]))
    return steps, losses


def plot(rows: list[dict], curves_dir: Path, out: Path, quant: dict[str, dict] | None = None) -> None:
    """The PNGs of the report (PLOTS), into `out`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["variant"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in names:
        steps, losses = read_curve(curves_dir / f"{name}.csv")
        ax.plot(steps, losses, marker=".", label=name)
    ax.set(xlabel="optimizer step", ylabel="training loss", yscale="log", title="Training loss, all variants")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        ax.scatter(row["peak mem MB"], row["eval loss merged"], s=60)
        ax.annotate(row["variant"], (row["peak mem MB"], row["eval loss merged"]),
                    textcoords="offset points", xytext=(6, 4), fontsize=8)
    kinds = sorted({str(r["peak mem kind"]) for r in rows})
    ax.set(xlabel=f"peak memory during training, MB ({', '.join(kinds)})", ylabel="eval loss, merged model",
           title="Memory vs quality (lower left is better)")
    ax.margins(x=0.2, y=0.15)  # room for the labels
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "memory_vs_eval_loss.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    values = [r["train tokens/s"] or 0 for r in rows]
    bars = ax.bar(names, values, color="tab:blue")
    ax.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=8)
    ax.set(ylabel="train tokens/s (non-pad tokens)", title="Training throughput")
    ax.tick_params(axis="x", labelrotation=15, labelsize=8)
    fig.tight_layout()
    fig.savefig(out / "tokens_per_s.png", dpi=110)
    plt.close(fig)

    quant = quant or {}
    fig, axes = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, squeeze=False)
    for model, q in quant.items():
        x = range(len(q["layers"]))
        for fmt in q["formats"]:
            axes[0][0].plot(x, [r["rel_error"][fmt] for r in q["layers"]], marker=".", label=f"{model}: {fmt}")
        axes[1][0].plot(x, [r["outlier_share"] for r in q["layers"]], marker=".", label=model)
    axes[0][0].set(ylabel="||W - deq(q(W))|| / ||W||", yscale="log", title="Quantization error per linear layer")
    threshold = next(iter(quant.values()))["outlier_threshold"] if quant else 6.0
    axes[1][0].set(xlabel="linear layer (model order)", ylabel=f"share of features |x| >= {threshold:g}")
    for ax in (axes[0][0], axes[1][0]):
        ax.grid(alpha=0.3, which="both")
        if quant:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quant_error.png", dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("report", __doc__, model=False)
    p.add_argument("--metrics-dir", required=True, type=Path, help="directory with train/, timing/, merge/, eval/")
    p.add_argument("--curves-dir", required=True, type=Path, help="directory with the loss curve CSVs")
    p.add_argument("--out", required=True, type=Path, help="report directory to write")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    rows = collect(params, args.metrics_dir)
    quant = quant_reports(rows, args.metrics_dir)
    markdown, table = render(rows, quant=quant)
    with atomic_dir(args.out) as tmp:
        (tmp / "summary.md").write_text(markdown, encoding="utf-8")
        (tmp / "summary.csv").write_text(table, encoding="utf-8")
        plot(rows, args.curves_dir, tmp, quant)
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
