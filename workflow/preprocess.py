"""Step preprocess: load alpaca rows, split train/eval with the seed, tokenize them for one model.

Writes <out>/train and <out>/eval (`datasets` saved to disk: input_ids, attention_mask, labels) and
<out>/report.json; with `data.source: builtin:tasks` also <out>/raw.jsonl, the generated rows.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Sequence
from pathlib import Path

from workflow import cli, tasks
from workflow.io import atomic_dir, write_json_atomic
from workflow.params import Params
from workflow.templates import get_template
from workflow.tokenize import tokenize_rows

log = logging.getLogger("workflow.preprocess")

BUILTIN_SOURCE = "builtin:tasks"
FORMATS = ".json, .jsonl, .parquet or a `datasets` directory"


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise cli.StepError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def _read_json(path: Path) -> list:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise cli.StepError(f"{path}: not valid JSON (line {exc.lineno}); fix it or use {FORMATS}") from None
    if not isinstance(data, list):
        raise cli.StepError(f"{path}: must hold a JSON array of row objects, found {type(data).__name__}")
    return data


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    rows = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines(): U+2028 may sit raw in JSON
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not rows
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError:
            raise cli.StepError(f"{path}: line {lineno}: not valid JSON; fix or delete that line") from None
    return rows


def _read_parquet(path: Path) -> list:
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise cli.StepError(f"{path}: not a readable parquet file ({exc.__class__.__name__})") from None


def _read_datasets_dir(path: Path) -> list:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise cli.StepError(f"{path}: a directory but not a `datasets` save_to_disk; use {FORMATS}") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise cli.StepError(f"{path}: DatasetDict has no 'train' split (has {', '.join(data)})")
        data = data["train"]
    return data.to_list()


def read_source(source: str) -> list[tuple[int, object]]:
    """The raw records of a user data source as (line or row number, record); one-line errors."""
    path = Path(source)  # relative paths are relative to the working directory, i.e. the project root
    if not path.exists():
        raise cli.StepError(f"{path}: data file not found; fix data.source in params.yaml")
    if path.is_dir():
        return list(enumerate(_read_datasets_dir(path), 1))
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise cli.StepError(f"{path}: unsupported data format '{path.suffix}'; use {FORMATS}")
    if path.stat().st_size == 0:
        raise cli.StepError(f"{path}: file is empty; point data.source at a file with rows")
    records = reader(path)
    return records if reader is _read_jsonl else list(enumerate(records, 1))


def validate_rows(records: list[tuple[int, object]], origin: str, unit: str = "row") -> list[dict[str, str]]:
    """Check every (number, record) is an alpaca row; return clean {instruction, input, output} dicts.

    The one place rows are judged (dropping and reporting bad rows will grow here). `unit` names the
    position in errors: "line" for JSONL, "row" otherwise; numbers are 1-based.
    """
    if not records:
        raise cli.StepError(f"{origin}: no rows; point data.source at data with instruction/output rows")
    rows = []
    for i, rec in records:
        where = f"{origin}: {unit} {i}"
        if not isinstance(rec, dict):
            kind = type(rec).__name__
            raise cli.StepError(f"{where}: expected an object with instruction/input/output, got {kind}")
        instruction, input_text, output = rec.get("instruction"), rec.get("input"), rec.get("output")
        if not isinstance(instruction, str) or not instruction.strip():
            raise cli.StepError(f"{where}: `instruction` is missing or empty; fill it in or remove the row")
        if not isinstance(output, str):
            raise cli.StepError(f"{where}: `output` is missing or not text; fill it in or remove the row")
        if input_text is not None and not isinstance(input_text, str):
            raise cli.StepError(f"{where}: `input` must be text (or absent); fix the row")
        rows.append({"instruction": instruction, "input": input_text or "", "output": output})
    return rows


def load_rows(params: Params) -> list[dict[str, str]]:
    """The validated alpaca rows named by `data.source`."""
    source = params.data.source
    if source == BUILTIN_SOURCE:
        return validate_rows(list(enumerate(tasks.alpaca_rows(params.data.builtin_rows, params.seed), 1)), source)
    if source.startswith("builtin:"):
        raise cli.StepError(f"data.source: unknown builtin '{source}'; use {BUILTIN_SOURCE} or a file path")
    unit = "line" if Path(source).suffix.lower() == ".jsonl" else "row"
    return validate_rows(read_source(source), source, unit)


def split_rows(rows: list, eval_size: int, seed: int) -> tuple[list, list]:
    """Shuffle with `seed`, hold out the first `eval_size` rows for eval; return (train, eval)."""
    if eval_size >= len(rows):
        raise cli.StepError(
            f"data.eval_size is {eval_size} but there are only {len(rows)} rows; lower it or add data"
        )
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in order[eval_size:]], [rows[i] for i in order[:eval_size]]


def length_stats(lengths: list[int]) -> dict[str, float]:
    """min/mean/p50/p95/max of token lengths (nearest-rank percentiles)."""
    s = sorted(lengths)
    rank = lambda q: s[max(0, math.ceil(q * len(s)) - 1)]  # noqa: E731
    return {"min": s[0], "mean": round(sum(s) / len(s), 2), "p50": rank(0.5), "p95": rank(0.95), "max": s[-1]}


def preprocess(params: Params, model_key: str, model_dir: str | Path, out: str | Path) -> dict:
    """Run the step for `model_key`; write `out` atomically and return its report."""
    from datasets import Dataset
    from transformers import AutoTokenizer

    entry = params.models[model_key]
    template = get_template(entry.template)
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise cli.StepError(f"{model_dir}: model directory not found; run the download step for '{model_key}'")
    rows = load_rows(params)
    train_rows, eval_rows = split_rows(rows, params.data.eval_size, params.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=entry.trust_remote_code)
    max_length = params.data.max_length
    report: dict = {
        "model": model_key, "source": params.data.source, "seed": params.seed, "template": template.name,
        "max_length": max_length, "rows_read": len(rows), "train_rows": len(train_rows),
        "eval_rows": len(eval_rows), "examples_truncated": 0, "examples_eos_truncated": 0,
        "examples_without_labels": 0, "token_length": {},
    }
    with atomic_dir(out) as tmp:
        for split, part in (("train", train_rows), ("eval", eval_rows)):
            columns, counts = tokenize_rows(part, tokenizer, template, max_length)
            Dataset.from_dict(columns).save_to_disk(str(tmp / split))
            report["examples_truncated"] += counts["truncated"]
            report["examples_eos_truncated"] += counts["eos_truncated"]
            report["examples_without_labels"] += counts["no_labels"]
            report["token_length"][split] = length_stats([len(x) for x in columns["input_ids"]])
        if params.data.source == BUILTIN_SOURCE:  # let users see the generated data
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
            (tmp / "raw.jsonl").write_text(text, encoding="utf-8")
        write_json_atomic(tmp / "report.json", report)
    if report["examples_eos_truncated"]:
        log.warning("%d examples exceed data.max_length=%d and lost their eos; the model will not learn to "
                    "stop on them", report["examples_eos_truncated"], max_length)
    log.info("preprocess %s: %d train / %d eval rows -> %s", model_key, len(train_rows), len(eval_rows), out)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("preprocess", __doc__)
    p.add_argument("--model-dir", required=True, help="the downloaded model, e.g. results/models/<key>")
    p.add_argument("--out", required=True, help="output directory, e.g. results/data/<key>")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    import datasets

    datasets.disable_progress_bars()  # save_to_disk's bars would only clutter the step's log file
    preprocess(params, args.model, args.model_dir, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
