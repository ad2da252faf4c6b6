"""Reading alpaca data and judging its rows: the one place that decides what a bad row is.

Sources: a JSON array, JSONL, parquet, CSV or a `datasets` save_to_disk directory; the column names are
mapped by `data.columns`. A bad row is dropped and counted per reason (with its first row numbers) in a
`BadRows` tally, or, with `data.strict`, fails the step naming the file and row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from workflow import cli

FORMATS = ".json, .jsonl, .parquet, .csv or a `datasets` directory"
FIRST_ROWS = 5  # row numbers kept per drop reason in the report

# reason -> what is wrong and what to do; {field} names the file's column for that field.
REASONS = {
    "invalid_json": "not valid JSON; fix or delete that line",
    "not_an_object": "not an object with instruction/input/output; fix or delete it",
    "instruction_missing": "`{field}` is missing or empty; fill it in or remove the row",
    "instruction_not_text": "`{field}` is not text; fix the row",
    "output_missing": "`{field}` is missing or empty; fill it in or remove the row",
    "output_not_text": "`{field}` is not text; fix the row",
    "input_not_text": "`{field}` must be text (or absent); fix the row",
    "system_not_text": "`{field}` must be text (or absent); fix the row",
    "history_invalid": "`{field}` must be a list of [user, assistant] text pairs; fix the row",
    "too_long": "longer than data.max_length tokens; shorten it, raise max_length or set data.overlong",
}


class BadRows:
    """Tally of dropped rows per reason; raises on the first one when `strict`."""

    def __init__(self, origin: str, unit: str, strict: bool):
        self.origin, self.unit, self.strict = origin, unit, strict
        self.dropped: dict[str, dict] = {}

    def add(self, reason: str, number: int, field: str = "") -> None:
        if self.strict:
            message = REASONS[reason].format(field=field)
            raise cli.StepError(f"{self.origin}: {self.unit} {number}: {message} (or set data.strict: false "
                                "to drop bad rows)")
        entry = self.dropped.setdefault(reason, {"count": 0, "first_rows": []})
        entry["count"] += 1
        if len(entry["first_rows"]) < FIRST_ROWS:
            entry["first_rows"].append(number)

    @property
    def count(self) -> int:
        return sum(e["count"] for e in self.dropped.values())

    def summary(self) -> str:
        return ", ".join(f"{k}: {v['count']}" for k, v in sorted(self.dropped.items())) or "none"


class _InvalidJson:
    """Marks a JSONL line that did not parse (judged like any other bad row)."""


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")  # no newline translation: CSV cells keep their \r\n
    except UnicodeDecodeError as exc:
        raise cli.StepError(f"{path}: not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def _read_json(path: Path) -> list[tuple[int, object]]:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise cli.StepError(f"{path}: not valid JSON (line {exc.lineno}); fix it or use {FORMATS}") from None
    if not isinstance(data, list):
        raise cli.StepError(f"{path}: must hold a JSON array of row objects, found {type(data).__name__}")
    return list(enumerate(data, 1))


def _read_jsonl(path: Path) -> list[tuple[int, object]]:
    rows: list[tuple[int, object]] = []
    for lineno, line in enumerate(_read_text(path).split("\n"), 1):  # not splitlines(): U+2028 may sit raw in JSON
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) are not rows
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError:
            rows.append((lineno, _InvalidJson()))
    return rows


def _read_csv(path: Path) -> list[tuple[int, object]]:
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""))  # quoted cells may hold newlines
    rows = []
    for rec in reader:
        rows.append((reader.line_num, rec))  # the line the row ends on (cells may span lines)
    return rows


def _read_parquet(path: Path) -> list[tuple[int, object]]:
    import pyarrow.parquet as pq

    try:
        return list(enumerate(pq.read_table(path).to_pylist(), 1))
    except Exception as exc:  # pyarrow raises several types for damaged files
        raise cli.StepError(f"{path}: not a readable parquet file ({exc.__class__.__name__})") from None


def _read_datasets_dir(path: Path) -> list[tuple[int, object]]:
    from datasets import DatasetDict, load_from_disk

    try:
        data = load_from_disk(str(path))
    except FileNotFoundError:
        raise cli.StepError(f"{path}: a directory but not a `datasets` save_to_disk; use {FORMATS}") from None
    if isinstance(data, DatasetDict):
        if "train" not in data:
            raise cli.StepError(f"{path}: DatasetDict has no 'train' split (has {', '.join(data)})")
        data = data["train"]
    return list(enumerate(data.to_list(), 1))


READERS = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}


def position_unit(source: str) -> str:
    """How positions in `source` are named in messages: "line" for JSONL/CSV, "row" otherwise."""
    return "line" if Path(source).suffix.lower() in (".jsonl", ".csv") else "row"


def read_source(source: str) -> list[tuple[int, object]]:
    """The raw records of a user data source as (line or row number, record); one-line errors."""
    path = Path(source)  # relative paths are relative to the working directory, i.e. the project root
    if not path.exists():
        raise cli.StepError(f"{path}: data file not found; fix data.source in params.yaml")
    if path.is_dir():
        return _read_datasets_dir(path)
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise cli.StepError(f"{path}: unsupported data format '{path.suffix}'; use {FORMATS}")
    if path.stat().st_size == 0:
        raise cli.StepError(f"{path}: file is empty; point data.source at a file with rows")
    return reader(path)


def _text(value) -> bool:
    return isinstance(value, str)


def _history(value) -> list[list[str]] | None:
    """The history as [[user, assistant], ...], or None if it is not one (JSON text is accepted: CSV)."""
    if value is None or value == "":
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    if not isinstance(value, list):
        return None
    pairs = []
    for pair in value:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_text(x) and x.strip() for x in pair)):
            return None
        pairs.append([pair[0], pair[1]])
    return pairs


def judge_row(rec: object, columns: dict[str, str]) -> tuple[dict | None, str, str]:
    """(clean row, "", "") for a good record, else (None, reason, column) naming what is wrong."""
    if isinstance(rec, _InvalidJson):
        return None, "invalid_json", ""
    if not isinstance(rec, dict):
        return None, "not_an_object", ""
    get = {key: rec.get(col) for key, col in columns.items()}
    for key in ("instruction", "output"):
        if get[key] is None or (_text(get[key]) and not get[key].strip()):
            return None, f"{key}_missing", columns[key]
        if not _text(get[key]):
            return None, f"{key}_not_text", columns[key]
    for key in ("input", "system"):
        if get[key] is not None and not _text(get[key]):
            return None, f"{key}_not_text", columns[key]
    history = _history(get["history"])
    if history is None:
        return None, "history_invalid", columns["history"]
    row = {"instruction": get["instruction"], "input": get["input"] or "", "output": get["output"],
           "system": get["system"] or "", "history": history}
    return row, "", ""


def judge_rows(records: list[tuple[int, object]], columns: dict[str, str], bad: BadRows) -> list[tuple[int, dict]]:
    """The good records as (number, clean row); bad ones go to `bad`."""
    rows = []
    for number, rec in records:
        row, reason, field = judge_row(rec, columns)
        if row is None:
            bad.add(reason, number, field)
        else:
            rows.append((number, row))
    return rows
