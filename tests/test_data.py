"""Bad rows: each class is dropped and reported with its row numbers, or with `strict` fails naming file and row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from workflow import cli
from workflow.data import REASONS, BadRows, judge_rows, read_source
from workflow.params import Columns, load_params
from workflow.preprocess import load_rows, preprocess

ROOT = Path(__file__).resolve().parents[1]
OK = {"instruction": "Say hi.", "input": "", "output": "hi"}
COLUMNS = Columns().model_dump()

# (reason, the bad record, text its strict-mode message must contain)
BAD = [
    ("not_an_object", ["Say hi.", "hi"], "not an object with instruction/input/output"),
    ("instruction_missing", {"input": "x", "output": "y"}, "`instruction` is missing or empty"),
    ("instruction_missing", {"instruction": "   ", "output": "y"}, "`instruction` is missing or empty"),
    ("instruction_not_text", {"instruction": 3, "output": "y"}, "`instruction` is not text"),
    ("output_missing", {"instruction": "Say bye."}, "`output` is missing or empty"),
    ("output_missing", {"instruction": "Say bye.", "output": ""}, "`output` is missing or empty"),
    ("output_not_text", {"instruction": "Say bye.", "output": ["bye"]}, "`output` is not text"),
    ("input_not_text", {"instruction": "Add.", "input": 5, "output": "5"}, "`input` must be text"),
    ("system_not_text", {**OK, "system": {"role": "x"}}, "`system` must be text"),
    ("history_invalid", {**OK, "history": [["only user"]]}, "`history` must be a list of [user, assistant]"),
    ("history_invalid", {**OK, "history": "not json"}, "`history` must be a list of [user, assistant]"),
    ("history_invalid", {**OK, "history": [["q", 1]]}, "`history` must be a list of [user, assistant]"),
]


def _params(**data):
    p = load_params(ROOT / "params.yaml")
    return p.model_copy(update={"data": p.data.model_copy(update=data)})


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("reason,record,message", BAD, ids=[f"{r}-{i}" for i, (r, _, _) in enumerate(BAD)])
def test_bad_row_dropped_or_strict_failure(tmp_path, reason, record, message):
    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps(OK), json.dumps(record), json.dumps(OK)])
    rows, bad, read = load_rows(_params(source=str(path)))
    assert read == 3 and [n for n, _ in rows] == [1, 3]
    assert bad.dropped == {reason: {"count": 1, "first_rows": [2]}}
    with pytest.raises(cli.StepError) as info:
        load_rows(_params(source=str(path), strict=True))
    text = str(info.value)
    assert text.startswith(f"{path}: line 2: {message}") and "data.strict: false" in text and "\n" not in text


def test_invalid_json_lines_are_reported_with_line_numbers(tmp_path):
    lines = [json.dumps(OK), "{not json", json.dumps(OK), "", "[1, 2", json.dumps(OK)]
    path = _jsonl(tmp_path / "rows.jsonl", lines)
    rows, bad, read = load_rows(_params(source=str(path)))
    assert [n for n, _ in rows] == [1, 3, 6] and read == 5  # the blank line 4 is not a row
    assert bad.dropped == {"invalid_json": {"count": 2, "first_rows": [2, 5]}}
    with pytest.raises(cli.StepError, match=r"rows.jsonl: line 2: not valid JSON; fix or delete that line"):
        load_rows(_params(source=str(path), strict=True))


def test_row_numbers_in_json_arrays_and_first_rows_cap(tmp_path):
    records = [OK if i % 2 else {"instruction": ""} for i in range(20)]  # rows 1, 3, 5, ... are bad
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(records))
    rows, bad, _ = load_rows(_params(source=str(path)))
    assert len(rows) == 10 and bad.dropped == {"instruction_missing": {"count": 10, "first_rows": [1, 3, 5, 7, 9]}}
    with pytest.raises(cli.StepError, match=r"rows.json: row 1: `instruction` is missing"):
        load_rows(_params(source=str(path), strict=True))


def test_csv_rows_name_their_lines_and_parse_history(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text('instruction,input,output,history\nSay hi.,,hi,"[[""Hello"", ""Hi!""]]"\n,,empty,\n'
                    'Two,"line\none",2,\n', encoding="utf-8")
    rows, bad, read = load_rows(_params(source=str(path)))
    assert read == 3 and bad.dropped == {"instruction_missing": {"count": 1, "first_rows": [3]}}
    assert rows[0] == (2, {"instruction": "Say hi.", "input": "", "output": "hi", "system": "",
                           "history": [["Hello", "Hi!"]]})
    assert rows[1][1]["input"] == "line\none"


def test_every_reason_has_a_message_that_says_what_to_do():
    tested = {reason for reason, _, _ in BAD} | {"invalid_json", "too_long"}
    assert tested == set(REASONS)
    for reason, message in REASONS.items():
        assert ";" in message, reason  # "<what is wrong>; <what to do>"


def test_judge_rows_unit():
    bad = BadRows("x.json", "row", strict=False)
    rows = judge_rows([(1, OK), (2, {"instruction": "q"}), (3, OK)], COLUMNS, bad)
    assert [n for n, _ in rows] == [1, 3] and bad.count == 1 and bad.summary() == "output_missing: 1"


def test_too_long_rows_dropped_or_strict(tmp_path, builtin_tokenizer_dir):
    long_row = {"instruction": "Repeat.", "input": "", "output": "apple river stone " * 40}
    distinct = [json.dumps({**OK, "output": f"{OK['output']} {i}"}) for i in range(9)]  # repeats would be deduped
    path = _jsonl(tmp_path / "rows.jsonl", distinct[:6] + [json.dumps(long_row)] + distinct[6:])
    params = _params(source=str(path), eval_size=2, overlong="drop")
    report = preprocess(params, "tiny", builtin_tokenizer_dir, tmp_path / "out")
    assert report["dropped"] == {"too_long": {"count": 1, "first_rows": [7]}}
    assert report["rows_read"] == 10 and report["rows_kept"] == 9 and report["rows_dropped"] == 1
    with pytest.raises(cli.StepError, match=r"rows.jsonl: line 7: longer than data.max_length tokens"):
        preprocess(_params(source=str(path), eval_size=2, overlong="drop", strict=True), "tiny",
                   builtin_tokenizer_dir, tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


def test_empty_result_is_an_error(tmp_path, builtin_tokenizer_dir):
    long_row = {"instruction": "Repeat.", "input": "", "output": "apple river stone " * 40}
    path = _jsonl(tmp_path / "rows.jsonl", [json.dumps({**long_row, "input": str(i)}) for i in range(5)])
    with pytest.raises(cli.StepError, match=r"every train row was dropped \(too_long: \d\)"):
        preprocess(_params(source=str(path), eval_size=1, overlong="drop"), "tiny", builtin_tokenizer_dir,
                   tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_read_source_keeps_unparsed_lines_for_judgement(tmp_path):
    path = _jsonl(tmp_path / "rows.jsonl", ["{x", json.dumps(OK)])
    records = read_source(str(path))
    assert [n for n, _ in records] == [1, 2] and records[1][1] == OK
