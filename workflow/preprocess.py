"""Step preprocess: load alpaca rows, split train/eval with the seed, tokenize them for one model.

Writes <out>/train and <out>/eval (`datasets` saved to disk: input_ids, attention_mask, labels) and
<out>/report.json (rows read/kept/dropped per reason, truncation, token lengths; also written to --report,
the metric DVC tracks); with `data.source: builtin:tasks` also <out>/raw.jsonl, the generated rows.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

from workflow import cli, tasks
from workflow.data import FIRST_ROWS, BadRows, judge_rows, position_unit, read_source
from workflow.io import atomic_dir, write_json_atomic
from workflow.params import Params
from workflow.stages import STALE, dvc_yaml_is_current
from workflow.templates import get_template
from workflow.tokenize import load_tokenizer, render_conversation, tokenize_rows

log = logging.getLogger("workflow.preprocess")

BUILTIN_SOURCE = "builtin:tasks"


def builtin_rows(params: Params) -> tuple[list[dict], list[dict]]:
    """(train, eval) rows of `builtin:tasks`: distinct, eval on held-out words and numbers (workflow/tasks.py)."""
    return tasks.builtin_split(params.data.builtin_rows, params.data.eval_size, params.seed)


def load_rows(params: Params) -> tuple[list[tuple[int, dict]], BadRows, int]:
    """The good rows named by `data.source` as (row/line number, row), the bad-row tally, rows read.
    `builtin:tasks` rows come train rows first, then the eval rows."""
    source = params.data.source
    if source == BUILTIN_SOURCE:
        train, eval_rows = builtin_rows(params)
        records = list(enumerate(train + eval_rows, 1))
    elif source.startswith("builtin:"):
        raise cli.StepError(f"data.source: unknown builtin '{source}'; use {BUILTIN_SOURCE} or a file path")
    else:
        records = read_source(source)
    bad = BadRows(source, position_unit(source), params.data.strict)
    if not records:
        raise cli.StepError(f"{source}: no rows; point data.source at data with instruction/output rows")
    rows = judge_rows(records, params.data.columns.model_dump(), bad)
    if not rows:
        raise cli.StepError(f"{source}: no usable rows, all {len(records)} dropped ({bad.summary()}); check "
                            "data.columns against the file's column names")
    return rows, bad, len(records)


def split_rows(rows: list, eval_size: int, seed: int) -> tuple[list, list]:
    """Shuffle with `seed`, hold out the first `eval_size` rows for eval; return (train, eval)."""
    if eval_size >= len(rows):
        raise cli.StepError(
            f"data.eval_size is {eval_size} but there are only {len(rows)} rows; lower it or add data"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[eval_size:]], [rows[i] for i in order[:eval_size]]


def dedupe(rows: list[tuple[int, dict]], template) -> tuple[list[tuple[int, dict]], dict]:
    """The rows with every repeat of an earlier row's rendered conversation dropped (the first one stays),
    and what was dropped: a repeat that lands in eval would score a training example."""
    seen: set[str] = set()
    kept, dropped = [], []
    for number, row in rows:
        text = render_conversation(row, template)[1]
        if text in seen:
            dropped.append(number)
        else:
            seen.add(text)
            kept.append((number, row))
    return kept, {"count": len(dropped), "first_rows": dropped[:FIRST_ROWS]}


def overlap(train_rows: list[tuple[int, dict]], eval_rows: list[tuple[int, dict]], template) -> dict:
    """Eval rows whose whole conversation, or whose prompt alone (a different answer), is also in train."""
    rendered = [render_conversation(r, template) for _, r in train_rows]
    prompts, texts = {p for p, _ in rendered}, {t for _, t in rendered}
    same = [(n, render_conversation(r, template)) for n, r in eval_rows]
    conversations = [n for n, (_, t) in same if t in texts]
    asked = [n for n, (p, _) in same if p in prompts]
    return {"conversations": len(conversations), "prompts": len(asked), "first_rows": asked[:FIRST_ROWS]}


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min/mean/p50/p95/max of token lengths (nearest-rank percentiles)."""
    s = sorted(lengths)
    rank = lambda q: s[max(0, math.ceil(q * len(s)) - 1)]  # noqa: E731
    return {"min": s[0], "mean": round(sum(s) / len(s), 2), "p50": rank(0.5), "p95": rank(0.95), "max": s[-1]}


def _tokenize_split(part, tokenizer, template, data, bad: BadRows) -> tuple[dict, dict]:
    """Tokenize one split's (number, row) pairs; over-long drops go to `bad`; return columns and outcome."""
    columns, outcome = tokenize_rows([r for _, r in part], tokenizer, template, data.max_length,
                                     data.overlong, data.last_turn_only)
    for i in outcome["too_long"]:
        bad.add("too_long", part[i][0])
    return columns, outcome


