"""The report's ratio columns: relative to report.reference, or to the group's first precision without it."""

from __future__ import annotations

import json

from tests.conftest import params_with
from workflow.params import load_params, variants
from workflow.report import collect, render


def write_metrics(root, vid: str, memory: float, speed: float, loss: float, kind: str = "cpu_peak_rss") -> None:
    values = {"estimate": {"total_gb": 2 * memory / 1e9},
              "train": {}, "timing": {"peak_memory_bytes": memory, "tokens_per_s": speed, "peak_memory_kind": kind},
              "merge": {}, "eval": {"eval_loss_merged": loss}, "eval_timing": {"peak_memory_bytes": memory}}
    for kind, data in values.items():
        (root / kind).mkdir(parents=True, exist_ok=True)
        (root / kind / f"{vid}.json").write_text(json.dumps(data))


def test_predicted_gpu_memory_beside_the_measured_one_on_cuda_only(tmp_path):
    params = load_params(params_with(tmp_path, matrix={"precision": ["bf16", "nf4"], "strategy": ["single"]},
                                     matrix_zero={"precision": [], "strategy": []}))
    write_metrics(tmp_path / "metrics", "tiny-bf16-single", 6e9, 100, 2.0, kind="cuda_max_memory_allocated")
    write_metrics(tmp_path / "metrics", "tiny-nf4-single", 3e9, 100, 2.0)  # a CPU run: RSS, no GPU memory
    rows = {r["variant"]: r for r in collect(params, tmp_path / "metrics")}
    assert rows["tiny-bf16-single"]["predicted GPU GB"] == 12 and rows["tiny-bf16-single"]["measured / predicted"] == 0.5
    assert rows["tiny-nf4-single"]["predicted GPU GB"] == 6 and rows["tiny-nf4-single"]["measured / predicted"] is None


def test_report_without_a_bf16_row_divides_by_the_groups_first_precision(tmp_path):
    params = load_params(params_with(tmp_path, matrix={"precision": ["int8", "nf4"], "strategy": ["single"]},
                                     matrix_zero={"precision": ["nf4"], "strategy": ["zero2"]}))
    numbers = {"tiny-int8-single": (4e6, 100, 2.0), "tiny-nf4-single": (2e6, 80, 2.2), "tiny-nf4-zero2": (3e6, 50, 2.1)}
    for v in variants(params):
        write_metrics(tmp_path / "metrics", v["id"], *numbers[v["id"]])
    rows = {r["variant"]: r for r in collect(params, tmp_path / "metrics")}
    assert rows["tiny-nf4-single"]["reference"] == "int8"
    assert rows["tiny-nf4-single"]["mem x ref"] == 0.5 and rows["tiny-nf4-single"]["tokens/s x ref"] == 0.8
    assert rows["tiny-nf4-single"]["eval loss x ref"] == 2.2 / 2.0
    assert rows["tiny-nf4-zero2"]["reference"] == "nf4" and rows["tiny-nf4-zero2"]["mem x ref"] == 1.0
    markdown, csv_text = render(list(rows.values()))
    assert "tiny/single: int8" in markdown and "0.50" in markdown and ",reference" in csv_text.splitlines()[0]


def test_report_reference_is_a_param(tmp_path):
    params = load_params(params_with(tmp_path, matrix={"precision": ["int8", "nf4"], "strategy": ["single"]},
                                     matrix_zero={"precision": []}, report={"reference": "nf4"}))
    for v in variants(params):
        write_metrics(tmp_path / "metrics", v["id"], *{"int8": (4e6, 100, 2.0), "nf4": (2e6, 80, 2.2)}[v["precision"]])
    rows = {r["variant"]: r for r in collect(params, tmp_path / "metrics")}
    assert rows["tiny-int8-single"]["reference"] == "nf4" and rows["tiny-int8-single"]["mem x ref"] == 2.0


def test_report_says_where_it_was_made_and_what_this_invocation_ran(tmp_path, monkeypatch):
    from workflow.provenance import RUN_ID, provenance

    params = load_params(params_with(tmp_path, matrix={"precision": ["int8", "nf4"], "strategy": ["single"]},
                                     matrix_zero={"precision": []}))
    for v in variants(params):
        write_metrics(tmp_path / "metrics", v["id"], 1e6, 10, 1.0)
    earlier = {"host": "gpu-box", "device": "NVIDIA H200", "date": "2026-11-30T10:00:00+00:00",
               "commit": "abc123def456", "run_id": "earlier"}
    monkeypatch.setenv(RUN_ID, "now-1")
    now = provenance()
    (tmp_path / "metrics/eval_timing/tiny-int8-single.json").write_text(json.dumps({"made": {**now}}))
    (tmp_path / "metrics/eval_timing/tiny-nf4-single.json").write_text(json.dumps({"made": earlier}))
    markdown, csv_text = render(collect(params, tmp_path / "metrics"), now)
    assert f"Made on {now['host']} ({now['device']}) at {now['date']}" in markdown
    assert f"transformers {now['versions']['transformers']}" in markdown
    assert "Ran by this invocation (now-1): tiny-int8-single." in markdown
    assert ("- reused: tiny-nf4-single, made on gpu-box (NVIDIA H200) at 2026-11-30T10:00:00+00:00, commit "
            "abc123def456") in markdown
    assert "gpu-box (NVIDIA H200)" in csv_text
