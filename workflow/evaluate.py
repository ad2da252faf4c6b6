"""Step `evaluate`: loss, perplexity and generation quality of the base, the adapter model and the merged model.

The base and the adapter model are loaded as trained (quantized for int8/nf4), so the numbers show what the
precision costs; the merged model is the unquantized base with the adapter folded in, as it will be served.
For int8/nf4 the merge target not chosen (`merge.target`) is merged here too, in memory, for its gap to the
model as trained and its eval loss: the report shows both targets.
Every loss is the token-weighted mean cross-entropy over the eval split's response tokens.

Generation: the prompt of each eval row is its input_ids before the final reply (`reply_start`, written by
preprocess: after every earlier turn), the reference that reply's labels without its stop token; both come
from the same split the loss uses, so nothing is re-rendered. Prompts are left-padded and decoded as
`generate` in params.yaml says (greedy by default) until any of the template's stop words. Every generation goes to the predictions JSONL; `workflow.quality` scores them. The metrics file
holds only values that are deterministic for a given params.yaml.
"""

from __future__ import annotations

import gc
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
from workflow.merge import TARGETS, check_adapter, load_adapter, load_merge_base, merge_target
from workflow.modeling import (eval_batches, load_base, load_tokenizer, load_unquantized, logits_of, peak_memory,
                               token_loss)
from workflow.params import Generate, Params, variant_id
from workflow.precision import resolve_precision
from workflow.provenance import provenance
from workflow.quality import quality
from workflow.templates import get_template
from workflow.tokenize import left_pad, stop_ids

log = logging.getLogger(__name__)
MODELS = ("base", "adapter", "merged")
IGNORE_INDEX = -100  # label of prompt and padding tokens in the preprocessed splits


def prompts_and_references(batches: list[dict], stops: Sequence[int]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) per eval row: the ids before the final reply (`reply_start`: after every
    earlier turn of a multi-turn row), and that reply's labels without the stop token closing it."""
    pairs = []
    for batch in batches:
        for ids, labels, mask, start in zip(batch["input_ids"].tolist(), batch["labels"].tolist(),
                                            batch["attention_mask"].tolist(), batch["reply_start"].tolist()):
            n = sum(mask)  # right padding: the row's real tokens come first
            reference = [label for label in labels[start:n] if label != IGNORE_INDEX]
            if reference and reference[-1] in stops:
                reference = reference[:-1]
            pairs.append((ids[:start], reference))
    return pairs


@torch.no_grad()
def generate_answers(model, tokenizer, pairs: list[tuple[list[int], list[int]]], gen: Generate,
                     stops: Sequence[int]) -> list[dict]:
    """Generate from every prompt until any of `stops` (the template's stop words); one row per prompt with
    the texts (the prediction cut at the stop), whether and where it stopped, and its length."""
    device = next(model.parameters()).device
    # A list of ids: generation ends at any of them. Never None, which would override the model's own
    # generation config (a tokenizer without an eos token, as Qwen-1's, has eos_token_id None).
    options = dict(max_new_tokens=gen.max_new_tokens, do_sample=gen.do_sample, num_beams=gen.num_beams,
                   repetition_penalty=gen.repetition_penalty, eos_token_id=list(stops),
                   pad_token_id=tokenizer.pad_token_id, use_cache=True)
    if gen.do_sample:
        options.update(temperature=gen.temperature, top_p=gen.top_p)
    rows = []
    for start in range(0, len(pairs), gen.batch_size):
        chunk = pairs[start : start + gen.batch_size]
        batch = left_pad([p for p, _ in chunk], tokenizer)
        out = model.generate(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device), **options)
        for (prompt, reference), new in zip(chunk, out[:, batch["input_ids"].shape[1]:].tolist()):
            end = next((i for i, t in enumerate(new) if t in stops), None)
            answer = new if end is None else new[:end]
            rows.append({
                "prompt": tokenizer.decode(prompt, skip_special_tokens=True),
                "reference": tokenizer.decode(reference, skip_special_tokens=True).strip(),
                "prediction": tokenizer.decode(answer, skip_special_tokens=True).strip(),
                "stopped": end is not None,
                "stop": None if end is None else tokenizer.convert_ids_to_tokens(new[end]),
                "tokens": len(answer),
            })
    return rows


@torch.no_grad()
def logit_gap(reference: list[torch.Tensor], model, batches: list[dict]) -> float:
    """Largest |logit| difference between `reference` logits (CPU) and `model`'s over the real tokens."""
    gap = 0.0
    for ref, batch in zip(reference, batches):
        logits = logits_of(model, batch).cpu()
        gap = max(gap, float((logits - ref).abs()[batch["attention_mask"].bool()].max()))
    return gap


