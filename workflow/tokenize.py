"""Conversations -> causal-LM training examples, for any `templates.Template`, batched on the fast tokenizer.

input_ids = the template's parts in order; labels = -100 on everything the user side says, the ids of every
trained reply and its stop tokens (the seeds' recipe, 001 `process_func`, generalised to chat formats).
Special tokens are inserted by id, never produced from text, so no tokenizer can split or drop them; plain
text parts are tokenized without special tokens, every variable text of a batch in one tokenizer call.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Sequence

from workflow.errors import ParamsError
from workflow.remote import own_code
from workflow.templates import BOS, EOS, Template, get_template, render_part, user_fields

IGNORE_INDEX = -100  # the label torch's cross-entropy skips: prompt tokens are not trained on
OVERLONG = ("drop", "truncate_prompt", "truncate_end")  # what to do with examples over max_length
_SHRINKABLE = ("input", "instruction")  # row fields truncate_prompt shortens, in this order


def special_ids(tokenizer, template: Template) -> dict[str, int]:
    """Id of every special token the template uses; a clear error if the tokenizer lacks one."""
    ids = {}
    for name in sorted(template.specials()):
        if name in (EOS, BOS):
            token_id = tokenizer.eos_token_id if name == EOS else tokenizer.bos_token_id
            found = token_id is not None
        else:
            token_id = tokenizer.convert_tokens_to_ids(name)
            found = token_id is not None and token_id != tokenizer.unk_token_id and \
                tokenizer.convert_ids_to_tokens(token_id) == name
        if not found:
            what = f"{name} token" if name in (EOS, BOS) else f"single token {name!r}"
            raise ParamsError(
                f"tokenizer {tokenizer.name_or_path!r} has no {what}, which template '{template.name}' "
                "needs; pick the model's own template in models.<key>.template"
            )
        ids[name] = token_id
    return ids


def prepare_tokenizer(tokenizer, template: Template):
    """Set the pad token (template's, else the tokenizer's, else eos: the seeds' rule) and right padding."""
    if template.pad is not None:
        tokenizer.pad_token = template.pad
        special_ids(tokenizer, template)  # fails clearly if the template's pad is not a token of this vocab
    elif tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ParamsError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an eos token; pick a "
                              "template with a pad token in models.<key>.template")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"  # left padding kept the seeds' loss from converging (fp16 NaN)
    return tokenizer


def load_tokenizer(model_dir, trust_remote_code: bool = False, template: str = "human_assistant"):
    """The model's tokenizer with the seeds' training settings (`prepare_tokenizer`). A tokenizer of the
    model's own code is tried on one padded batch here, where code written for transformers 4 breaks."""
    from transformers import AutoTokenizer

    with own_code(model_dir, trust_remote_code, "tokenizer"):
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), trust_remote_code=trust_remote_code)
        prepare_tokenizer(tokenizer, get_template(template))
        if trust_remote_code:
            tokenizer(["a probe", "of padding"], padding=True)
    return tokenizer


def batch_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of `texts` without special tokens, in one call: on a fast tokenizer straight from its Rust
    backend (no offsets, no per-text Python conversion), else through the tokenizer's own __call__."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None:
        return tokenizer(texts, add_special_tokens=False)["input_ids"]
    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)
    return [e.ids for e in encode_batch(texts, add_special_tokens=False)]


def conversation_parts(row: dict, template: Template, last_turn_only: bool = False) -> list[tuple]:
    """The row as (part, fields, labelled) triples: the plan `encode` turns into ids; -1 marks the reply."""
    turns = [(user_fields(u), a) for u, a in row.get("history") or ()]
    turns.append((user_fields(row["instruction"], row.get("input") or ""), row["output"]))
    system = row.get("system") or template.default_system
    plan: list[tuple] = [(p, None, False) for p in template.prefix]
    label_next = False
    for i, (fields, reply) in enumerate(turns):
        last = i == len(turns) - 1
        user = template.user
        if i == 0 and system:
            user = template.user_with_system or template.system + template.user
            fields = {**fields, "system": system}
        elif i > 0:
            plan += [(p, None, False) for p in template.separator]
        for j, part in enumerate(user):
            plan.append((part, fields, label_next and j == 0))
        trained = last or not last_turn_only
        if last:
            plan.append((None, None, -1))  # where the final reply starts (prompt/response boundary)
        plan += [(p, {"response": reply}, trained) for p in template.response]
        stop = template.stop if last or template.history_stop is None else template.history_stop
        plan += [(p, None, trained) for p in stop]
        label_next = trained and template.label_next_role
    return plan


def render_conversation(row: dict, template: Template) -> tuple[str, str]:
    """(prompt, whole conversation) as the template lays them out, special tokens written by name: what two
    rows are compared by (equal text, equal training example, whatever the tokenizer)."""
    text = []
    prompt = ""
    for part, fields, _ in conversation_parts(row, template):
        if part is None:
            prompt = "".join(text)
        else:
            text.append(part.special if part.special is not None else render_part(part, fields or {}))
    return prompt, "".join(text)


