"""Shared fixtures: the real default builtin model, built once per test session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `pytest` without `python -m` does not put the project root on sys.path
from workflow.devices import LEASED  # noqa: E402 (needs the root on sys.path)

# DeepSpeed JIT-builds one op on first use; every test's runs (in their own directories) share one build.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / "results/cache/torch_extensions"))
# A step run in-process leases GPUs by setting these (workflow/devices.py); a test must not pass its lease on.
LEASE_VARS = (LEASED, "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def _restore_lease_env(monkeypatch):
    """Every test ends with the lease variables as they were before it (set, or absent)."""
    for name in LEASE_VARS:
        if name in os.environ:
            monkeypatch.setenv(name, os.environ[name])
        else:
            monkeypatch.setenv(name, "")
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory) -> Path:
    """The default model of params.yaml (builtin.tiny-llama, full pre-training) via the download step."""
    from workflow.download import download_model
    from workflow.params import load_params

    params = load_params(ROOT / "params.yaml")
    key = next((k for k, m in params.models.items() if m.source == "builtin:tiny-llama"), None)
    assert key, "params.yaml has no model with source builtin:tiny-llama"
    out = tmp_path_factory.mktemp("builtin") / key
    download_model(params, key, out)
    return out


def merged(base: dict, changes: dict) -> dict:
    """`base` with `changes` merged in, mapping into mapping at every depth (other values replace)."""
    out = dict(base)
    for key, value in changes.items():
        out[key] = merged(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def params_with(dest: Path, base: Path | None = None, **sections) -> Path:
    """The one way tests change params: `base` (default: the project's params.yaml) with `sections` merged in
    (nested mappings merge, other values replace), written to `dest`/params.yaml (`dest` may be a project
    copy: editing its own params.yaml in place). Returns the file's path."""
    import yaml

    raw = yaml.safe_load(((base or ROOT / "params.yaml")).read_text(encoding="utf-8"))
    path = Path(dest) / "params.yaml"
    path.write_text(yaml.safe_dump(merged(raw, sections), sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_data_dir(builtin_model_dir, tmp_path_factory) -> Path:
    """The default data, preprocessed for the default model."""
    from workflow.params import load_params
    from workflow.preprocess import preprocess

    out = tmp_path_factory.mktemp("data") / "tiny"
    preprocess(load_params(ROOT / "params.yaml"), "tiny", builtin_model_dir, out)
    return out


# ChatML as Qwen's tokenizer_config ships it (written here for the builtin tokenizer): what the `qwen`
# template must reproduce id for id (tests/test_templates.py).
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="session")
def builtin_tokenizer_dir(tmp_path_factory) -> Path:
    """The default builtin model's tokenizer alone (seconds: no pre-training), with a ChatML chat_template."""
    from workflow.builtin import train_tokenizer
    from workflow.params import load_params

    params = load_params(ROOT / "params.yaml")
    tok = train_tokenizer(params.builtin["tiny-llama"], params.seed)
    tok.chat_template = CHATML
    out = tmp_path_factory.mktemp("builtin_tok")
    tok.save_pretrained(out)
    return out