def free_device_memory(device: str) -> None:
    """Give freed tensors' memory back before the next model loads (CUDA's cache holds it otherwise)."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def evaluate_variant(
    params: Params, model: str, precision: str, strategy: str,
    model_dir: Path, adapter_dir: Path, merged_dir: Path, data_dir: Path,
) -> tuple[dict, list[dict]]:
    """Metrics of base, adapter and merged model on the eval split, every generation (rows with `model`), and
    the peak memory before the first model loaded."""
    check_adapter(adapter_dir)
    set_seed(params.seed)  # only sampling (generate.do_sample) draws random numbers
    entry = params.models[model]
    plan = resolve_precision(precision)
    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    ev = params.evaluate
    batches = eval_batches(data_dir, tokenizer, ev.per_device_eval_batch_size, ev.max_eval_rows)
    stops = stop_ids(tokenizer, get_template(entry.template))
    pairs = prompts_and_references(batches, stops)

    losses, predictions = {}, {}
    memory_before = peak_memory(plan.device)["peak_memory_bytes"]  # the process before any model: not models'
    base = load_base(model_dir, plan, entry.trust_remote_code).eval()
    losses["base"] = token_loss(base, batches)[0]
    predictions["base"] = generate_answers(base, tokenizer, pairs, params.generate, stops)
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()  # wraps `base` in place
    losses["adapter"], tokens = token_loss(adapted, batches)
    predictions["adapter"] = generate_answers(adapted, tokenizer, pairs, params.generate, stops)
    # Only one model on the device at a time: the trained model's logits for the merge gap wait on the CPU,
    # and it is freed before the merged model loads (two 7B fp16 models would not fit a 24 GB card).
    gap_batches = batches[: ev.logit_gap_batches]
    trained = [logits_of(adapted, b).cpu() for b in gap_batches]
    del adapted, base
    free_device_memory(plan.device)
    merged = load_unquantized(merged_dir, plan.load_dtype, plan.device, entry.trust_remote_code).eval()
    losses["merged"] = token_loss(merged, batches)[0]
    predictions["merged"] = generate_answers(merged, tokenizer, pairs, params.generate, stops)
    # The QLoRA merge gap: the model as trained (quantized base + adapter) vs the merged unquantized model.
    gap = logit_gap(trained, merged, gap_batches)
    del merged
    free_device_memory(plan.device)
    target = merge_target(params.merge.target, plan)
    by_target = {target: (gap, losses["merged"])}
    if plan.quantization is not None:  # the other target, merged in memory (one model at a time still)
        other = next(t for t in TARGETS if t != target)
        alt = load_adapter(load_merge_base(other, model_dir, plan, entry.trust_remote_code), adapter_dir)
        alt = alt.merge_and_unload().eval()
        by_target[other] = (logit_gap(trained, alt, gap_batches), token_loss(alt, batches)[0])
        del alt
        free_device_memory(plan.device)

    metrics: dict[str, object] = {
        "variant": variant_id(model, precision, strategy),
        "eval_rows": len(pairs),
        "eval_tokens": tokens,
        "max_new_tokens": params.generate.max_new_tokens,
        "trained_vs_merged_max_abs_logit_diff": gap,  # over the first evaluate.logit_gap_batches batches
        "trained_vs_merged_loss_gap": losses["merged"] - losses["adapter"],
        "merge_target": target,
    }
    for name, (target_gap, target_loss) in by_target.items():  # int8/nf4: both targets
        metrics[f"trained_vs_merged_max_abs_logit_diff_{name}"] = target_gap
        metrics[f"eval_loss_merged_{name}"] = target_loss
    for name in MODELS:
        metrics[f"eval_loss_{name}"] = losses[name]
        metrics[f"perplexity_{name}"] = math.exp(losses[name])
        for key, value in quality(predictions[name]).items():
            metrics[f"{key}_{name}"] = value
    log.info("%s: eval loss base %.4f -> adapter %.4f, merged %.4f; exact match merged %.3f, eos-stop %.3f",
             metrics["variant"], losses["base"], losses["adapter"], losses["merged"],
             metrics["exact_match_merged"], metrics["eos_stop_rate_merged"])
    rows = [{"model": name, "row": i, **r} for name in MODELS for i, r in enumerate(predictions[name])]
    return metrics, rows, memory_before


def evaluate_timing(params: Params, model: str, precision: str, strategy: str, model_dir: Path, merged_dir: Path,
                    before: int) -> dict:
    """What evaluating cost (varies from run to run, so not in the metrics): the step's peak memory, the
    memory in use before any model loaded (`before`: on a CPU the process with torch imported), and one
    merged model's weight bytes, so that `models_peak_over_one_model` ~1 shows one model held at a time."""
    def weights(path: Path) -> int:
        return sum(p.stat().st_size for p in Path(path).glob("*.safetensors"))

    device = resolve_precision(precision).device
    peak = peak_memory(device)
    one_model = weights(merged_dir)  # the unquantized dtype: the largest of the three models evaluated
    return {"variant": variant_id(model, precision, strategy), "base_weights_bytes": weights(model_dir),
            "merged_weights_bytes": one_model, **peak, "memory_before_models_bytes": before,
            "models_peak_over_one_model": round((peak["peak_memory_bytes"] - before) / one_model, 3),
            "made": provenance(device)}


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("evaluate", __doc__, variant=True)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--adapter", required=True, type=Path, help="output of the train step")
    p.add_argument("--merged", required=True, type=Path, help="output of the merge step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step")
    p.add_argument("--metrics", required=True, type=Path, help="evaluation metrics JSON to write")
    p.add_argument("--predictions", required=True, type=Path, help="generations JSONL to write")
    p.add_argument("--timing", required=True, type=Path, help="peak memory JSON to write")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    d = params.distributed  # one GPU, leased like the train step's (see workflow/devices.py)
    devices.lease_then_reexec(1, d.gpu_lock_dir, d.gpu_wait_s, variant_id(args.model, args.precision, args.strategy),
                              "workflow.evaluate", argv)
    metrics, rows, before = evaluate_variant(
        params, args.model, args.precision, args.strategy, args.model_dir, args.adapter, args.merged, args.data
    )
    write_text_atomic(args.predictions, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(args.timing, evaluate_timing(params, args.model, args.precision, args.strategy, args.model_dir,
                                                   args.merged, before))
    write_json_atomic(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
