"""The download step: builtin end to end, local dirs, and failing fast without a hub."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
from pathlib import Path

import pytest
import yaml

from workflow import cli, download
from workflow.download import download_model, main, sha256_file

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def params_file(tmp_path):
    """params.yaml with a shrunk builtin model, a tmp cache and a few extra model entries."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["builtin"]["tiny-llama"].update(corpus_size=300, pretrain_steps=5, pretrain_batch_size=4, pretrain_seq_len=32)
    raw["download"].update(cache_dir=str(tmp_path / "cache"), offline=True, timeout_s=2)
    raw["models"].update(
        ms={"source": "modelscope:no-owner/no-model", "revision": "v1.0.0"},
        hfm={"source": "hf:no-owner/no-model", "revision": "main"},
    )

    def write(**models) -> Path:
        raw["models"].update(models)
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(raw))
        return path

    return write


@pytest.fixture
def no_network(monkeypatch):
    """Record (and refuse) every connection or DNS lookup."""
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return calls


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli.run(main, argv)
    return rc, capsys.readouterr().err.strip()


def test_cli_builtin_end_to_end(params_file, tmp_path):
    out = tmp_path / "models" / "tiny"
    proc = subprocess.run([sys.executable, "-m", "workflow.download", "--params", str(params_file()),
                           "--model", "tiny", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "pretrain.json", "source.json"} <= names
    info = json.loads((out / "source.json").read_text())
    assert info["source"] == "builtin:tiny-llama" and info["model"] == "tiny"
    assert set(info["sha256"]) == names - {"source.json"}
    assert all(sha256_file(out / f) == h for f, h in info["sha256"].items())
    assert [p.name for p in out.parent.iterdir()] == ["tiny"]  # no temporary dir left behind


def test_local_dir_links_and_hashes(builtin_model_dir, params_file, tmp_path):
    from transformers import AutoConfig, AutoTokenizer

    params = cli.load_params(params_file(local={"source": str(builtin_model_dir)}))
    out = tmp_path / "local"
    info = download_model(params, "local", out)
    files = sorted(p.name for p in out.iterdir() if p.name != "source.json")
    assert files == sorted(info["sha256"])
    for name in files:
        assert (out / name).is_symlink() and (out / name).resolve() == (builtin_model_dir / name).resolve()
        assert info["sha256"][name] == sha256_file(builtin_model_dir / name)
    assert info["resolved_path"] == str(builtin_model_dir.absolute())  # outside the project: absolute
    assert AutoConfig.from_pretrained(out).vocab_size % 64 == 0
    assert AutoTokenizer.from_pretrained(out).eos_token == "</s>"


def test_source_json_records_a_path_inside_the_project_relative_to_it(monkeypatch, tmp_path):
    """The builtin model is built in its output dir: source.json names it relative to the project, so the model
    dir hashes the same in every clone (dvc.lock; `dvc pull` into a fresh clone reruns nothing after it)."""
    from workflow.download import project_relative

    monkeypatch.chdir(tmp_path)
    assert project_relative(Path("results/models/tiny")) == "results/models/tiny"
    assert project_relative(tmp_path / "results/models/tiny") == "results/models/tiny"
    assert project_relative(tmp_path.parent / "elsewhere") == str(tmp_path.parent / "elsewhere")


@pytest.mark.parametrize("layout,expect", [
    ({}, "is not a directory"),
    ({"config.json": "{}"}, "no *.safetensors weights (no weights)"),
    ({"config.json": "{}", "pytorch_model.bin": ""}, "found only pytorch_model.bin"),
    ({"config.json": "{}", "model.safetensors": ""}, "no tokenizer files"),
])
def test_bad_local_dir_one_line_error(params_file, tmp_path, capsys, layout, expect):
    bad = tmp_path / "bad"
    if layout:
        bad.mkdir()
        for name, text in layout.items():
            (bad / name).write_text(text)
    out = tmp_path / "out"
    rc, err = run_cli(["--params", str(params_file(bad={"source": str(bad)})), "--model", "bad",
                       "--out", str(out)], capsys)
    assert rc == 1 and len(err.splitlines()) == 1
    assert str(bad) in err and "models.bad" in err and expect in err
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.mark.parametrize("key,source", [("ms", "modelscope:no-owner/no-model"), ("hfm", "hf:no-owner/no-model")])
def test_offline_empty_cache_fails_fast(params_file, tmp_path, capsys, no_network, key, source):
    start = time.perf_counter()
    rc, err = run_cli(["--params", str(params_file()), "--model", key, "--out", str(tmp_path / "o")], capsys)
    assert time.perf_counter() - start < 5
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"models.{key}" in err and source in err and "download.offline is true" in err
    assert no_network == [] and not (tmp_path / "o").exists()


@pytest.mark.parametrize("key", ["ms", "hfm"])
def test_online_unreachable_hub_fails_fast(params_file, tmp_path, capsys, no_network, monkeypatch, key):
    raw = yaml.safe_load(params_file().read_text())
    raw["download"]["offline"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))

    def unreachable(url, timeout):
        raise urllib.error.URLError("simulated: no route to host")

    monkeypatch.setattr(download.urllib.request, "urlopen", unreachable)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    start = time.perf_counter()
    rc, err = run_cli(["--params", str(tmp_path / "params.yaml"), "--model", key, "--out", str(tmp_path / "o")],
                      capsys)
    assert time.perf_counter() - start < 5
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"models.{key}" in err and "hub is unreachable" in err and "download.offline" in err
    assert no_network == []
    assert os.environ.get("HF_HUB_OFFLINE") is None  # the cache probe's offline switch was undone


def test_online_download_error_is_one_line(params_file, tmp_path, monkeypatch):
    params = cli.load_params(params_file())
    params = params.model_copy(update={"download": params.download.model_copy(update={"offline": False})})
    monkeypatch.setattr(download, "reachable", lambda kind, timeout_s: True)

    def hub(repo_id, **kwargs):
        if kwargs["local_files_only"]:
            raise FileNotFoundError("not cached")
        raise ConnectionError("simulated reset\nsecond line")

    monkeypatch.setattr("modelscope.snapshot_download", hub)
    with pytest.raises(cli.StepError, match=r"models\.ms .*download failed \(ConnectionError: simulated reset\)"):
        download_model(params, "ms", tmp_path / "o")
