"""Tests of workflow.tokenize and the preprocess step, on a real (small, trained here) tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import params_with
from workflow import cli, tasks
from workflow.errors import ParamsError
from workflow.params import Columns, load_params
from workflow.preprocess import load_rows, main, preprocess, split_rows
from workflow.templates import get_template
from workflow.tokenize import prepare_tokenizer, tokenize_rows

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = get_template("human_assistant")

# Rows that exercise the edges: Chinese, no input, empty output, long text.
EDGE_ROWS = [
    {"instruction": "把数字写成中文。", "input": "37", "output": "三十七"},
    {"instruction": "Say hello.", "input": "", "output": "hello"},
    {"instruction": "  Padded instruction  ", "input": "", "output": " leading space"},
    {"instruction": "Answer nothing.", "input": "x", "output": ""},
    {"instruction": "Repeat the sentence.", "input": "apple river stone " * 8, "output": "cloud green music " * 8},
]


def _train_tokenizer(out: Path, *, pad: bool = True, eos: bool = True) -> Path:
    """A byte-level BPE tokenizer trained on the project's corpus, saved as a transformers tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # so decode(encode(x)) == x
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(tasks.corpus_texts(500, 0) + ["Human: Assistant:"] * 20, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", unk_token="<unk>",
        eos_token="</s>" if eos else None, pad_token="<pad>" if pad else None,
    )
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    """Our own tokenizer dir, so these tests never wait on the builtin model."""
    return _train_tokenizer(tmp_path_factory.mktemp("bpe_tok"))


@pytest.fixture(scope="session")
def tokenizer(bpe_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bpe_tokenizer_dir)


@pytest.fixture()
def params():
    """The repo's params with a small builtin data set."""
    p = load_params(ROOT / "params.yaml")
    return _with_data(p, source="builtin:tasks", builtin_rows=120, eval_size=20, max_length=96)


def _with_data(p, **data):
    return p.model_copy(update={"data": p.data.model_copy(update=data)})


def _expected_text(row) -> str:
    """The seeds' 001 process_func prompt, spelled out independently of templates.py."""
    return "\n".join(["Human: " + row["instruction"], row["input"]]).strip() + "\n\nAssistant: " + row["output"]


def _reference(rows, tokenizer, max_length):
    """Per-example transcription of the seeds' process_func, to compare the batched version against."""
    out = {"input_ids": [], "attention_mask": [], "labels": []}
    for row in rows:
        prompt = "\n".join(["Human: " + row["instruction"], row["input"]]).strip() + "\n\nAssistant: "
        instruction = tokenizer(prompt, add_special_tokens=False)
        response = tokenizer(row["output"], add_special_tokens=False)
        ids = instruction["input_ids"] + response["input_ids"] + [tokenizer.eos_token_id]
        mask = instruction["attention_mask"] + response["attention_mask"] + [1]
        labels = [-100] * len(instruction["input_ids"]) + response["input_ids"] + [tokenizer.eos_token_id]
        if all(x == -100 for x in labels[:max_length]):
            continue  # nothing left to learn: dropped
        out["input_ids"].append(ids[:max_length])
        out["attention_mask"].append(mask[:max_length])
        out["labels"].append(labels[:max_length])
    return out


def _rows():
    return tasks.alpaca_rows(40, 7) + EDGE_ROWS


# --- tokenize_rows -------------------------------------------------------------------------------------


def test_decoded_text_matches_seed_prompt(tokenizer):
    rows = _rows()
    cols, _ = tokenize_rows(rows, tokenizer, TEMPLATE, max_length=10_000)
    for row, ids in zip(rows, cols["input_ids"]):
        assert tokenizer.decode(ids[:-1]) == _expected_text(row)
    no_input = cols["input_ids"][len(rows) - len(EDGE_ROWS) + 1]
    assert tokenizer.decode(no_input[:-1]) == "Human: Say hello.\n\nAssistant: hello"


def test_eos_is_last_id_label_and_attended(tokenizer):
    cols, outcome = tokenize_rows(_rows(), tokenizer, TEMPLATE, max_length=10_000)
    eos = tokenizer.eos_token_id
    assert outcome["kept"] == list(range(len(_rows()))) and outcome["truncated"] == outcome["too_long"] == []
    for ids, mask, labels in zip(cols["input_ids"], cols["attention_mask"], cols["labels"]):
        assert ids[-1] == eos and labels[-1] == eos and mask[-1] == 1
        assert len(ids) == len(mask) == len(labels) and set(mask) == {1}
        assert eos not in ids[:-1]  # eos appended as an id, never produced from text


