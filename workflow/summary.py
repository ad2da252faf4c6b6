"""Step `summary`: one table, a row per variant, from every variant's train/merge/eval metrics.

Writes `summary.md` (for people) and `summary.csv` (for tools), answering "which precision should I
fine-tune with?" with memory, speed and quality side by side.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path

from workflow import cli
from workflow.io import atomic_dir, read_json
from workflow.params import Params, variants

# (column, source file, key, format): the table's columns in order.
COLUMNS = (
    ("variant", "train", "variant", "{}"),
    ("weights MB", "train", "weight_footprint_bytes", "{:.2f}"),
    ("peak mem MB", "train", "peak_memory_bytes", "{:.0f}"),
    ("tokens/s", "train", "tokens_per_s", "{:.0f}"),
    ("train s", "train", "runtime_s", "{:.1f}"),
    ("train loss first", "train", "train_loss_first", "{:.3f}"),
    ("train loss last", "train", "train_loss_last", "{:.3f}"),
    ("eval loss base", "eval", "eval_loss_base", "{:.4f}"),
    ("eval loss adapter", "eval", "eval_loss_adapter", "{:.4f}"),
    ("eval loss merged", "eval", "eval_loss_merged", "{:.4f}"),
    ("ppl merged", "eval", "perplexity_merged", "{:.3f}"),
    ("merge max |dlogit|", "merge", "merge_max_abs_logit_diff", "{:.2e}"),
    ("optim", "train", "resolved.optim", "{}"),
)
_MB = {"weight_footprint_bytes", "peak_memory_bytes"}


def _get(metrics: dict, dotted: str):
    value = metrics
    for part in dotted.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    return value


def collect(params: Params, metrics_dir: Path) -> list[dict]:
    """One row per variant with raw values, in matrix order."""
    rows = []
    for v in variants(params):
        files = {kind: read_json(metrics_dir / kind / f"{v['id']}.json") for kind in ("train", "merge", "eval")}
        row = {}
        for column, kind, key, _ in COLUMNS:
            value = _get(files[kind], key)
            row[column] = value / 1e6 if key in _MB and value is not None else value
        rows.append(row)
    return rows


def render(rows: list[dict]) -> tuple[str, str]:
    """The table as markdown and as CSV."""
    head = [c[0] for c in COLUMNS]
    fmt = {c[0]: c[3] for c in COLUMNS}
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        cells = ["-" if row[h] is None else fmt[h].format(row[h]) for h in head]
        lines.append("| " + " | ".join(cells) + " |")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=head, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return "\n".join(lines) + "\n", buf.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("summary", __doc__, model=False)
    p.add_argument("--metrics-dir", required=True, type=Path, help="directory with train/, merge/, eval/ metrics")
    p.add_argument("--out", required=True, type=Path, help="directory to write summary.md and summary.csv")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    markdown, table = render(collect(params, args.metrics_dir))
    with atomic_dir(args.out) as tmp:
        (tmp / "summary.md").write_text(markdown, encoding="utf-8")
        (tmp / "summary.csv").write_text(table, encoding="utf-8")
    print(markdown, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
