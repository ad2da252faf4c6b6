"""Benchmark (not a test): the train step's throughput with random batches, length grouping and packing.

One Llama-2-shaped model with random weights (hidden 512, 8 layers, vocab 32000: ~58M parameters, built
offline), the builtin tokenizer, and alpaca_data_zh-like rows from scripts/bench_preprocess.py (max_length
384, truncate_end as in params.yaml). Each batching mode runs `workflow.trainer.train_variant` for the same
steps, so the same number of examples, in a process of its own (peak memory is per process), and the script
prints tokens/s (non-pad tokens / train runtime), padding efficiency (measured in training, and over one
whole epoch of the same sampler and collator: a few steps of grouping see only the longest batches, which
come first), wall time, peak memory, the final and mean training loss, and the ratios to random batching.

    python scripts/bench_train.py [--steps 6] [--repeats 1] [--precision bf16|fp32|...] [--modes ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

MODES = {"random": {}, "grouped": {"group_by_length": True}, "packed": {"packing": True}}
MODEL = {"hidden_size": 512, "intermediate_size": 1408, "num_hidden_layers": 8, "num_attention_heads": 8,
         "vocab_size": 32000}  # Llama-2's vocabulary and head size (64); dims multiples of 64 for bitsandbytes


def build(work: Path, rows: int, max_length: int, seed: int) -> tuple[Path, Path]:
    """The model dir (random weights, builtin tokenizer) and the tokenized train split, under `work`."""
    import torch
    from bench_preprocess import _NoBad, alpaca_like_rows
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    from workflow.builtin import BOS, EOS, PAD, train_tokenizer
    from workflow.data import judge_rows
    from workflow.params import Columns, load_params
    from workflow.templates import get_template
    from workflow.tokenize import tokenize_rows

    params = load_params(ROOT / "params.yaml")
    tok = train_tokenizer(params.builtin["tiny-llama"], seed)
    torch.manual_seed(seed)
    ids = {f"{k}_token_id": tok.convert_tokens_to_ids(t) for k, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    model = LlamaForCausalLM(LlamaConfig(**MODEL, num_key_value_heads=MODEL["num_attention_heads"],
                                         max_position_embeddings=max_length, tie_word_embeddings=False, **ids))
    model_dir, data_dir = work / "model", work / "data"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    records = alpaca_like_rows(rows, seed)
    good = [r for _, r in judge_rows(list(enumerate(records, 1)), Columns().model_dump(), _NoBad())]
    columns, _ = tokenize_rows(good, tok, get_template("human_assistant"), max_length)
    Dataset.from_dict({k: columns[k] for k in ("input_ids", "attention_mask", "labels")}).save_to_disk(
        str(data_dir / "train"))
    return model_dir, data_dir


def params_for(work: Path, mode: str, args) -> Path:
    """params.yaml with the benchmark's train settings and the mode's batching."""
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text(encoding="utf-8"))
    raw["data"]["max_length"] = args.max_length
    raw["train"].update(max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                        gradient_accumulation_steps=1, logging_steps=1, save_steps=10**6, warmup_steps=0,
                        gradient_checkpointing=args.gradient_checkpointing, **MODES[mode])
    path = work / f"params-{mode}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return path


def epoch_efficiency(params, data_dir: Path, model_dir: Path) -> float:
    """Padding efficiency over one epoch of batches, from the step's own sampler and collator (no model)."""
    import torch
    from datasets import load_from_disk

    from workflow.batching import (
        GroupedSampler,
        PackedCollator,
        PaddedCollator,
        example_lengths,
    )
    from workflow.tokenize import load_tokenizer

    targs = params.train
    ds = load_from_disk(str(data_dir / "train"))
    bs = targs.per_device_train_batch_size
    if targs.group_by_length:
        order = list(GroupedSampler(example_lengths(ds), bs, params.seed))
    else:
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(params.seed)).tolist()
    collator = PackedCollator() if targs.packing else PaddedCollator(load_tokenizer(model_dir))
    for i in range(0, len(order) - bs + 1, bs):
        collator([ds[j] for j in order[i:i + bs]])
    return collator.efficiency()


def use_fp32_weights() -> None:
    """Bench only (`--precision fp32`): the bf16 plan with fp32 weights and no autocast, for CPUs without bf16
    matmul units (there bf16 runs ~5x slower than fp32 and a step of this model takes many minutes)."""
    import dataclasses

    import torch

    from workflow import trainer

    resolve = trainer.resolve_precision
    trainer.resolve_precision = lambda *a, **k: dataclasses.replace(
        resolve(*a, **k), load_dtype=torch.float32, compute_dtype=torch.float32, amp="none")