def test_prompt_masked_and_response_labelled(tokenizer):
    rows = _rows()
    cols, _ = tokenize_rows(rows, tokenizer, TEMPLATE, max_length=10_000)
    for row, ids, labels in zip(rows, cols["input_ids"], cols["labels"]):
        n_prompt = labels.index(next(x for x in labels if x != -100))
        assert all(x == -100 for x in labels[:n_prompt]) and n_prompt > 0
        assert labels[n_prompt:] == ids[n_prompt:]
        assert tokenizer.decode(ids[:n_prompt]) == _expected_text(row).removesuffix(row["output"])
        assert tokenizer.decode(ids[n_prompt:-1]) == row["output"]


def test_truncation_cuts_from_end_and_counts_eos_losses(tokenizer):
    rows = _rows()
    full, _ = tokenize_rows(rows, tokenizer, TEMPLATE, max_length=10_000)
    max_length = 20
    cols, outcome = tokenize_rows(rows, tokenizer, TEMPLATE, max_length=max_length)
    long = [i for i, ids in enumerate(full["input_ids"]) if len(ids) > max_length]
    assert long, "the test rows must include some longer than max_length"
    empty = [i for i in long if all(x == -100 for x in full["labels"][i][:max_length])]
    assert empty  # the long-input edge row's prompt alone fills max_length: dropped, nothing to learn
    assert outcome["too_long"] == empty
    assert outcome["truncated"] == outcome["eos_truncated"] == [i for i in long if i not in empty]
    assert outcome["kept"] == [i for i in range(len(rows)) if i not in empty]
    for k, (ids, labels) in zip(outcome["kept"], zip(cols["input_ids"], cols["labels"])):
        assert len(ids) <= max_length
        assert ids == full["input_ids"][k][:max_length] and labels == full["labels"][k][:max_length]
        assert (ids[-1] == tokenizer.eos_token_id) == (k not in long)


@pytest.mark.parametrize("max_length", [10_000, 24, 9])
def test_batched_equals_per_example_reference(tokenizer, max_length):
    rows = _rows()
    cols, _ = tokenize_rows(rows, tokenizer, TEMPLATE, max_length=max_length)
    reply_start = cols.pop("reply_start")
    assert cols == _reference(rows, tokenizer, max_length)
    # single-turn rows: the final reply starts at the first labelled token (all -100: cut before it)
    assert reply_start == [next((i for i, x in enumerate(labels) if x != -100), len(labels))
                           for labels in cols["labels"]]


def test_empty_rows(tokenizer):
    cols, outcome = tokenize_rows([], tokenizer, TEMPLATE, 96)
    assert cols == {"input_ids": [], "attention_mask": [], "labels": [], "reply_start": []} and outcome["kept"] == []


def test_prepare_tokenizer_pad(tmp_path, tokenizer):
    from transformers import AutoTokenizer

    no_pad = AutoTokenizer.from_pretrained(_train_tokenizer(tmp_path / "nopad", pad=False))
    assert no_pad.pad_token is None
    prepare_tokenizer(no_pad, TEMPLATE)
    assert no_pad.pad_token == "</s>" and no_pad.pad_token_id == no_pad.eos_token_id
    assert no_pad.padding_side == "right"
    tokenizer.padding_side = "left"
    prepare_tokenizer(tokenizer, TEMPLATE)  # has its own pad: kept
    assert tokenizer.pad_token == "<pad>" and tokenizer.padding_side == "right"


# --- split -----------------------------------------------------------------------------------------------


def test_split_is_deterministic_per_seed():
    rows = [{"instruction": f"q{i}", "input": "", "output": str(i)} for i in range(50)]
    train, evals = split_rows(rows, 10, seed=1)
    assert (train, evals) == split_rows(rows, 10, seed=1)
    assert evals != split_rows(rows, 10, seed=2)[1]
    assert len(evals) == 10 and len(train) == 40
    assert sorted(r["output"] for r in train + evals) == sorted(r["output"] for r in rows)


