"""params.yaml validation: good files load, bad ones fail with the key named."""

import copy
from pathlib import Path

import pytest
import yaml

from workflow.params import ParamsError, load_params, variant_id, variants

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())
DELETE = object()  # marker: remove the key instead of setting it


def write(tmp_path, raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def edited(path: str, value):
    raw = copy.deepcopy(DEFAULT)
    *parents, leaf = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw



def test_default_params_load_and_expand_to_four_precisions():
    params = load_params(ROOT / "params.yaml")
    ids = [v["id"] for v in variants(params)]
    assert ids == [variant_id("tiny", p, "single") for p in ("fp16", "bf16", "int8", "nf4")]


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("train.learning_rate", "fast", "train.learning_rate"),
        ("train.max_steps", -5, "train.max_steps"),
        ("train.bogus", 1, "train.bogus: unknown key"),
        ("matrix.precision", ["fp16", "fp8"], "matrix.precision.1"),
        ("matrix.strategy", ["zero9"], "matrix.strategy.0"),
        ("matrix.model", ["nope"], "'nope' is not a key of `models`"),
        ("models.tiny.template", "alpaca_v9", "unknown template 'alpaca_v9'"),
        ("models.tiny.source", "modelscope:shakechen/Llama-2-7b-hf", "pinned `revision`"),
        ("models.tiny.source", "ftp:somewhere", "models.tiny.source"),
        ("builtin.tiny-llama.hidden_size", 100, "builtin.tiny-llama.hidden_size"),
        ("lora.dropout", 1.5, "lora.dropout"),
        ("data", DELETE, "data: Field required"),
        ("variants.fp16", {"learning_rate": 0}, "variants.fp16.learning_rate"),
    ],
)
def test_bad_values_name_the_key(tmp_path, key, value, expected):
    path = write(tmp_path, edited(key, value))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    message = str(err.value)
    assert str(path) in message and expected in message
    assert "\n" not in message


def test_variant_override_applies_to_one_precision_only(tmp_path):
    raw = edited("variants.nf4", {"learning_rate": 0.5, "max_steps": 7})
    params = load_params(write(tmp_path, raw))
    assert params.variant_train("nf4").learning_rate == 0.5
    assert params.variant_train("nf4").max_steps == 7
    assert params.variant_train("bf16").learning_rate == DEFAULT["train"]["learning_rate"]


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("matrix: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)


def test_model_keys_must_be_path_safe(tmp_path):
    raw = copy.deepcopy(DEFAULT)
    raw["models"]["my-model"] = raw["models"]["tiny"]
    with pytest.raises(ParamsError, match="models.my-model"):
        load_params(write(tmp_path, raw))
