"""Step `evaluate`: eval loss and perplexity of the base, the adapter model and the merged model.

The base and the adapter model are loaded as trained (quantized for int8/nf4), so the numbers show what the
precision costs; the merged model is the unquantized base with the adapter folded in, as it will be served.
Every loss is the token-weighted mean cross-entropy over the eval split's response tokens.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path

from peft import PeftModel

from workflow import cli
from workflow.io import write_json_atomic
from workflow.merge import check_adapter
from workflow.modeling import eval_batches, load_base, load_tokenizer, load_unquantized, token_loss
from workflow.params import Params, variant_id
from workflow.precision import resolve_precision

log = logging.getLogger(__name__)


def evaluate_variant(
    params: Params, model: str, precision: str, strategy: str,
    model_dir: Path, adapter_dir: Path, merged_dir: Path, data_dir: Path,
) -> dict:
    """Loss and perplexity of base, adapter and merged model on the eval split."""
    check_adapter(adapter_dir)
    entry = params.models[model]
    plan = resolve_precision(precision)
    tokenizer = load_tokenizer(model_dir, entry.trust_remote_code, entry.template)
    ev = params.evaluate
    batches = eval_batches(data_dir, tokenizer, ev.per_device_eval_batch_size, ev.max_eval_rows)

    base = load_base(model_dir, plan, entry.trust_remote_code).eval()
    losses = {"base": token_loss(base, batches)[0]}
    adapted = PeftModel.from_pretrained(base, str(adapter_dir)).eval()  # wraps `base` in place
    losses["adapter"], tokens = token_loss(adapted, batches)
    del adapted, base
    merged = load_unquantized(merged_dir, plan.load_dtype, plan.device, entry.trust_remote_code).eval()
    losses["merged"] = token_loss(merged, batches)[0]

    metrics: dict[str, object] = {
        "variant": variant_id(model, precision, strategy),
        "eval_rows": sum(len(b["input_ids"]) for b in batches),
        "eval_tokens": tokens,
    }
    for name, loss in losses.items():
        metrics[f"eval_loss_{name}"] = loss
        metrics[f"perplexity_{name}"] = math.exp(loss)
    log.info("%s: eval loss base %.4f -> adapter %.4f, merged %.4f",
             metrics["variant"], losses["base"], losses["adapter"], losses["merged"])
    return metrics


def main(argv: Sequence[str] | None = None) -> int:
    p = cli.parser("evaluate", __doc__, variant=True)
    p.add_argument("--model-dir", required=True, type=Path, help="output of the download step")
    p.add_argument("--adapter", required=True, type=Path, help="output of the train step")
    p.add_argument("--merged", required=True, type=Path, help="output of the merge step")
    p.add_argument("--data", required=True, type=Path, help="output of the preprocess step")
    p.add_argument("--metrics", required=True, type=Path, help="evaluation metrics JSON to write")
    args = p.parse_args(argv)
    params = cli.load_checked(args)
    metrics = evaluate_variant(
        params, args.model, args.precision, args.strategy, args.model_dir, args.adapter, args.merged, args.data
    )
    write_json_atomic(args.metrics, metrics)
    return 0


if __name__ == "__main__":
    raise SystemExit(cli.run(main))