def test_split_needs_train_rows():
    rows = [{"instruction": "q", "input": "", "output": "a"}] * 5
    with pytest.raises(cli.StepError, match="eval_size is 5 but there are only 5 rows"):
        split_rows(rows, 5, seed=0)


def test_preprocess_split_deterministic(tmp_path, params, bpe_tokenizer_dir):
    from datasets import load_from_disk

    def eval_ids(p, name):
        preprocess(p, "tiny", bpe_tokenizer_dir, tmp_path / name)
        return load_from_disk(str(tmp_path / name / "eval"))["input_ids"]

    a, b = eval_ids(params, "a"), eval_ids(params, "b")
    c = eval_ids(params.model_copy(update={"seed": params.seed + 1}), "c")
    assert a == b and a != c


# --- input formats --------------------------------------------------------------------------------------


def _write_formats(tmp_path: Path, records: list[dict]) -> dict[str, Path]:
    import csv

    import pyarrow as pa
    import pyarrow.parquet as pq
    from datasets import Dataset, DatasetDict

    paths = {k: tmp_path / f"rows.{k}" for k in ("json", "jsonl", "parquet", "csv")}
    paths["json"].write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records) + "\n",
                              encoding="utf-8")
    pq.write_table(pa.Table.from_pylist(records), paths["parquet"])
    with paths["csv"].open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sorted({k for r in records for k in r}))
        writer.writeheader()
        writer.writerows(records)
    paths["dataset"] = tmp_path / "ds"
    Dataset.from_list(records).save_to_disk(str(paths["dataset"]))
    paths["datasetdict"] = tmp_path / "dsd"
    DatasetDict({"train": Dataset.from_list(records), "test": Dataset.from_list(records[:2])}).save_to_disk(
        str(paths["datasetdict"]))
    return paths


def _clean(row: dict) -> dict:
    return {"instruction": row["instruction"], "input": row.get("input") or "", "output": row["output"],
            "system": "", "history": []}


def test_every_format_loads_the_same_rows(tmp_path, params):
    rows = tasks.alpaca_rows(12, 3)
    records = [dict(r) for r in rows]
    records[4] = {"instruction": records[4]["instruction"], "output": records[4]["output"], "extra": 1}
    records[5]["output"] = "line\u2028separator\r\nand crlf"  # raw in JSONL: must not split the line
    expected = [_clean(r) for r in records]
    for kind, path in _write_formats(tmp_path, records).items():
        got, bad, read = load_rows(_with_data(params, source=str(path)))
        assert [r for _, r in got] == expected and bad.count == 0 and read == 12, kind


def test_column_mapping(tmp_path, params):
    records = [{"q": "Say hi.", "ctx": "", "a": "hi", "sys": "Be brief.", "turns": [["Hello", "Hi!"]]}] * 3
    path = _write(tmp_path / "mapped.json", json.dumps(records))
    columns = {"instruction": "q", "input": "ctx", "output": "a", "system": "sys", "history": "turns"}
    got, bad, _ = load_rows(_with_data(params, source=str(path), columns=Columns(**columns)))
    assert [r for _, r in got] == [{"instruction": "Say hi.", "input": "", "output": "hi", "system": "Be brief.",
                                    "history": [["Hello", "Hi!"]]}] * 3
    with pytest.raises(cli.StepError, match="no usable rows, all 3 dropped .*instruction_missing: 3.*data.columns"):
        load_rows(_with_data(params, source=str(path)))  # default names: no `instruction` column


def test_builtin_rows(params):
    train, evals = tasks.builtin_split(120, 20, params.seed)
    got, bad, read = load_rows(params)
    assert [r for _, r in got] == [_clean(r) for r in train + evals] and read == 120 and len(evals) == 20


