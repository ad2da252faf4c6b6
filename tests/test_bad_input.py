"""The README's bad-input table, row by row: the one-line message and what is left on disk.

Rows covered elsewhere: model path missing / without weights / without tokenizer and an unreachable hub
(tests/test_download.py), a failing merge check (tests/test_merge_evaluate.py), Ctrl-C (tests/test_resume.py).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import params_with
from workflow import cli, merge, train

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())


def finished_looking(root: Path) -> list[str]:
    """Every file or dir under `root` but the params file and the test's own inputs."""
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if p.name != "params.yaml" and not p.relative_to(root).as_posix().startswith("inputs"))


def one_line(capsys) -> str:
    """The step's error: the last stderr line, the only one that says `error:`, and no traceback."""
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and sum(line.startswith("error:") for line in err.splitlines()) == 1, err
    return err.splitlines()[-1]


def train_argv(params: Path, model_dir: Path, data_dir: Path, precision: str = "bf16") -> list[str]:
    return ["--params", str(params), "--model", "tiny", "--precision", precision, "--strategy", "single",
            "--model-dir", str(model_dir), "--data", str(data_dir), "--out", "results/adapters/x",
            "--metrics", "results/metrics/train/x.json", "--curve", "results/plots/loss/x.csv",
            "--timing", "results/metrics/timing/x.json", "--live", "results/live/x"]


# --- params.yaml ---------------------------------------------------------------------------------------------


def edited(**changes) -> dict:
    raw = copy.deepcopy(DEFAULT)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = raw
        for p in parents:
            node = node[p]
        node[leaf] = value
    return raw


