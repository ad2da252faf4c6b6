"""Both orchestrators, one DAG: lint, agreement, and real end-to-end runs of a small config.

The end-to-end tests copy the project into a temporary git repository with a smaller params.yaml (shorter
pre-training and training). One copy runs the README's main command (`scripts/run.sh`: Snakemake over the
whole matrix, then DVC records the results) and checks that `dvc repro` then has nothing to do; another runs
`dvc repro` and `dvc exp` over a part of the matrix (every step, both ZeRO stages), compared job by job.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import params_with
from workflow.stages import CODE, dvc_yaml, param_keys

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1",
       "HF_HUB_OFFLINE": "1", "LOWPREC_LOG_LEVEL": "WARNING"}
PRECISIONS = ("fp16", "bf16", "int8", "nf4")
# params.yaml's matrix (every precision, single and zero2) and matrix_zero (zero3); ZeRO: 2 processes, on CPU
ZERO = tuple(f"tiny-{p}-zero2" for p in PRECISIONS) + ("tiny-bf16-zero3", "tiny-nf4-zero3")
VARIANTS = tuple(f"tiny-{p}-single" for p in PRECISIONS) + ZERO
# The DVC copy's matrix: a 16-bit and a 4-bit precision on one device, the 4-bit one under both ZeRO stages;
# the base is not in DVC's cache (as for the presets' hub models), the merged models are.
DVC_MATRIX = {"matrix": {"model": ["tiny"], "precision": ["bf16", "nf4"], "strategy": ["single"]},
              "matrix_zero": {"model": ["tiny"], "precision": ["nf4"], "strategy": ["zero2", "zero3"]},
              "dvc": {"cache_models": False, "cache_merged": True}}
DVC_VARIANTS = ("tiny-bf16-single", "tiny-nf4-single", "tiny-nf4-zero2", "tiny-nf4-zero3")
SMALL = {  # the default experiment, shortened: every step and precision still runs for real
    "builtin": {"pretrain_steps": 80, "corpus_size": 3000},
    "data": {"builtin_rows": 480, "eval_size": 32},
    "train": {"max_steps": 30, "logging_steps": 5, "save_steps": 15},
    "evaluate": {"max_eval_rows": 32},
}


def sh(cmd: list[str], cwd: Path, check: bool = True, **env: str) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env={**ENV, **env}, capture_output=True, text=True, timeout=1200)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def make_project(dest: Path, params: dict | None = None, **sections) -> Path:
    """A git + DVC copy of the tracked project files with the SMALL params (or `params`; `sections` merged
    over SMALL) committed; the project's .venv is linked in."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    files += [p for p in subprocess.run(["git", "ls-files", "--others", "--exclude-standard"], cwd=ROOT,
                                         capture_output=True, text=True, check=True).stdout.split()]
    for name in files:
        if (ROOT / name).is_file() and not name.startswith("results/"):  # a fresh project: no results
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    if params is None:
        small = {k: {"tiny-llama": v} if k == "builtin" else v for k, v in SMALL.items()}
        params_with(dest, dest / "params.yaml", **small)
        params_with(dest, dest / "params.yaml", **sections)
    else:
        (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False, allow_unicode=True))
    sh([sys.executable, "-m", "workflow.stages", "--write"], dest)  # a file data.source is a dvc.yaml dep
    sh(["git", "init", "-q"], dest)
    sh(["git", "add", "-A"], dest)
    sh(["git", "commit", "-qm", "project"], dest)
    (dest / ".venv").symlink_to(ROOT / ".venv")  # untracked (.gitignore): setup finds it and installs nothing
    return dest


def dry_jobs(repo: Path) -> list[str]:
    """Rule names Snakemake would run now (empty when everything is up to date)."""
    out = sh(["snakemake", "-n", "--cores", "1", "--quiet", "rules"], repo).stdout
    if "Nothing to be done" in out or not out.strip():
        return []
    table = out[out.index("Job stats:"):]
    table = table[: table.index("\ntotal")]  # Snakemake prints the table twice; read the first
    rows = re.findall(r"^(\w+)\s+(\d+)$", table, flags=re.M)
    return sorted(rule for rule, n in rows for _ in range(int(n)) if rule not in ("total", "all"))


# --- static checks ------------------------------------------------------------------------------------------