def preprocess(params: Params, model_key: str, model_dir: str | Path, out: str | Path,
               report_path: str | Path | None = None) -> dict:
    """Run the step for `model_key`; write `out` (and the report to `report_path`) atomically; return it."""
    from datasets import Dataset

    entry = params.models[model_key]
    template = get_template(entry.template)
    data = params.data
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise cli.StepError(f"{model_dir}: model directory not found; run the download step for '{model_key}'")
    rows, bad, rows_read = load_rows(params)
    rows, duplicates = dedupe(rows, template)  # before the split: no copy of a train row can land in eval
    if data.source == BUILTIN_SOURCE:  # split by held-out facts, not by shuffle
        n_train = data.builtin_rows - data.eval_size
        train_rows, eval_rows = [r for r in rows if r[0] <= n_train], [r for r in rows if r[0] > n_train]
    else:
        train_rows, eval_rows = split_rows(rows, data.eval_size, params.seed)
    shared = overlap(train_rows, eval_rows, template)
    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    report: dict = {
        "model": model_key, "source": data.source, "seed": params.seed, "template": template.name,
        "max_length": data.max_length, "overlong": data.overlong, "last_turn_only": data.last_turn_only,
        "rows_read": rows_read, "position_unit": bad.unit, "examples_truncated": 0,
        "examples_eos_truncated": 0, "truncated_first_rows": [], "token_length": {}, "warnings": [],
        "duplicates_dropped": duplicates, "overlap": shared,
    }
    splits = {}
    for split, part in (("train", train_rows), ("eval", eval_rows)):
        columns, outcome = _tokenize_split(part, tokenizer, template, data, bad)
        if not columns["input_ids"]:
            raise cli.StepError(f"{data.source}: every {split} row was dropped ({bad.summary()}); see "
                                "data.max_length / data.overlong")
        splits[split] = columns
        report[f"{split}_rows"] = len(columns["input_ids"])
        report["examples_truncated"] += len(outcome["truncated"])
        report["examples_eos_truncated"] += len(outcome["eos_truncated"])
        report["truncated_first_rows"] += [part[i][0] for i in outcome["truncated"][:FIRST_ROWS]]
        report["token_length"][split] = length_stats([len(x) for x in columns["input_ids"]])
    report["truncated_first_rows"] = sorted(report["truncated_first_rows"])[:FIRST_ROWS]
    report["rows_kept"] = report["train_rows"] + report["eval_rows"]
    report["rows_dropped"] = bad.count
    report["dropped"] = bad.dropped
    if report["examples_eos_truncated"]:
        report["warnings"].append(
            f"{report['examples_eos_truncated']} examples exceed data.max_length={data.max_length} and lost "
            "their stop token (overlong: truncate_end); the model will not learn to stop on them")
    if duplicates["count"]:
        report["warnings"].append(
            f"{duplicates['count']} duplicate rows dropped before the train/eval split (first {bad.unit}s "
            f"{', '.join(map(str, duplicates['first_rows']))}); each conversation is kept once")
    if shared["prompts"]:
        report["warnings"].append(
            f"{shared['prompts']} of {len(eval_rows)} eval rows ask a prompt a train row also asks, with another "
            f"answer ({bad.unit}s {', '.join(map(str, shared['first_rows']))}); their scores partly measure "
            "recall of training data: give each prompt one answer in data.source")
    if bad.count:
        report["warnings"].append(f"{bad.count} bad rows dropped ({bad.summary()}); data.strict: true fails instead")
    with atomic_dir(out) as tmp:
        for split, columns in splits.items():
            Dataset.from_dict(columns).save_to_disk(str(tmp / split))
        if data.source == BUILTIN_SOURCE:  # let users see the generated data, each row with its split
            train, held = builtin_rows(params)
            text = "".join(json.dumps({**r, "split": split}, ensure_ascii=False) + "\n"
                           for split, part in (("train", train), ("eval", held)) for r in part)
            (tmp / "raw.jsonl").write_text(text, encoding="utf-8")
        write_json_atomic(tmp / "report.json", report)
    if report_path is not None:
        write_json_atomic(report_path, report)
    for warning in report["warnings"]:
        log.warning("%s", warning)
    log.info("preprocess %s: %d train / %d eval rows -> %s", model_key, report["train_rows"],
             report["eval_rows"], out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("preprocess", __doc__)
    p.add_argument("--model-dir", required=True, help="the downloaded model, e.g. results/models/<key>")
    p.add_argument("--out", required=True, help="output directory, e.g. results/data/<key>")
    p.add_argument("--report", help="also write the data report here (a metric), e.g. results/metrics/data/<key>.json")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    if Path(args.params).resolve() == Path("params.yaml").resolve() and not dvc_yaml_is_current():
        raise cli.StepError(STALE)  # dvc.yaml would not track this data.source (a `dvc repro` of it)
    import datasets

    datasets.disable_progress_bars()  # save_to_disk's bars would only clutter the step's log file
    preprocess(params, args.model, args.model_dir, args.out, args.report)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
