"""Quality of generated answers: exact match, ROUGE-1/2/L, BLEU-4, generation length, eos-stop rate.

Pure Python, no torch, so every metric is tested on hand-made strings with known answers.

Tokenization for ROUGE and BLEU is by **characters**: every non-whitespace character is one token. Chinese
has no spaces between words, so word-level scores would treat a whole answer as one token; characters are
the usual unit for Chinese ROUGE/BLEU and work the same for the English answers (letter by letter).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence


def char_tokens(text: str) -> list[str]:
    """Every non-whitespace character of `text`, in order."""
    return [c for c in text if not c.isspace()]


def normalize(text: str) -> str:
    """The form compared by exact match: surrounding whitespace removed, inner runs collapsed to one space."""
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> bool:
    """True when the answer is exactly the reference (after `normalize`)."""
    return normalize(prediction) == normalize(reference)


def _ngrams(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _f1(overlap: int, n_pred: int, n_ref: int) -> float:
    # A text too short to have any n-gram scores 0, as in the reference ROUGE implementations: ROUGE-2 of a
    # one-character answer is 0 even when it is right (exact match covers that case).
    if overlap == 0:
        return 0.0
    precision, recall = overlap / n_pred, overlap / n_ref
    return 2 * precision * recall / (precision + recall)


def rouge_n(prediction: str, reference: str, n: int) -> float:
    """ROUGE-N F1 over character n-grams (clipped counts)."""
    pred, ref = _ngrams(char_tokens(prediction), n), _ngrams(char_tokens(reference), n)
    return _f1(sum((pred & ref).values()), sum(pred.values()), sum(ref.values()))


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1: longest common character subsequence."""
    pred, ref = char_tokens(prediction), char_tokens(reference)
    return _f1(_lcs_length(pred, ref), len(pred), len(ref))


def bleu4(predictions: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU-4 over characters (Papineni et al.): clipped 1-4-gram precisions, geometric mean, brevity
    penalty; no smoothing, so any n-gram order without a single match gives 0."""
    matches, totals = [0] * 4, [0] * 4
    pred_len = ref_len = 0
    for prediction, reference in zip(predictions, references, strict=True):
        pred, ref = char_tokens(prediction), char_tokens(reference)
        pred_len, ref_len = pred_len + len(pred), ref_len + len(ref)
        for n in range(1, 5):
            p, r = _ngrams(pred, n), _ngrams(ref, n)
            matches[n - 1] += sum((p & r).values())
            totals[n - 1] += sum(p.values())
    if pred_len == 0 or min(matches) == 0:
        return 0.0
    log_precision = sum(math.log(m / t) for m, t in zip(matches, totals)) / 4
    brevity = 1.0 if pred_len > ref_len else math.exp(1 - ref_len / pred_len)
    return brevity * math.exp(log_precision)


def quality(rows: Sequence[dict]) -> dict[str, float]:
    """Aggregate quality of prediction rows (`prediction`, `reference`, `stopped`, `tokens`).

    ROUGE scores are means of per-row F1; BLEU-4 is corpus-level; `eos_stop_rate` is the share of rows whose
    generation ended with one of the template's stop words (eos, ChatGLM3's <|user|>, Qwen's <|im_end|>, ...)
    within `max_new_tokens`; `avg_gen_tokens` counts generated tokens before the stop.
    """
    if not rows:
        raise ValueError("no predictions to score")
    n = len(rows)
    preds, refs = [r["prediction"] for r in rows], [r["reference"] for r in rows]
    return {
        "exact_match": sum(exact_match(p, r) for p, r in zip(preds, refs)) / n,
        "rouge1": sum(rouge_n(p, r, 1) for p, r in zip(preds, refs)) / n,
        "rouge2": sum(rouge_n(p, r, 2) for p, r in zip(preds, refs)) / n,
        "rougeL": sum(rouge_l(p, r) for p, r in zip(preds, refs)) / n,
        "bleu4": bleu4(preds, refs),
        "avg_gen_tokens": sum(r["tokens"] for r in rows) / n,
        "eos_stop_rate": sum(bool(r["stopped"]) for r in rows) / n,
    }
