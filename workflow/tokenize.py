"""Alpaca rows -> causal-LM training examples, the seeds' recipe (001 `process_func`) batched.

input_ids = prompt + response + [eos]; attention_mask all 1; labels = [-100]*len(prompt) + response + [eos].
The eos is appended as its id, never as text, so no tokenizer can split or drop it. Everything that varies
between chat formats comes from the `templates.Template` (data); this code is the same for every template.
"""

from __future__ import annotations

from collections.abc import Sequence

from workflow.templates import Template, render_prompt

IGNORE_INDEX = -100  # the label torch's cross-entropy skips: prompt tokens are not trained on


def ensure_pad_token(tokenizer) -> None:
    """Use eos as pad when the tokenizer has none (the seeds' rule) and pad on the right for training."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # left padding kept the seeds' loss from converging


def tokenize_rows(
    rows: Sequence[dict], tokenizer, template: Template, max_length: int
) -> tuple[dict[str, list[list[int]]], dict[str, int]]:
    """Tokenize alpaca rows in two batched calls; return (columns, counts).

    Columns: input_ids, attention_mask, labels. Examples longer than `max_length` are cut from the end (as
    the seeds do), which drops the eos. Counts: `truncated` examples, `eos_truncated` (eos cut away) and
    `no_labels` (not one response token left).
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos token; the template needs one")
    columns: dict[str, list[list[int]]] = {"input_ids": [], "attention_mask": [], "labels": []}
    counts = {"truncated": 0, "eos_truncated": 0, "no_labels": 0}
    if not rows:
        return columns, counts
    prompts = [render_prompt(template, r["instruction"], r.get("input") or "") for r in rows]
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer([r["output"] for r in rows], add_special_tokens=False)["input_ids"]
    for p, r in zip(prompt_ids, response_ids):
        ids = p + r + [eos]
        labels = [IGNORE_INDEX] * len(p) + r + [eos]
        if len(ids) > max_length:
            counts["truncated"] += 1
            counts["eos_truncated"] += 1  # the eos is the last token, so any cut from the end removes it
            ids, labels = ids[:max_length], labels[:max_length]
            if all(x == IGNORE_INDEX for x in labels):
                counts["no_labels"] += 1  # the prompt alone fills max_length: nothing left to learn
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
    return columns, counts
