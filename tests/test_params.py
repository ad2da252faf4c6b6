"""params.yaml validation: good files load, bad ones fail with the key named."""

import copy
from pathlib import Path

import pytest
import yaml

from workflow.params import ParamsError, load_params, refusal, variant_id, variants

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = yaml.safe_load((ROOT / "params.yaml").read_text())
DELETE = object()  # marker: remove the key instead of setting it


def write(tmp_path, raw) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def edited(path: str, value, base: dict = DEFAULT):
    raw = copy.deepcopy(base)
    *parents, leaf = path.split(".")
    node = raw
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return raw



def test_default_params_expand_to_every_precision_and_strategy_a_cpu_can_run():
    params = load_params(ROOT / "params.yaml")
    ids = [v["id"] for v in variants(params)]
    assert ids == [variant_id("tiny", p, s) for s in ("single", "zero2") for p in ("fp16", "bf16", "int8", "nf4")] + [
        variant_id("tiny", p, "zero3") for p in ("bf16", "nf4")]  # int8 cannot run under zero3, nor fp16 on a CPU
    assert params.processes("single") == 1 and params.processes("zero2") == params.processes("zero3") == 2


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
        ("matrix_zero.strategy", ["single"], "matrix_zero.strategy.0"),
        ("strategies.zero3.gpus", 0, "strategies.zero3.gpus"),
        ("strategies.zero2.nodes", "many", "strategies.zero2.nodes"),
        ("distributed.launcher", "mpirun", "distributed.launcher"),
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


# --- impossible combinations: refused for the whole matrix before any compute ----------------------------


def with_changes(**changes):
    raw = DEFAULT
    for path, value in changes.items():
        raw = edited(path.replace("__", "."), value, raw)
    return raw


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"matrix_zero__precision": ["bf16", "int8"]},
         "tiny-int8-zero3: bitsandbytes LLM.int8 weights cannot be partitioned by ZeRO-3"),
        ({"matrix_zero__precision": ["nf4"], "strategies__zero3__nf4_quant_storage": "uint8"},
         "tiny-nf4-zero3: ZeRO-3 partitions 4-bit weights only when their storage dtype equals the compute dtype"),
        ({"models__tiny__trained_dtype": "bfloat16"},
         "tiny-fp16-single: models.tiny was trained in bfloat16"),
        ({"strategies__zero2": DELETE}, "strategies.zero2: missing"),
        ({"strategies__zero2__offload_params": True}, "strategies.zero2.offload_params: parameter offload exists "
                                                       "only in ZeRO-3"),
        ({"strategies__single__gpus": 2}, "strategies.single: one device"),
        ({"matrix_zero__strategy": ["zero2", "zero3"]}, "tiny-bf16-zero2: in both matrix and matrix_zero"),
    ],
)
def test_impossible_variants_are_refused_with_the_variant_and_the_reason(tmp_path, changes, expected):
    path = write(tmp_path, with_changes(**changes))
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(err.value) == f"{path}: " + str(err.value).split(": ", 1)[1]  # file first, one line
    assert expected in str(err.value) and "\n" not in str(err.value)


def test_allowed_neighbours_of_the_refusals_load(tmp_path):
    ok = with_changes(matrix__strategy=["single"], matrix_zero__precision=["fp16", "bf16", "int8", "nf4"],
                      matrix_zero__strategy=["zero2"])
    assert len(variants(load_params(write(tmp_path, ok)))) == 8  # int8 and nf4 are fine under ZeRO-2
    gpu = with_changes(matrix_zero__precision=["fp16"])  # fp16 under ZeRO-3: refused on a CPU only (below)
    assert [v["id"] for v in variants(load_params(write(tmp_path, gpu)))][-1] == "tiny-fp16-zero3"
    nf4 = with_changes(matrix_zero__precision=["nf4"], strategies__zero3__nf4_quant_storage="bfloat16")
    assert load_params(write(tmp_path, nf4))
    forced = with_changes(models__tiny__trained_dtype="bfloat16", models__tiny__force_fp16=True)
    assert load_params(write(tmp_path, forced))
    none = with_changes(matrix_zero__strategy=[])  # no ZeRO runs at all
    assert [v["strategy"] for v in variants(load_params(write(tmp_path, none)))] == ["single"] * 4 + ["zero2"] * 4


def test_fp16_under_zero3_is_refused_on_a_cpu_and_allowed_on_gpus():
    params = load_params(ROOT / "params.yaml")
    reason = refusal(params, "tiny", "fp16", "zero3", "cpu")
    assert reason.startswith("tiny-fp16-zero3: DeepSpeed on CPU has no fp16 mode, so ZeRO-3 would partition the "
                             "weights as fp32")
    assert refusal(params, "tiny", "fp16", "zero3", "cuda") is None
    assert refusal(params, "tiny", "fp16", "zero3") is None  # device not known yet: decided where it is
    assert refusal(params, "tiny", "fp16", "zero2", "cpu") is None  # ZeRO-2 keeps the fp16 weights
