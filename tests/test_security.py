"""The security switches, each tested both ways: remote code, pickle weights, pinned revisions, upstream
hashes, and hub tokens that never reach logs or files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import params_with
from workflow import cli
from workflow.download import download_model, main
from workflow.params import ParamsError, load_params

ROOT = Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SECRET = "hf_do_not_print_me_31337"


def write_params(tmp_path: Path, **models) -> Path:
    """params.yaml with these `models` added and the hubs offline, failing fast."""
    return params_with(tmp_path, download={"cache_dir": str(tmp_path / "cache"), "offline": True, "timeout_s": 2},
                       models=models)


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=False, ignore=shutil.ignore_patterns("source.json"))
    return dst


def run_cli(argv, capsys) -> tuple[int, str]:
    rc = cli.run(main, argv)
    return rc, capsys.readouterr().err.strip()


# --- trust_remote_code ---------------------------------------------------------------------------------------


@pytest.fixture
def coded_model(builtin_model_dir, tmp_path) -> tuple[Path, Path]:
    """The builtin model plus a config class in a .py file that leaves a mark when imported."""
    model = copy_model(builtin_model_dir, tmp_path / "coded")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_marked.MarkedConfig"}
    (model / "config.json").write_text(json.dumps(config))
    mark = tmp_path / "imported.txt"
    (model / "configuration_marked.py").write_text(
        "import os, pathlib\n"
        "pathlib.Path(os.environ['LOWPREC_TEST_MARK']).write_text('imported')\n"
        "from transformers import LlamaConfig\n\n\n"
        "class MarkedConfig(LlamaConfig):\n"
        "    model_type = 'llama'\n"
    )
    return model, mark


def test_model_with_code_is_refused_without_trust_and_nothing_is_imported(coded_model, tmp_path, capsys,
                                                                           monkeypatch):
    model, mark = coded_model
    monkeypatch.setenv("LOWPREC_TEST_MARK", str(mark))
    out = tmp_path / "out"
    rc, err = run_cli(["--params", str(write_params(tmp_path, coded={"source": str(model)})), "--model", "coded",
                       "--out", str(out)], capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "models.coded.source" in err and "ships its own Python code (configuration_marked.MarkedConfig)" in err
    assert "trust_remote_code: true" in err
    assert not mark.exists() and not out.exists()


def test_model_with_code_loads_its_code_when_trusted(coded_model, tmp_path):
    model, mark = coded_model
    params = write_params(tmp_path, coded={"source": str(model), "trust_remote_code": True})
    out = tmp_path / "out"
    env = {**os.environ, "LOWPREC_TEST_MARK": str(mark), "HF_MODULES_CACHE": str(tmp_path / "modules"),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "workflow.download", "--params", str(params), "--model", "coded",
                           "--out", str(out)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert not mark.exists()  # downloading never imports the model's code
    assert json.loads((out / "source.json").read_text())["trust_remote_code"] is True
    load = f"from workflow.modeling import load_tokenizer; load_tokenizer({str(out)!r}, True)"
    proc = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert mark.read_text() == "imported"  # the steps pass the opt-in through to transformers


# --- pickle weights ------------------------------------------------------------------------------------------


@pytest.fixture
def pickled_model(builtin_model_dir, tmp_path) -> Path:
    """The builtin model with its weights re-saved as pytorch_model.bin (a pickle)."""
    model = copy_model(builtin_model_dir, tmp_path / "pickled")
    torch.save(load_file(model / "model.safetensors"), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()
    return model


def test_pickle_weights_are_refused_by_default(pickled_model, tmp_path, capsys):
    out = tmp_path / "out"
    rc, err = run_cli(["--params", str(write_params(tmp_path, pk={"source": str(pickled_model)})), "--model", "pk",
                       "--out", str(out)], capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "models.pk.source" in err and "found only pytorch_model.bin, pickle weights" in err
    assert "allow_pickle: true" in err and not out.exists()


def test_pickle_weights_load_when_allowed(pickled_model, builtin_model_dir, tmp_path):
    from workflow.modeling import load_base
    from workflow.precision import resolve_precision

    params = load_params(write_params(tmp_path, pk={"source": str(pickled_model), "allow_pickle": True}))
    out = tmp_path / "out"
    info = download_model(params, "pk", out)
    assert "pytorch_model.bin" in info["sha256"] and info["allow_pickle"] is True
    plan = resolve_precision("bf16", "cpu")
    loaded, reference = load_base(out, plan).state_dict(), load_base(builtin_model_dir, plan).state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in loaded)


def test_pickle_files_beside_safetensors_are_not_linked_unless_allowed(builtin_model_dir, tmp_path):
    model = copy_model(builtin_model_dir, tmp_path / "both")
    (model / "pytorch_model.bin").write_bytes(b"not loaded")
    for allow in (False, True):
        params = load_params(write_params(tmp_path, both={"source": str(model), "allow_pickle": allow}))
        info = download_model(params, "both", tmp_path / f"out-{allow}")
        assert ("pytorch_model.bin" in info["sha256"]) is allow
        assert (tmp_path / f"out-{allow}" / "pytorch_model.bin").exists() is allow
        assert "model.safetensors" in info["sha256"]


# --- pinned revisions ----------------------------------------------------------------------------------------


def test_remote_model_needs_a_pinned_revision_unless_opted_out(tmp_path):
    with pytest.raises(ParamsError, match=r"models\.hfm: remote source needs a pinned `revision`"):
        load_params(write_params(tmp_path, hfm={"source": "hf:owner/model"}))
    params = load_params(write_params(tmp_path, hfm={"source": "hf:owner/model", "allow_unpinned": True}))
    assert params.models["hfm"].revision is None


# --- recorded hashes of remote models ------------------------------------------------------------------------


def fill_hf_cache(cache: Path, files_from: Path, ref: str, commit: str = COMMIT) -> Path:
    """Put a model into a huggingface_hub cache as if downloaded at revision `ref`; returns the snapshot."""
    repo = cache / "models--owner--model"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(files_from, snapshot, ignore=shutil.ignore_patterns("source.json"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def hub_project(builtin_model_dir, tmp_path, monkeypatch):
    """A project dir whose hub cache holds hf:owner/model at v1; results/sources under it."""
    monkeypatch.chdir(tmp_path)
    snapshot = fill_hf_cache(tmp_path / "cache", builtin_model_dir, "v1")
    params = write_params(tmp_path, hfm={"source": "hf:owner/model", "revision": "v1"})
    return params, snapshot


def test_upstream_change_at_the_same_revision_is_detected(hub_project, tmp_path, builtin_model_dir, capsys):
    params, snapshot = hub_project
    argv = ["--params", str(params), "--model", "hfm", "--out", str(tmp_path / "models/hfm")]
    assert run_cli(argv, capsys)[0] == 0
    record = tmp_path / "results/sources/hfm.json"
    recorded = json.loads(record.read_text())
    assert recorded["revision"] == "v1" and recorded["sha256"]["model.safetensors"]
    assert recorded["sha256"] == json.loads((tmp_path / "models/hfm/source.json").read_text())["sha256"]
    assert run_cli(argv, capsys)[0] == 0  # unchanged upstream: fine, again and again

    (snapshot / "tokenizer_config.json").write_text('{"changed": true}')  # upstream moved under the same tag
    shutil.rmtree(tmp_path / "models/hfm")
    rc, err = run_cli(argv, capsys)
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "models.hfm: hf:owner/model @ v1 changed upstream" in err and "tokenizer_config.json" in err
    assert "pin a new revision or delete results/sources/hfm.json" in err
    assert not (tmp_path / "models/hfm").exists() and json.loads(record.read_text()) == recorded

    # Opting in to the change both ways: a new pinned revision, or deleting the record.
    fill_hf_cache(tmp_path / "cache", snapshot, "v2", commit="f" * 40)
    v2 = write_params(tmp_path, hfm={"source": "hf:owner/model", "revision": "v2"})
    assert run_cli(["--params", str(v2), *argv[2:]], capsys)[0] == 0
    assert json.loads(record.read_text())["revision"] == "v2"
    record.unlink()
    write_params(tmp_path, hfm={"source": "hf:owner/model", "revision": "v1"})  # back to v1, its files changed
    assert run_cli(argv, capsys)[0] == 0 and json.loads(record.read_text())["revision"] == "v1"


def test_local_and_builtin_sources_keep_no_record(builtin_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = load_params(write_params(tmp_path, local={"source": str(builtin_model_dir)}))
    download_model(params, "local", tmp_path / "out")
    assert not (tmp_path / "results").exists()


# --- tokens --------------------------------------------------------------------------------------------------


def test_tokens_in_the_environment_never_reach_logs_or_files(builtin_model_dir, tmp_path):
    fill_hf_cache(tmp_path / "cache", builtin_model_dir, "v1")
    params = write_params(tmp_path, hfm={"source": "hf:owner/model", "revision": "v1"},
                          gone={"source": "hf:owner/absent", "revision": "v1"})
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LOWPREC_LOG_LEVEL": "DEBUG", "HF_TOKEN": SECRET,
           "MODELSCOPE_API_TOKEN": SECRET, "HF_HUB_OFFLINE": "1"}
    outputs = []
    for key, rc in (("hfm", 0), ("gone", 1)):
        proc = subprocess.run([sys.executable, "-m", "workflow.download", "--params", str(params), "--model", key,
                               "--out", str(tmp_path / "models" / key)], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == rc, proc.stderr
        outputs += [proc.stdout, proc.stderr]
    assert "download.offline is true" in outputs[-1]
    written = [p.read_text(errors="replace") for p in tmp_path.rglob("*.json") if "cache" not in p.parts]
    assert any('"sha256"' in text for text in written)  # source.json and the record were read here
    assert not any(SECRET in text for text in outputs + written)


def test_a_token_in_params_is_refused(tmp_path):
    path = write_params(tmp_path, hfm={"source": "hf:owner/model", "revision": "v1", "hf_token": SECRET})
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert "models.hfm: `hf_token`: hub tokens are read from the environment only" in str(err.value)
    assert SECRET not in str(err.value)