def test_snakemake_lint_and_dry_run_are_fast():
    lint = sh(["snakemake", "--lint"], ROOT)
    assert "Congratulations" in lint.stdout + lint.stderr
    dry = sh(["snakemake", "-n", "--forceall", "--cores", "1", "--quiet", "rules"], ROOT).stdout
    counts = dict(re.findall(r"^(\w+)\s+(\d+)$", dry, flags=re.M))
    assert counts["train"] == counts["merge"] == counts["evaluate"] == str(len(VARIANTS))


def test_dvc_yaml_is_generated_from_the_stage_table():
    assert (ROOT / "dvc.yaml").read_text(encoding="utf-8") == dvc_yaml(), \
        "dvc.yaml is out of date with workflow/stages.py: run `python -m workflow.stages --write`"


def test_code_deps_are_each_steps_import_closure():
    """A module a step imports, even inside a function, is a dependency; one it never imports is not."""
    assert "workflow/templates.py" in CODE["report"]  # params.py imports it to check template names
    assert {"workflow/convert/__init__.py", "workflow/convert/chatglm.py"} <= set(CODE["download"])
    assert "workflow/builtin.py" in CODE["download"]  # imported inside download_model only
    assert not {"workflow/trainer.py", "workflow/convert/shards.py"} & set(CODE["report"])
    # A guard's edit reruns its own step only: the trainer imports the estimate to refuse, not to compute.
    assert "workflow/estimate.py" in CODE["estimate"] and "workflow/estimate.py" not in CODE["train"]
    assert "workflow/precision.py" in CODE["train"] and "workflow/stages.py" not in CODE["train"]


def test_snakefile_parse_imports_no_torch():
    """`snakemake -n` stays fast on a large matrix: parsing the workflow imports no ML library."""
    proc = sh([sys.executable, "-X", "importtime", "-m", "snakemake", "-n", "--forceall", "--cores", "1"], ROOT)
    imported = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if "import time" in line}
    assert "workflow.params" in imported  # the probe works: the Snakefile's own imports are listed
    assert not imported & {"torch", "transformers", "peft", "bitsandbytes", "datasets"}


def snakemake_jobs(repo: Path) -> dict[str, dict]:
    """Shell command (without the log redirect) -> rule, outputs, inputs, from a forced dry run."""
    out = sh(["snakemake", "-n", "-p", "--forceall", "--cores", "1"], repo).stdout
    jobs: dict[str, dict] = {}
    for block in out.split("\nrule ")[1:]:
        fields = dict(re.findall(r"^\s*(input|output|Shell command): (.*)$", block, flags=re.M))
        if fields.get("Shell command", "None") == "None":
            continue  # `rule all` has no command
        cmd = re.sub(r"\s*2>\s*\S+$", "", fields["Shell command"].strip())
        jobs[cmd] = {
            "rule": block.split(":", 1)[0].strip(),
            "outs": set(fields["output"].split(", ")),
            "deps": set(fields["input"].split(", ")),
        }
    return jobs


def dvc_stages(repo: Path) -> dict[str, dict]:
    """Command -> stage name, outputs, deps, params keys, from DVC's own parser."""
    from dvc.repo import Repo

    stages = {}
    with Repo(str(repo)) as dvc:
        for stage in dvc.index.stages:
            params = [k for d in stage.deps if getattr(d, "params", None) is not None for k in d.params]
            stages[" ".join(stage.cmd.split())] = {
                "name": stage.addressing,
                "outs": {str(o.def_path) for o in stage.outs},
                "deps": {str(d.def_path) for d in stage.deps if getattr(d, "params", None) is None},
                "params": params,
            }
    return stages


def test_snakemake_and_dvc_run_the_same_commands_outputs_and_params():
    smk, dvc = snakemake_jobs(ROOT), dvc_stages(ROOT)
    assert sorted(smk) == sorted(dvc)  # the very same commands, one per job/stage
    for cmd, job in smk.items():
        stage = dvc[cmd]
        step = stage["name"].split("@")[0].removesuffix("_zero")  # train_zero: the same step over matrix_zero
        assert job["rule"] == step
        assert job["outs"] == stage["outs"], cmd
        code = {d for d in stage["deps"] if d.startswith("workflow/")}
        assert code == set(CODE[step]) == {d for d in job["deps"] if d.startswith("workflow/")}, cmd
        data = [d for d in job["deps"] if not d.startswith("workflow/")]
        assert all(any(d == s or d.startswith(s + "/") for s in stage["deps"] - code) for d in data), cmd
        wildcards = dict(re.findall(r"--(model|precision|strategy) (\S+)", cmd))
        assert stage["params"] == param_keys(step, **wildcards), cmd


