"""The quant step: bitsandbytes' formats on the seeds' worked examples (exact), and on the tiny base."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.conftest import params_with
from workflow import cli, quant
from workflow.report import quant_table


def test_seed_absmax_example():
    """Seed 000: absmax int8 of [1.52, 2.64, -3.45, 4.32] is [45, 78, -101, 127] (scale 127 / 4.32)."""
    w = torch.tensor([[1.52, 2.64, -3.45, 4.32]])
    back, codes, bits = quant.int8_absmax(w, per_row=False)
    assert codes.flatten().tolist() == [45, 78, -101, 127]
    assert back.flatten().tolist() == pytest.approx([c * 4.32 / 127 for c in (45, 78, -101, 127)], abs=1e-6)
    assert back.flatten().tolist() == pytest.approx([1.531, 2.653, -3.436, 4.32], abs=1e-3)
    assert bits == 4 * 8 + 32  # four int8 codes and one fp32 scale


def test_seed_nf4_example():
    """Seed 000: NF4 of [1.55, 1.62, 1.83, 4.32] (absmax 4.32) gives levels 0.3379, 0.3379, 0.4407, 1 of the
    NF4 table: codes 11, 11, 12, 15, dequantized [1.46, 1.46, 1.90, 4.32]. bitsandbytes quantizes blocks of
    64, so the example is the start of one block of zeros (zero is code 7)."""
    w = torch.zeros(64)
    w[:4] = torch.tensor([1.55, 1.62, 1.83, 4.32])
    back, packed, bits = quant.nf4(w, double_quant=False)
    assert quant.nf4_codes(packed)[:5] == [11, 11, 12, 15, 7]
    assert [round(x, 2) for x in back[:4].tolist()] == [1.46, 1.46, 1.90, 4.32]
    assert bits == 64 * 4 + 32  # 4-bit codes and one fp32 absmax per block of 64


def test_bits_per_parameter_of_the_stored_tensors():
    """4 + 32/64 = 4.5 bits for NF4, 4 + 8/64 + 32/(64*256) ~ 4.127 with double quant (seed 000), plus the
    one fp32 offset double quant keeps per tensor; LLM.int8: 8 bits plus one fp32 scale per row."""
    w = torch.randn(1024, 256)
    n = w.numel()
    assert quant.nf4(w, False)[2] / n == 4.5
    blocks = n // 64
    assert quant.nf4(w, True)[2] / n == 4 + 8 / 64 + 32 * math.ceil(blocks / 256) / n + 32 / n
    assert quant.nf4(w, True)[2] / n == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=2e-4)
    assert quant.int8_absmax(w, per_row=True)[2] / n == 8 + 32 * 1024 / n
    assert quant.int8_absmax(w, per_row=False)[2] / n == 8 + 32 / n


def test_outlier_share_counts_features_over_the_threshold_in_real_tokens():
    layer = torch.nn.Sequential(torch.nn.Linear(8, 4))
    counter = quant.OutlierCounter(layer, ["0"], threshold=6.0)
    x = torch.zeros(2, 3, 8)
    x[0, 1, 3] = -7.0  # a real token: feature 3 is an outlier
    x[1, 2, 5] = 9.0  # a padded token: not counted
    x[1, 0, 6] = 5.9  # below the threshold
    counter.mask = torch.tensor([[1, 1, 1], [1, 1, 0]]).bool()
    layer(x)
    counter.remove()
    layer(x)  # removed: no more counts
    assert counter.shares["0"] == [1 / 8] and counter.max_abs["0"] == 7.0


@pytest.fixture(scope="module")
def report(builtin_model_dir, tiny_data_dir, tmp_path_factory):
    """The quant step's CLI run once on the tiny base: its JSON."""
    tmp = tmp_path_factory.mktemp("quant")
    out = tmp / "quant" / "tiny.json"
    argv = ["--params", str(params_with(tmp)), "--model", "tiny", "--model-dir", str(builtin_model_dir),
            "--data", str(tiny_data_dir), "--out", str(out)]
    assert cli.run(quant.main, argv) == 0
    return json.loads(out.read_text())


def test_quant_report_on_the_tiny_base(report, builtin_model_dir):
    """Every layer nf4 quantizes, each format's error recomputed here by hand (absmax rounding in torch), and
    the formats' expected order: per-row int8 is finer than per-tensor, NF4 coarser than int8, double quant
    about NF4's."""
    from workflow.modeling import load_unquantized

    r = report
    assert r["model"] == "tiny" and set(r["formats"]) == set(quant.FORMATS)
    assert r["layers_quantized"] == 14 and r["nf4_blocksize"] == [64] and r["outlier_threshold"] == 6.0
    base = load_unquantized(builtin_model_dir, "auto", "cpu")
    for row in r["layers"]:
        w = base.get_submodule(row["layer"]).weight.detach().float()
        scale = w.abs().amax(1, keepdim=True) / 127  # LLM.int8's row-wise absmax, by hand
        by_hand = (torch.round(w.half().float() / scale) * scale - w).norm() / w.norm()
        assert row["rel_error"]["int8_row"] == pytest.approx(float(by_hand), rel=0.05), row["layer"]
        e = row["rel_error"]
        assert e["int8_row"] <= e["int8_tensor"] < e["nf4"] < 0.2, row
        assert e["nf4_double_quant"] == pytest.approx(e["nf4"], rel=0.01)  # 8-bit absmax: either side of nf4
        assert row["bits_per_param"]["nf4"] == 4.5 and 0 <= row["outlier_share"] <= 1
    f = r["formats"]
    assert f["nf4_double_quant"]["bits_per_param"] < f["nf4"]["bits_per_param"] < f["int8_row"]["bits_per_param"]
    assert r["eval_batches"] >= 1 and r["eval_tokens"] > 0
    table = "\n".join(quant_table({"tiny": r}))
    assert f"| tiny | nf4 + double quant (QLoRA) | {f['nf4_double_quant']['bits_per_param']:.3f} |" in table