def encode(rows: Sequence[dict], tokenizer, template: Template, last_turn_only: bool = False):
    """(input_ids, labels, reply_start) per row, untruncated; all variable texts in one tokenizer call."""
    specials = special_ids(tokenizer, template)
    constant: dict[str, list[int]] = {}
    texts: list[str] = []
    plans = []
    for row in rows:
        plan = []
        for part, fields, labelled in conversation_parts(row, template, last_turn_only):
            if part is None:
                plan.append((None, labelled))
            elif part.special is not None:
                plan.append(([specials[part.special]], labelled))
            elif "{" not in part.text:
                text = render_part(part, {})
                if text not in constant:
                    constant[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
                plan.append((constant[text], labelled))
            else:
                texts.append(render_part(part, fields))
                plan.append((len(texts) - 1, labelled))
        plans.append(plan)
    encoded = batch_ids(tokenizer, texts) if texts else []
    out = []
    for plan in plans:
        ids: list[int] = []
        labels: list[int] = []
        reply_start = 0
        for piece, labelled in plan:
            if piece is None:
                reply_start = len(ids)
                continue
            piece_ids = encoded[piece] if isinstance(piece, int) else piece
            ids += piece_ids
            labels += piece_ids if labelled else [IGNORE_INDEX] * len(piece_ids)
        out.append((ids, labels, reply_start))
    return out


def _shorten(row: dict, tokenizer, excess: int) -> dict | None:
    """The row with `excess` tokens cut from the end of its input, then instruction; None if impossible."""
    row = dict(row)
    for key in _SHRINKABLE:
        ids = tokenizer(row.get(key) or "", add_special_tokens=False)["input_ids"]
        cut = min(len(ids), excess)
        if cut:
            row[key] = tokenizer.decode(ids[: len(ids) - cut])
            excess -= cut
        if excess <= 0:
            return row
    return None


def tokenize_rows(
    rows: Sequence[dict], tokenizer, template: Template, max_length: int,
    overlong: str = "truncate_end", last_turn_only: bool = False,
) -> tuple[dict[str, list[list[int]]], dict[str, list[int]]]:
    """Tokenize rows; return (columns, outcome) with outcome's lists of row indices per fate.

    Columns: input_ids, attention_mask, labels, reply_start (where the final reply starts: the generation
    prompt is input_ids[:reply_start]; kept rows only, in order). Outcome keys: `kept`,
    `truncated`, `eos_truncated` (truncate_end cut the stop token away) and `too_long` (dropped: over
    max_length with `drop`, or nothing left to learn / the reply alone too long for the other modes).
    """
    if overlong not in OVERLONG:
        raise ValueError(f"data.overlong: '{overlong}' is not one of {', '.join(OVERLONG)}")
    with _no_gc():
        return _tokenize_rows(rows, tokenizer, template, max_length, overlong, last_turn_only)


@contextlib.contextmanager
def _no_gc():
    """Pause Python's cyclic garbage collector: building millions of id lists (which hold no cycles) would
    otherwise trigger collections that rescan every list built so far, ~25% of the step on 50k rows."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _tokenize_rows(rows, tokenizer, template, max_length, overlong, last_turn_only):
    columns: dict[str, list] = {"input_ids": [], "attention_mask": [], "labels": [], "reply_start": []}
    outcome: dict[str, list[int]] = {"kept": [], "truncated": [], "eos_truncated": [], "too_long": []}
    for i, (ids, labels, start) in enumerate(encode(rows, tokenizer, template, last_turn_only)):
        if len(ids) > max_length:
            if overlong == "truncate_prompt":
                fitted = _fit_prompt(rows[i], tokenizer, template, max_length, last_turn_only, len(ids) - max_length)
                if fitted is None:
                    outcome["too_long"].append(i)
                    continue
                ids, labels, start = fitted
            elif overlong == "truncate_end":
                ids, labels = ids[:max_length], labels[:max_length]
                if labels.count(IGNORE_INDEX) == len(labels):
                    outcome["too_long"].append(i)  # the prompt alone fills max_length: nothing to learn
                    continue
                outcome["eos_truncated"].append(i)  # the stop token is last, so any cut removes it
            else:
                outcome["too_long"].append(i)
                continue
            outcome["truncated"].append(i)
        outcome["kept"].append(i)
        columns["input_ids"].append(ids)
        columns["attention_mask"].append([1] * len(ids))
        columns["labels"].append(labels)
        columns["reply_start"].append(min(start, len(ids)))
    return columns, outcome


def _fit_prompt(row, tokenizer, template, max_length, last_turn_only, excess):
    """Shorten the row's prompt text until the example fits (a decode/encode round trip may differ)."""
    for _ in range(4):
        row = _shorten(row, tokenizer, excess)
        if row is None:
            return None
        ids, labels, start = encode([row], tokenizer, template, last_turn_only)[0]
        excess = len(ids) - max_length
        if excess <= 0:
            return ids, labels, start
    return None


def stop_ids(tokenizer, template: Template) -> list[int]:
    """Ids of the template's stop words, in order (eos: the tokenizer's own): what generation stops at."""
    ids = special_ids(tokenizer, template)
    return list(dict.fromkeys(ids[name] for name in template.stop_words))


def left_pad(prompts: Sequence[list[int]], tokenizer):
    """Prompts left-padded for batched generation (torch tensors); the tokenizer keeps right padding."""
    return tokenizer.pad({"input_ids": list(prompts)}, padding=True, padding_side="left", return_tensors="pt")


def generation_batch(rows: Sequence[dict], tokenizer, template: Template):
    """Prompts of the rows' final turns (cut at `reply_start`), left-padded for batched generation."""
    return left_pad([ids[:start] for ids, _, start in encode(rows, tokenizer, template)], tokenizer)