# --- end to end ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smk_repo(tmp_path_factory) -> Path:
    """A fresh clone after the README's main command (every job, then `dvc commit`)."""
    repo = make_project(tmp_path_factory.mktemp("smk"))
    sh(["scripts/run.sh"], repo)
    return repo


@pytest.fixture(scope="module")
def dvc_repo(tmp_path_factory) -> Path:
    repo = make_project(tmp_path_factory.mktemp("dvc"), **DVC_MATRIX)
    sh(["dvc", "init", "-q", "-f"], repo) if not (repo / ".dvc").is_dir() else None
    sh(["dvc", "repro"], repo)
    sh(["git", "add", "-A"], repo)
    sh(["git", "commit", "-qm", "first run"], repo)
    return repo


def read_metrics(repo: Path, kind: str, precision: str) -> dict:
    """Metrics of a variant: a precision (its single-device variant) or a whole variant id."""
    variant = precision if precision.startswith("tiny-") else f"tiny-{precision}-single"
    return json.loads((repo / f"results/metrics/{kind}/{variant}.json").read_text())


def test_snakemake_end_to_end(smk_repo):
    summary = (smk_repo / "results/report/summary.md").read_text()
    for precision in PRECISIONS:
        assert f"tiny-{precision}-single" in summary
        train = read_metrics(smk_repo, "train", precision)
        assert train["train_loss_last"] < train["train_loss_first"]
        ev = read_metrics(smk_repo, "eval", precision)
        assert ev["eval_loss_adapter"] < ev["eval_loss_base"]
        assert list((smk_repo / f"results/merged/tiny-{precision}-single").glob("*.safetensors"))
        assert (smk_repo / f"results/adapters/tiny-{precision}-single/adapter_model.safetensors").is_file()
        assert (smk_repo / f"logs/train/tiny-{precision}-single.log").is_file()
        # 30 steps on a briefly pre-trained model: answers in the right form and length, rarely right yet
        assert ev["rougeL_adapter"] > ev["rougeL_base"] and ev["eos_stop_rate_merged"] > 0.5
        assert ev["avg_gen_tokens_adapter"] < ev["avg_gen_tokens_base"]
        predictions = (smk_repo / f"results/predictions/tiny-{precision}-single.jsonl").read_text().splitlines()
        assert len(predictions) == 3 * SMALL["evaluate"]["max_eval_rows"]  # base, adapter, merged
        assert set(json.loads(predictions[0])) == {"model", "row", "prompt", "reference", "prediction",
                                                   "stopped", "stop", "tokens"}
        timing = read_metrics(smk_repo, "timing", precision)
        assert timing["tokens_per_s"] > 0 and timing["peak_memory_kind"] == "cpu_peak_rss"
        live = smk_repo / f"results/live/tiny-{precision}-single"
        assert json.loads((live / "metrics.json").read_text())["train"]["loss"] > 0
        assert (live / "plots/metrics/train/loss.tsv").read_text().startswith("step\tloss\n")
    for variant in ZERO:  # DeepSpeed ZeRO-2/-3, 2 processes over gloo
        train = read_metrics(smk_repo, "train", variant)
        assert train["processes"] == 2 and train["train_loss_last"] < train["train_loss_first"]
        stage = train["deepspeed"]["zero_optimization"]["stage"]
        assert stage == int(variant[-1]) and train["deepspeed"]["train_batch_size"] == 2 * 8
        assert json.loads((smk_repo / f"results/adapters/{variant}/deepspeed_config.json").read_text()) == \
            train["deepspeed"]
        ev = read_metrics(smk_repo, "eval", variant)
        assert ev["eval_loss_merged"] < ev["eval_loss_base"] and ev["eos_stop_rate_merged"] > 0.5
        launch = read_metrics(smk_repo, "timing", variant)["launch_command"]
        assert "-m torch.distributed.run --nproc_per_node=2 --standalone -m workflow.train" in launch
    rows = list(csv.DictReader((smk_repo / "results/report/summary.csv").read_text().splitlines()))
    assert [r["variant"] for r in rows] == list(VARIANTS)  # a row per precision x strategy
    for row in rows:
        assert row["reference"] == "bf16"  # report.reference: every group of the default runs bf16
        if row["precision"] == "bf16":
            assert float(row["mem x ref"]) == float(row["tokens/s x ref"]) == float(row["eval loss x ref"]) == 1
    assert all(r["template"] == "human_assistant" for r in rows)
    assert [r["strategy"] for r in rows] == ["single"] * 4 + ["zero2"] * 4 + ["zero3"] * 2
    for name in ("loss_curves.png", "memory_vs_eval_loss.png", "tokens_per_s.png", "quant_error.png"):
        assert (smk_repo / "results/report" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    for row in rows:  # both merge targets for the quantized precisions, measured
        quantized = row["precision"] in ("int8", "nf4")
        assert bool(row["eval loss merged dequantized"]) == quantized and row["eval loss merged base"], row
    quant = json.loads((smk_repo / "results/metrics/quant/tiny.json").read_text())
    assert quant["layers_quantized"] == 14 and len(quant["layers"]) == 14
    assert "## Quantization error" in summary and "merge.target" in summary
    assert dry_jobs(smk_repo) == []


def test_snakemake_html_report_includes_the_plots(smk_repo):
    sh(["snakemake", "--report", "report.html"], smk_repo)
    html = (smk_repo / "report.html").read_text(errors="replace")
    for name in ("loss_curves.png", "memory_vs_eval_loss.png", "tokens_per_s.png", "quant_error.png",
                 "summary.csv"):
        assert name in html, name


def test_snakemake_reruns_only_the_changed_variant(smk_repo):
    params_with(smk_repo, smk_repo / "params.yaml", variants={"int8": {"learning_rate": 0.001}})
    try:
        assert dry_jobs(smk_repo) == (["estimate"] * 2 + ["evaluate"] * 2 + ["merge"] * 2 + ["report"]
                                      + ["train"] * 2)  # single, zero2
        out = sh(["snakemake", "-n", "--cores", "1"], smk_repo).stdout
        assert set(re.findall(r"wildcards: .*precision=(\w+)", out)) == {"int8"}
    finally:
        sh(["git", "checkout", "params.yaml"], smk_repo)
    assert dry_jobs(smk_repo) == []


def test_dvc_end_to_end_then_snakemake_has_nothing_to_redo(dvc_repo):
    status = sh(["dvc", "status"], dvc_repo).stdout
    assert "up to date" in status
    for variant in DVC_VARIANTS:
        assert read_metrics(dvc_repo, "eval", variant)["eval_loss_adapter"] > 0
    assert (dvc_repo / "results/report/summary.md").is_file()
    assert dry_jobs(dvc_repo) == []  # DVC's outputs are finished work for Snakemake too


def test_dvc_plots_show_renders_the_loss_curves_of_every_variant(dvc_repo):
    shown = json.loads(sh(["dvc", "plots", "show", "--json"], dvc_repo).stdout)
    assert not shown.get("errors"), shown["errors"]
    plots = shown["data"]
    for precision in ("bf16", "nf4"):
        for path in (f"results/plots/loss/tiny-{precision}-single.csv",  # dvc.yaml's top-level plots section
                     f"results/live/tiny-{precision}-single/plots/metrics/train/loss.tsv"):  # dvclive, live
            points = plots[path][0]["content"]["data"]["values"]
            assert len(points) == SMALL["train"]["max_steps"] // 5 + 1 and float(points[-1]["loss"]) > 0, path
    for name in ("loss_curves.png", "memory_vs_eval_loss.png", "tokens_per_s.png"):
        assert plots[f"results/report/{name}"][0]["type"] == "image"


def test_two_runs_give_identical_quality_metrics(smk_repo, dvc_repo):
    """Everything but the timing file is deterministic, ZeRO's 2-process runs included: whole files compare equal."""
    for variant in DVC_VARIANTS:
        for kind in ("train", "merge", "eval"):
            assert read_metrics(smk_repo, kind, variant) == read_metrics(dvc_repo, kind, variant), (kind, variant)
        for path in (f"results/plots/loss/{variant}.csv", f"results/predictions/{variant}.jsonl"):
            assert (smk_repo / path).read_text() == (dvc_repo / path).read_text(), path
        assert read_metrics(smk_repo, "timing", variant) != read_metrics(dvc_repo, "timing", variant)


def test_dvc_reruns_only_the_changed_variant_and_diffs_metrics(dvc_repo):
    params_with(dvc_repo, dvc_repo / "params.yaml", variants={"bf16": {"learning_rate": 0.001}})  # bf16's variant
    out = sh(["dvc", "repro"], dvc_repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {f"{step}@tiny-bf16-single" for step in ("estimate", "train", "merge", "evaluate")} | {"report"}, out
    diff = json.loads(sh(["dvc", "metrics", "diff", "--json"], dvc_repo).stdout)
    changed = {path for path, metrics in diff.items() for m in metrics.values() if m.get("diff")}
    for variant in ("tiny-bf16-single",):
        assert {f"results/metrics/eval/{variant}.json", f"results/metrics/train/{variant}.json"} <= changed
    assert not any("nf4" in p for p in changed if "/eval/" in p)
    assert dry_jobs(dvc_repo) == []  # Snakemake agrees that the rerun branch is finished


def test_readme_sequence_leaves_dvc_repro_nothing_to_do(smk_repo):
    """The README's order on a fresh clone: `scripts/run.sh` (it hands Snakemake's results to DVC), then
    `dvc repro` runs no stage and takes seconds, not the minutes a rerun of the DAG would."""
    start = time.monotonic()
    out = sh(["dvc", "repro"], smk_repo).stdout
    assert "Running stage" not in out and time.monotonic() - start < 60, out
    assert "up to date" in sh(["dvc", "status"], smk_repo).stdout


def test_a_second_run_runs_nothing_and_says_whose_results_are_shown(smk_repo):
    """The README's main command again: nothing needs to run, and it says so, naming the machine and commit
    of the results on disk instead of showing them as this run's."""
    made = next(line for line in (smk_repo / "results/report/summary.md").read_text().splitlines()
                if line.startswith("Made on"))
    proc = sh(["scripts/run.sh"], smk_repo)
    assert "Nothing ran" in proc.stderr and made in proc.stderr, proc.stderr
    assert "commit " in made and "# Precision comparison" not in proc.stdout  # never shown as this run's


def test_a_data_edit_reruns_its_branch_in_both_tools(tmp_path):
    """data.source is a dependency of preprocess in both DAGs: dvc.lock holds its hash, and one changed byte
    reruns preprocess and everything after it (not the download), in DVC and in Snakemake."""
    from workflow import tasks

    rows = sum(tasks.builtin_split(120, 16, 0), [])
    (tmp_path / "data").mkdir()
    data = tmp_path / "data/rows.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    repo = make_project(tmp_path, data={"source": "data/rows.jsonl", "eval_size": 16},
                        matrix={"model": ["tiny"], "precision": ["bf16"], "strategy": ["single"]},
                        matrix_zero={"model": [], "precision": [], "strategy": []},
                        train={"max_steps": 10, "save_steps": 10})
    assert "- \"data/rows.jsonl\"" in (repo / "dvc.yaml").read_text()
    sh(["dvc", "repro"], repo)
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    dep = next(d for d in lock["stages"]["preprocess@tiny"]["deps"] if d["path"] == "data/rows.jsonl")
    assert dep["md5"] and dep["size"] == data.stat().st_size
    assert dry_jobs(repo) == []
    data.write_text(data.read_text(encoding="utf-8").replace('"output": "', '"output": "x', 1), encoding="utf-8")
    # the quant step reads the eval split's activations, so it reruns with the data
    assert dry_jobs(repo) == ["estimate", "evaluate", "merge", "preprocess", "quant", "report", "train"]
    out = sh(["dvc", "repro"], repo).stdout
    ran = set(re.findall(r"Running stage '([^']+)'", out))
    assert ran == {"preprocess@tiny", "quant@tiny", "estimate@tiny-bf16-single", "train@tiny-bf16-single",
                   "merge@tiny-bf16-single", "evaluate@tiny-bf16-single", "report"}, out
    params_with(repo, repo / "params.yaml", data={"source": "data/other.jsonl"})  # dvc.yaml not regenerated
    proc = sh(["snakemake", "-n", "--cores", "1"], repo, check=False)
    said = proc.stdout + proc.stderr
    assert proc.returncode and "dvc.yaml is out of date" in said and "workflow.stages --write" in said, said


def test_dvc_experiment_with_another_lora_rank_diffs_every_variant(dvc_repo):
    """`dvc exp run -S` over the matrix: every variant retrains, and `dvc metrics diff` between the baseline
    commit and the experiment lists changed train and eval metrics for each of them."""
    sh(["git", "checkout", "params.yaml"], dvc_repo)  # the baseline params (an earlier test edited them)
    sh(["dvc", "exp", "run", "-n", "lora-r4", "-S", "lora.r=4"], dvc_repo)
    diff = json.loads(sh(["dvc", "metrics", "diff", "HEAD", "lora-r4", "--json"], dvc_repo).stdout)
    for variant in DVC_VARIANTS:
        for kind in ("train", "eval"):
            changed = diff[f"results/metrics/{kind}/{variant}.json"]
            assert any(m.get("diff") for m in changed.values()), (kind, variant)
        assert diff[f"results/metrics/train/{variant}.json"]["trainable_params"]["new"] < \
            diff[f"results/metrics/train/{variant}.json"]["trainable_params"]["old"]
    shown = json.loads(sh(["dvc", "exp", "show", "--json"], dvc_repo).stdout)
    assert "lora-r4" in json.dumps(shown)


def adapter_files(repo: Path, variant: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((repo / f"results/adapters/{variant}").iterdir())
            if p.is_file() and not p.name.startswith(".")}


def test_dvc_checkout_brings_back_an_earlier_experiments_adapter(dvc_repo):
    """A second experiment, then `dvc exp apply` of the first: its adapter comes back bit for bit from DVC's
    cache (again after deleting it, with `dvc checkout`), and then neither DVC nor Snakemake reruns a job."""
    variant = "tiny-bf16-single"
    first = adapter_files(dvc_repo, variant)  # the workspace holds lora-r4's results (the test above)
    sh(["dvc", "exp", "run", "-n", "bf16-lr", "-S", "+variants.bf16.learning_rate=0.001"], dvc_repo)
    assert adapter_files(dvc_repo, variant) != first
    sh(["dvc", "exp", "apply", "lora-r4"], dvc_repo)
    assert adapter_files(dvc_repo, variant) == first
    shutil.rmtree(dvc_repo / f"results/adapters/{variant}")
    sh(["dvc", "checkout"], dvc_repo)
    assert adapter_files(dvc_repo, variant) == first
    assert "up to date" in sh(["dvc", "status"], dvc_repo).stdout
    assert "Running stage" not in sh(["dvc", "repro"], dvc_repo).stdout
    proc = sh([sys.executable, "-m", "workflow.handoff"], dvc_repo)  # what scripts/run.sh runs first
    assert "DVC verified are finished work for Snakemake" in proc.stderr, proc.stderr
    assert dry_jobs(dvc_repo) == []


def test_dvc_push_then_pull_into_a_fresh_clone_restores_the_experiment(dvc_repo, tmp_path):
    """The applied experiment, committed and pushed to the default remote (.dvc/config: a directory under
    ~/.cache), comes back in a fresh clone with `dvc pull`: adapters, merged models and metrics bit for bit.
    `dvc repro` remakes only the base (dvc.cache_models is off here) and trains nothing; merge and evaluate
    of the experiment then run from the pulled adapter and give the pushed metrics."""
    home = {"HOME": str(tmp_path / "home")}  # where the default remote's ~ points for this test
    sh(["git", "add", "-A"], dvc_repo)
    sh(["git", "commit", "-qm", "lora r4"], dvc_repo)
    sh(["dvc", "push"], dvc_repo, **home)
    assert list((tmp_path / "home/.cache/lowprec/dvc-remote").rglob("*"))
    clone = tmp_path / "clone"
    sh(["git", "clone", "-q", str(dvc_repo), str(clone)], tmp_path)
    (clone / ".venv").symlink_to(ROOT / ".venv")
    assert not (clone / "results/adapters").exists()  # not in git
    sh(["dvc", "pull"], clone, **home)
    for variant in DVC_VARIANTS:
        assert adapter_files(clone, variant) == adapter_files(dvc_repo, variant)
        for kind in ("train", "merge", "eval", "timing"):
            assert read_metrics(clone, kind, variant) == read_metrics(dvc_repo, kind, variant)
    assert not (clone / "results/models/tiny").exists()
    out = sh(["dvc", "repro"], clone).stdout
    assert set(re.findall(r"Running stage '([^']+)'", out)) == {"download@tiny"}, out  # the same base again
    assert "up to date" in sh(["dvc", "status"], clone).stdout
    for step in ("merge", "evaluate"):  # that experiment's merge and evaluate, here, without training
        sh(["dvc", "repro", "--force", "--single-item", f"{step}@tiny-nf4-single"], clone)
    for kind in ("merge", "eval"):
        assert read_metrics(clone, kind, "nf4") == read_metrics(dvc_repo, kind, "nf4")
    # only evaluate's timing file is new (wall time and memory differ from run to run): the report would redo
    assert sh(["dvc", "status"], clone).stdout.split() == ["report:", "changed", "deps:", "modified:",
                                                           "results/metrics/eval_timing"]