@pytest.mark.parametrize("raw, expected", [
    (edited(train__learning_rate="fast"), "train.learning_rate: Input should be a valid number"),
    (edited(lora__rank=8), "lora.rank: unknown key; remove it or check its spelling"),
    (edited(models__tiny__template="alpaca_v9"), "models.tiny.template: unknown template 'alpaca_v9'; choose"),
    (edited(matrix__precision=["fp8"]), "matrix.precision.0: Input should be 'fp16', 'bf16', 'int8' or 'nf4'"),
    (edited(matrix__strategy=["zero4"]), "matrix.strategy.0: Input should be 'single', 'zero2' or 'zero3'"),
    (edited(matrix_zero__precision=["int8"]), "tiny-int8-zero3: bitsandbytes LLM.int8 weights cannot be partitioned"),
    (edited(matrix__model=["llama"]), "matrix.model: 'llama' is not a key of `models` (tiny)"),
    (edited(models__tiny__source="builtin:big-llama"), "models.tiny.source: no `builtin.big-llama` section"),
])
def test_bad_params_fail_every_step_with_the_key_named(raw, expected, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    rc = cli.run(train.main, train_argv(path, tmp_path / "m", tmp_path / "d"))
    err = one_line(capsys)
    assert rc == 1 and err.startswith(f"error: {path}: ") and expected in err, err
    assert finished_looking(tmp_path) == []


# --- data files (preprocess, through its command line) -------------------------------------------------------


@pytest.mark.parametrize("name, content, expected", [
    ("absent.json", None, "inputs/absent.json: data file not found; fix data.source in params.yaml"),
    ("empty.json", "", "inputs/empty.json: file is empty; point data.source at a file with rows"),
    ("broken.json", "[{\"instruction\": ", "inputs/broken.json: not valid JSON (line 1); fix it or use"),
    ("rows.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n',
     "inputs/rows.jsonl: line 2: `output` is missing or empty; fill it in or remove the row"),
    ("rows.json", '[{"input": "x", "output": "y"}]',
     "inputs/rows.json: row 1: `instruction` is missing or empty; fill it in or remove the row"),
])
def test_bad_data_file(name, content, expected, builtin_model_dir, tmp_path):
    (tmp_path / "inputs").mkdir()
    if content is not None:
        (tmp_path / "inputs" / name).write_text(content)
    # strict: a bad row fails the step (by default it is dropped and counted in the data report: test_data.py)
    params = params_with(tmp_path, data={"source": f"inputs/{name}", "strict": True})
    proc = subprocess.run([sys.executable, "-m", "workflow.preprocess", "--params", str(params), "--model", "tiny",
                           "--model-dir", str(builtin_model_dir), "--out", "results/data/tiny"], cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and err.splitlines()[-1].startswith(f"error: {expected}"), err
    assert "Traceback" not in err
    assert finished_looking(tmp_path) == []


# --- adapters at merge time ----------------------------------------------------------------------------------


def corrupt(adapter: Path, how: str) -> None:
    adapter.mkdir(parents=True)
    if how == "empty":
        return
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}' if how != "bad config" else "{")
    weights = b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"" if how == "truncated" else b""
    (adapter / "adapter_model.safetensors").write_bytes(weights)


@pytest.mark.parametrize("how, expected", [
    ("empty", "results/adapters/x: missing adapter_config.json; rerun the train step for this variant"),
    ("bad config", "results/adapters/x/adapter_config.json: not valid JSON; the adapter is corrupt; delete it and "
                   "rerun the train step for this variant"),
    ("truncated", "results/adapters/x/adapter_model.safetensors: unreadable (SafetensorError); the adapter is "
                  "corrupt; delete it and rerun the train step for this variant"),
    ("zero bytes", "results/adapters/x/adapter_model.safetensors: unreadable (SafetensorError); the adapter is "
                   "corrupt"),
])
def test_bad_adapter_at_merge_time(how, expected, builtin_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    corrupt(tmp_path / "results/adapters/x", how)
    before = finished_looking(tmp_path)
    rc = cli.run(merge.main, ["--params", str(ROOT / "params.yaml"), "--model", "tiny", "--precision", "bf16",
                              "--strategy", "single", "--model-dir", str(builtin_model_dir), "--adapter",
                              "results/adapters/x", "--data", str(tiny_data_dir), "--out", "results/merged/x",
                              "--metrics", "results/metrics/merge/x.json"])
    err = one_line(capsys)
    assert rc == 1 and err.startswith(f"error: {expected}"), err
    assert finished_looking(tmp_path) == before  # no merged model, no metrics, no temporary dirs


# --- out of memory / disk ------------------------------------------------------------------------------------


def test_out_of_memory_names_the_variant_and_hints(builtin_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    """A LoRA rank no machine can hold: the real allocation fails inside the train step."""
    monkeypatch.chdir(tmp_path)
    params = params_with(tmp_path, lora={"r": 10**10})
    rc = cli.run(train.main, train_argv(params, builtin_model_dir, tiny_data_dir, "fp16"))
    err = one_line(capsys)
    assert rc == 1 and err.startswith("error: tiny-fp16-single: out of memory (RuntimeError); "), err
    assert "per_device_train_batch_size" in err and "gradient_checkpointing: true" in err
    assert not (tmp_path / "results/adapters").exists() and not (tmp_path / "results/metrics").exists()


def test_full_disk_names_the_variant_and_hints(builtin_model_dir, tiny_data_dir, tmp_path, monkeypatch, capsys):
    """The loss curve's temporary file sits on /dev/full: writing it fails with a real ENOSPC."""
    monkeypatch.chdir(tmp_path)
    params = params_with(tmp_path, train={"max_steps": 2, "save_steps": 1000})
    curve_tmp = tmp_path / f"results/plots/loss/.x.csv.tmp-{os.getpid()}"
    curve_tmp.parent.mkdir(parents=True)
    curve_tmp.symlink_to("/dev/full")
    rc = cli.run(train.main, train_argv(params, builtin_model_dir, tiny_data_dir))
    err = one_line(capsys)
    assert rc == 1 and err.startswith("error: tiny-bf16-single: no space left on the device"), err
    assert "free disk space" in err and "resumes from its last checkpoint" in err
    assert not (tmp_path / "results/metrics").exists()  # the metrics, written last, mark a finished step
    assert sorted(p.name for p in (tmp_path / "results/plots/loss").iterdir()) == []  # no curve, no temp file


# --- bugs are not bad input ----------------------------------------------------------------------------------


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(tmp_path, capsys):
    """A ValueError from deep inside a library (here: json on a truncated file, read without the project's
    reader) is a bug: it used to become one `error:` line with no traceback anywhere."""
    import json

    (tmp_path / "state.json").write_text('{"step": ')

    def step(argv):
        return json.loads((tmp_path / "state.json").read_text())

    assert cli.run(step, []) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):" and any("json.loads" in line for line in err), err
    assert sum(line.startswith("error:") for line in err) == 1
    assert err[-1].startswith("error: this step: a bug, not bad input: json.decoder.JSONDecodeError: Expecting "
                              "value") and err[-1].endswith("(traceback above); please report it"), err[-1]


def test_the_projects_own_readers_give_one_line_errors(tmp_path, capsys):
    """The same file through workflow.io.read_json, as the steps read it: bad input, one line."""
    from workflow.io import read_json

    (tmp_path / "state.json").write_text('{"step": ')
    assert cli.run(lambda argv: read_json(tmp_path / "state.json"), []) == 1
    assert one_line(capsys) == f"error: {tmp_path / 'state.json'}: not valid JSON (line 1); delete it and rerun its step"
    assert cli.run(lambda argv: read_json(tmp_path / "absent.json"), []) == 1
    assert one_line(capsys) == f"error: {tmp_path / 'absent.json'}: not found; run the step that produces it first"
