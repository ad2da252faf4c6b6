"""Step `evaluate`: loss, perplexity and generation quality of the base, the adapter model and the merged model.

The base and the adapter model are loaded as trained (quantized for int8/nf4), so the numbers show what the
precision costs; the merged model is the unquantized base with the adapter folded in, as it will be served.
Every loss is the token-weighted mean cross-entropy over the eval split's response tokens.

Generation: the prompt of each eval row is its input_ids where labels == -100 (the tokenized template
prompt), the reference its labelled ids without the final eos; both come from the same split the loss uses,
so nothing is re-rendered. Prompts are left-padded and decoded as `generate` in params.yaml says (greedy by
default). Every generation goes to the predictions JSONL; `workflow.quality` scores them. The metrics file
holds only values that are deterministic for a given params.yaml.
"""

from __future__ import annotations

import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch
from peft import PeftModel
from transformers import set_seed

from workflow import cli, devices
from workflow.io import write_json_atomic, write_text_atomic
from workflow.merge import check_adapter
from workflow.modeling import eval_batches, load_base, load_tokenizer, load_unquantized, logits_of, token_loss
from workflow.params import Generate, Params, variant_id
from workflow.precision import resolve_precision
from workflow.quality import quality

log = logging.getLogger(__name__)
MODELS = ("base", "adapter", "merged")
IGNORE_INDEX = -100  # label of prompt and padding tokens in the preprocessed splits


def prompts_and_references(batches: list[dict], eos_id: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) per eval row: the unlabelled prefix, and the labels minus the final eos."""
    pairs = []
    for batch in batches:
        for ids, labels, mask in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                     batch["attention_mask"].tolist()):
            n = sum(mask)  # right padding: the row's real tokens come first
            ids, labels = ids[:n], labels[:n]
            prompt_len = next((i for i, label in enumerate(labels) if label != IGNORE_INDEX), n)
            reference = [label for label in labels[prompt_len:] if label != IGNORE_INDEX]
            if reference and reference[-1] == eos_id:
                reference = reference[:-1]
            pairs.append((ids[:prompt_len], reference))
    return pairs


def _left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = [[pad_id] * (width - len(p)) + p for p in prompts]
    mask = [[0] * (width - len(p)) + [1] * len(p) for p in prompts]
    return torch.tensor(ids), torch.tensor(mask)


@torch.no_grad()
def generate_answers(model, tokenizer, pairs: list[tuple[list[int], list[int]]], gen: Generate) -> list[dict]:
    """Generate from every prompt; one row per prompt with the texts, the stop flag and the length."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    device = next(model.parameters()).device
    options = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
                   repetition_penalty=gen.repetition_penalty, eos_token_id=eos, pad_token_id=pad, use_cache=True)
    if gen.do_sample:
        options.update(temperature=gen.temperature, top_p=gen.top_p)
    rows = []
    for start in range(0, len(pairs), gen.batch_size):
        chunk = pairs[start : start + gen.batch_size]
        ids, mask = _left_padded([p for p, _ in chunk], pad)
        out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **options)
        for (prompt, reference), new in zip(chunk, out[:, ids.shape[1]:].tolist()):
            stopped = eos in new
            answer = new[: new.index(eos)] if stopped else new
            rows.append({
                "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "reference": tokenizer.decode(reference, skip_special_tokens=True).strip(),
                "prediction": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                "stopped_at_eos": stopped,
                "tokens": len(answer),
            })
    return rows


@torch.no_grad()
def logit_gap(a, b, batches: list[dict]) -> float:
    """Largest |logit| difference between two models over the real tokens of `batches`."""
    gap = 0.0
    for batch in batches:
        la, lb = logits_of(a, batch), logits_of(b, batch)
        mask = batch["attention_mask"].bool().to(la.device)
        gap = max(gap, float((la - lb.to(la.device)).abs()[mask].max()))
    return gap


def evaluate_variant(
    params: Params, model: str, precision: str, strategy: str,
    model_dir: Path, adapter_dir: Path, merged_dir: Path, data_dir: Path,
) -> tuple[dict, list[dict]]:
    """Metrics of base, adapter and merged model on the eval split, and every generation (rows with `model`)."""
    check_adapter(adapter_dir)
    set_seed(params.seed)  # only sampling (generate.do_sample) draws random numbers
    entry = params.models[model]
    plan = resolve_precision(precision)
    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    ev = params.evaluate
    batches = eval_batches(data_dir, tokenizer, ev.per_device_eval_batch_size, ev.max_eval_rows)
    pairs = prompts_and_references(batches, tokenizer.eos_token_id)

    losses, predictions = {}, {}
    base = load_base(model_dir, plan, entry.trust_remote_code).eval()
    losses["base"] = token_loss(base, batches)[0]
    predictions["base"] = generate_answers(base, tokenizer, pairs, params.generate)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()  # wraps `base` in place
    losses["adapter"], tokens = token_loss(adapted, batches)
    predictions["adapter"] = generate_answers(adapted, tokenizer, pairs, params.generate)
    merged = load_unquantized(merged_dir, plan.load_dtype, plan.device, entry.trust_remote_code).eval()
    losses["merged"] = token_loss(merged, batches)[0]
    predictions["merged"] = generate_answers(merged, tokenizer, pairs, params.generate)
    # The QLoRA merge gap: the model as trained (quantized base + adapter) vs the merged unquantized model.
    gap = logit_gap(adapted, merged, batches)
    del adapted, base, merged

    metrics: dict[str, object] = {
        "variant": variant_id(model, precision, strategy),
        "eval_rows": len(pairs),
        "eval_tokens": tokens,
        "max_new_tokens": params.generate.max_new_tokens,
        "trained_vs_merged_max_abs_logit_diff": gap,
        "trained_vs_merged_loss_gap": losses["merged"] - losses["adapter"],
    }
    for name in MODELS:
        metrics[f"eval_loss_{name}"] = losses[name]
        metrics[f"perplexity_{name}"] = math.exp(losses[name])
        for key, value in quality(predictions[name]).items():
            metrics[f"{key}_{name}"] = value
    log.info("%s: eval loss base %.4f -> adapter %.4f, merged %.4f; exact match merged %.3f, eos-stop %.3f",
             metrics["variant"], losses["base"], losses["adapter"], losses["merged"],
             metrics["exact_match_merged"], metrics["eos_stop_rate_merged"])
    rows = [{"model": name, "row": i, **r} for name in MODELS for i, r in enumerate(predictions[name])]
    return metrics, rows


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("evaluate", __doc__, variant=True)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--adapter", required=True, type=Path, help="output of the train step")
    p.add_argument("--merged", required=True, type=Path, help="output of the merge step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step")
    p.add_argument("--metrics", required=True, type=Path, help="evaluation metrics JSON to write")
    p.add_argument("--predictions", required=True, type=Path, help="generations JSONL to write")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    d = params.distributed  # one GPU, leased like the train step's (see workflow/devices.py)
    devices.lease_then_reexec(1, d.gpu_lock_dir, d.gpu_wait_s, variant_id(args.model, args.precision, args.strategy),
                              "workflow.evaluate", argv)
    metrics, rows = evaluate_variant(
        params, args.model, args.precision, args.strategy, args.model_dir, args.adapter, args.merged, args.data
    )
    write_text_atomic(args.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