@pytest.mark.parametrize("seed", [0, 42, 1234])
def test_builtin_eval_rows_ask_for_facts_no_train_row_shows(seed):
    """Distinct rows; no eval row's answer (word, number, character) is the answer or input of a train row of
    its kind, so the eval measures generalisation, not recall of training rows."""
    train, evals = tasks.builtin_split(640, 96, seed)
    as_text = lambda rows: [json.dumps(r, sort_keys=True) for r in rows]  # noqa: E731
    assert len(set(as_text(train + evals))) == 640 and len(evals) == 96
    assert len({r["instruction"] for r in evals}) == len(tasks.TASKS)  # every task is asked
    number_answers = {r["output"] for r in train if r["output"].isdigit() and r["instruction"] != "How many "
                      "letters does the word have?"}
    words = {r["input"] for r in train if r["input"].isalpha() and r["input"].isascii()}
    for r in evals:
        if r["instruction"] == "How many letters does the word have?" or r["input"].isalpha() and r["input"].isascii():
            assert r["input"] not in words, r  # a held-out word: no train row reverses, spells or counts it
        elif r["output"].isdigit():
            assert r["output"] not in number_answers, r  # a held-out number: no train answer is it
    with pytest.raises(ParamsError, match="data.builtin_rows: builtin:tasks has .* distinct rows"):
        tasks.builtin_split(5000, 96, seed)
    with pytest.raises(ParamsError, match="data.eval_size: builtin:tasks holds out"):
        tasks.builtin_split(640, 600, seed)


def test_duplicates_are_dropped_before_the_split_and_overlap_is_reported(tmp_path, bpe_tokenizer_dir, params):
    """A user file with repeats: every conversation is kept once (so none is both trained and scored), and
    eval rows that ask a train row's prompt with another answer are counted and warned about."""
    rows = [{"instruction": f"Name {i}.", "output": f"n{i}"} for i in range(30)]
    rows += [rows[3], rows[3], rows[7]]  # exact repeats: dropped
    rows += [{"instruction": f"Name {i}.", "output": f"other {i}"} for i in range(30)]  # same prompts, new answers
    path = tmp_path / "dupes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = preprocess(_with_data(params, source=str(path), eval_size=20), "tiny", bpe_tokenizer_dir,
                        tmp_path / "out")
    assert report["duplicates_dropped"] == {"count": 3, "first_rows": [31, 32, 33]}
    assert report["rows_kept"] == 60 and report["overlap"]["conversations"] == 0
    assert report["overlap"]["prompts"] > 0  # 20 of 60 rows in eval: some prompts are in both splits
    assert any(f"{report['overlap']['prompts']} of 20 eval rows ask a prompt" in w for w in report["warnings"])
    assert any("3 duplicate rows dropped" in w for w in report["warnings"])


def test_builtin_data_has_no_duplicates_and_no_overlap(tmp_path, bpe_tokenizer_dir, params):
    report = preprocess(params, "tiny", bpe_tokenizer_dir, tmp_path / "out")
    assert report["duplicates_dropped"]["count"] == 0
    assert report["overlap"] == {"conversations": 0, "prompts": 0, "first_rows": []} and not report["warnings"]


def _bad_sources(tmp_path: Path) -> list[tuple[str, Path, str]]:
    """Sources that fail as a whole (no row-level judgement possible)."""
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"instruction": "caf\u00e9", "output": "x"}'.encode("latin-1"))
    not_json = tmp_path / "prose.json"
    not_json.write_text("instruction: hi\n")
    return [
        ("missing", tmp_path / "nope.json", "data file not found"),
        ("empty", empty, "file is empty"),
        ("not json", not_json, "not valid JSON (line 1)"),
        ("not utf-8", latin1, "not UTF-8 text"),
        ("empty array", _write(tmp_path / "none.json", "[]"), "no rows"),
        ("all rows bad", _write(tmp_path / "allbad.jsonl", "{x\n[1]\n"), "no usable rows, all 2 dropped"),
        ("not a dataset dir", _mkdir(tmp_path / "somedir"), "not a `datasets` save_to_disk"),
        ("unknown suffix", _write(tmp_path / "rows.txt", "hi"), "unsupported data format '.txt'"),
    ]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _mkdir(path: Path) -> Path:
    path.mkdir()
    (path / "x.txt").write_text("x")
    return path


def test_bad_inputs_give_one_line_errors(tmp_path, params):
    for name, path, message in _bad_sources(tmp_path):
        with pytest.raises(cli.StepError) as info:
            load_rows(_with_data(params, source=str(path)))
        text = str(info.value)
        assert message in text and str(path) in text and "\n" not in text, name