def worker(args) -> None:
    """One mode in this process: train, then print its numbers as one JSON line."""
    import logging

    from workflow.params import load_params
    from workflow.trainer import train_variant

    logging.basicConfig(level=logging.WARNING)
    if args.precision == "fp32":
        use_fp32_weights()
    work = Path(args.work)
    params = load_params(params_for(work, args.worker, args))
    t0 = time.perf_counter()
    precision = "bf16" if args.precision == "fp32" else args.precision
    result = train_variant(params, "tiny", precision, "single", work / "model", work / "data",
                           work / f"adapter-{args.worker}", resume="never", checkpoint_dir=work / f"ck-{args.worker}")
    wall = time.perf_counter() - t0
    m, t = result.metrics, result.timing
    print(json.dumps({"tokens_per_s": t["tokens_per_s"], "padding_efficiency": t["padding_efficiency"],
                      "epoch_efficiency": epoch_efficiency(params, work / "data", work / "model"),
                      "train_s": t["runtime_s"], "wall_s": wall, "peak_mb": t["peak_memory_bytes"] / 1e6,
                      "loss_last": m["train_loss_last"], "loss_mean": m["train_loss_mean"],
                      "tokens": m["train_tokens"], "examples": m["steps"] * args.batch_size,
                      "params_m": m["total_params"] / 1e6}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per mode (each sees steps x batch)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--rows", type=int, default=2000, help="generated rows (the epoch the efficiency covers)")
    ap.add_argument("--precision", default="bf16", choices=["fp16", "bf16", "int8", "nf4", "fp32"],
                    help="a project precision, or fp32 (bench only: fp32 weights, no autocast)")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="off by default, as in issue 14")
    ap.add_argument("--repeats", type=int, default=1, help="rounds of all modes; prints each mode's median")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--worker", choices=list(MODES), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        work = Path(tmp)
        build(work, args.rows, args.max_length, 0)
        runs = {mode: [] for mode in args.modes}
        for _ in range(args.repeats):  # rounds of every mode: a machine's changing load hits all of them
            for mode in args.modes:
                cmd = [sys.executable, __file__, "--worker", mode, "--work", str(work)] + [
                    a for k, v in vars(args).items() if k not in ("worker", "work", "modes") and v is not False
                    for a in (f"--{k.replace('_', '-')}", *([] if v is True else [str(v)]))]
                out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, check=False,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})
                if out.returncode:
                    sys.exit(f"{mode} failed:\n{out.stderr[-3000:]}")
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    # Each mode's median run by tokens/s (the losses are the same in every run of a mode).
    results = {mode: sorted(r, key=lambda x: x["tokens_per_s"])[len(r) // 2] for mode, r in runs.items()}
    first = next(iter(results.values()))
    spread = {m: [round(x["tokens_per_s"]) for x in r] for m, r in runs.items()}
    print(f"{first['params_m']:.1f}M-param Llama (random weights), builtin tokenizer, {args.rows} alpaca_data_zh-like "
          f"rows, max_length {args.max_length}, bs {args.batch_size}, {args.steps} steps "
          f"({args.steps * args.batch_size} examples), {args.precision}, LoRA r8 all-linear, gradient checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    print(f"{'mode':8s} {'tokens/s':>9s} {'pad eff':>8s} {'eff/epoch':>9s} {'train s':>8s} {'wall s':>7s} "
          f"{'peak MB':>8s} {'loss last':>9s} {'loss mean':>9s} {'tokens':>7s} | x random: tokens/s  train s")
    ref = results.get("random")
    for mode, r in results.items():
        ratio = (f"{r['tokens_per_s'] / ref['tokens_per_s']:17.2f} {r['train_s'] / ref['train_s']:8.2f}"
                 if ref else "")
        print(f"{mode:8s} {r['tokens_per_s']:9.0f} {r['padding_efficiency']:8.3f} {r['epoch_efficiency']:9.3f} "
              f"{r['train_s']:8.1f} {r['wall_s']:7.1f} {r['peak_mb']:8.0f} {r['loss_last']:9.4f} "
              f"{r['loss_mean']:9.4f} {r['tokens']:7d} | {ratio}")
    if args.repeats > 1:
        print(f"median of {args.repeats} rounds; tokens/s of every run: {spread}")
    print(f"({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