def test_failed_cli_run_leaves_no_output(tmp_path, capsys, bpe_tokenizer_dir):
    for name, path, message in _bad_sources(tmp_path):
        out = tmp_path / "out" / "tiny"
        params_file = params_with(tmp_path, data={"source": str(path), "eval_size": 1})
        argv = ["--params", str(params_file), "--model", "tiny", "--model-dir", str(bpe_tokenizer_dir),
                "--out", str(out)]
        assert cli.run(main, argv) == 1, name
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], name
        assert not out.exists() and not list(out.parent.glob(".tiny.tmp-*")), name


def test_failure_while_writing_leaves_no_output(tmp_path, params):
    no_eos = _train_tokenizer(tmp_path / "noeos", eos=False)
    out = tmp_path / "data" / "tiny"
    with pytest.raises(ValueError, match="has no eos token, which template 'human_assistant' needs"):
        preprocess(params, "tiny", no_eos, out)
    assert not out.exists() and (not out.parent.exists() or os.listdir(out.parent) == [])


def test_missing_model_dir(tmp_path, params):
    with pytest.raises(cli.StepError, match="run the download step"):
        preprocess(params, "tiny", tmp_path / "absent", tmp_path / "out")


# --- end to end -----------------------------------------------------------------------------------------


def test_report(tmp_path, params, bpe_tokenizer_dir):
    report_path = tmp_path / "metrics" / "data" / "tiny.json"
    report = preprocess(_with_data(params, max_length=40), "tiny", bpe_tokenizer_dir, tmp_path / "out", report_path)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report == json.loads(report_path.read_text())
    dropped = report["dropped"]["too_long"]  # prompts of 41+ tokens: nothing of the reply would be left
    assert report["rows_read"] == 120 and report["rows_dropped"] == dropped["count"] > 0
    assert report["rows_kept"] == report["train_rows"] + report["eval_rows"] == 120 - dropped["count"]
    assert len(dropped["first_rows"]) == min(5, dropped["count"]) and all(1 <= n <= 120 for n in dropped["first_rows"])
    assert report["template"] == "human_assistant" and report["max_length"] == 40
    assert report["examples_truncated"] == report["examples_eos_truncated"] > 0
    assert len(report["truncated_first_rows"]) == 5 and "lost their stop token" in report["warnings"][0]
    assert "bad rows dropped (too_long:" in report["warnings"][1]
    for split in ("train", "eval"):
        s = report["token_length"][split]
        assert s["min"] <= s["p50"] <= s["p95"] <= s["max"] <= 40 and s["min"] <= s["mean"] <= s["max"]


def test_cli_end_to_end(tmp_path, bpe_tokenizer_dir):
    from datasets import load_from_disk

    params_file = params_with(tmp_path, data={"source": "builtin:tasks", "builtin_rows": 60, "eval_size": 8,
                                             "max_length": 96})
    out = tmp_path / "results" / "data" / "tiny"
    cmd = [sys.executable, "-m", "workflow.preprocess", "--params", str(params_file), "--model", "tiny",
           "--model-dir", str(bpe_tokenizer_dir), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in out.iterdir()) == ["eval", "raw.jsonl", "report.json", "train"]
    train, evals = load_from_disk(str(out / "train")), load_from_disk(str(out / "eval"))
    assert (len(train), len(evals)) == (52, 8)
    assert train.column_names == ["input_ids", "attention_mask", "labels", "reply_start"]
    raw = [json.loads(line) for line in (out / "raw.jsonl").read_text(encoding="utf-8").splitlines()]
    train_rows, eval_rows = tasks.builtin_split(60, 8, 42)
    assert raw == [{**r, "split": "train"} for r in train_rows] + [{**r, "split": "eval"} for r in eval_rows]
    report = json.loads((out / "report.json").read_text())
    assert report["train_rows"] == 52 and report["examples_eos_truncated"] == 0


def test_builtin_model_tokenizer(builtin_model_dir, tmp_path, params):
    """On the builtin tiny model's own tokenizer."""
    model_dir = builtin_model_dir
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    report = preprocess(params, "tiny", model_dir, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(model_dir)
    train = load_from_disk(str(tmp_path / "out" / "train"))
    assert report["train_rows"] == len(train) == 100
    for ex in train.select(range(10)):
        assert ex["input_ids"][-1] == ex["labels"][-1] == tok.eos_token_id
        assert tok.decode(ex["input_ids"][:-1]).startswith("Human: ")
