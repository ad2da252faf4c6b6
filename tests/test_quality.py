"""Every evaluation metric on hand-made cases whose answers are worked out by hand."""

import math

import pytest
import torch

from workflow.quality import bleu4, char_tokens, exact_match, quality, rouge_l, rouge_n


def row(prediction, reference, stopped=True, tokens=1):
    return {"prediction": prediction, "reference": reference, "stopped": stopped, "tokens": tokens}


def test_char_tokens_split_chinese_and_english_by_character():
    assert char_tokens("三十七") == ["三", "十", "七"]
    assert char_tokens(" AB c\n") == ["A", "B", "c"]


def test_exact_match_ignores_surrounding_whitespace_only():
    assert exact_match(" 十九 ", "十九")
    assert exact_match("a  b", "a b")
    assert not exact_match("七十九", "十九")
    assert not exact_match("Apple", "apple")


def test_rouge_on_known_strings():
    # pred 七十九 vs ref 十九: unigrams overlap 2 (十, 九): P 2/3, R 2/2 -> F1 0.8
    assert rouge_n("七十九", "十九", 1) == pytest.approx(0.8)
    # bigrams {七十, 十九} vs {十九}: overlap 1: P 1/2, R 1 -> F1 2/3
    assert rouge_n("七十九", "十九", 2) == pytest.approx(2 / 3)
    # LCS(abcde, axcye) = ace = 3: P 3/5, R 3/5 -> 0.6
    assert rouge_l("abcde", "axcye") == pytest.approx(0.6)
    assert rouge_n("aab", "ab", 1) == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))  # clipped counts: one 'a' matches
    assert rouge_n("5", "5", 2) == 0.0  # no bigrams at all: 0, as reference ROUGE implementations do
    assert rouge_l("", "abc") == 0.0 and rouge_n("abc", "xyz", 1) == 0.0
    assert rouge_l("十九", "十九") == 1.0


def test_bleu4_on_known_strings():
    assert bleu4(["abcde"], ["abcde"]) == pytest.approx(1.0)
    assert bleu4(["abc"], ["abc"]) == 0.0  # no 4-gram in either: unsmoothed corpus BLEU-4 is 0
    # pred abcdx vs ref abcde: precisions 4/5, 3/4, 2/3, 1/2; same length -> no brevity penalty
    assert bleu4(["abcdx"], ["abcde"]) == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    # pred abcd vs ref abcdef: all precisions 1, brevity penalty exp(1 - 6/4)
    assert bleu4(["abcd"], ["abcdef"]) == pytest.approx(math.exp(1 - 6 / 4))
    # corpus level: n-gram counts and lengths are summed over rows before the ratios
    corpus = bleu4(["abcd", "xyz"], ["abcd", "xyw"])
    # abcd/abcd matches every n-gram; xyz/xyw matches x, y and xy; both pairs have equal lengths
    matches = [4 + 2, 3 + 1, 2 + 0, 1 + 0]
    totals = [4 + 3, 3 + 2, 2 + 1, 1 + 0]
    expected = math.prod(m / t for m, t in zip(matches, totals)) ** 0.25
    assert corpus == pytest.approx(expected)


def test_quality_aggregates_exact_match_eos_stop_rate_and_length():
    rows = [
        row("十九", "十九", stopped=True, tokens=2),
        row("mountain", "mountain", stopped=True, tokens=1),
        row("12 12 12 12", "12", stopped=False, tokens=16),  # ran to max_new_tokens: the missing-eos bug
        row("", "r", stopped=True, tokens=0),
    ]
    q = quality(rows)
    assert q["exact_match"] == 0.5
    assert q["eos_stop_rate"] == 0.75
    assert q["avg_gen_tokens"] == (2 + 1 + 16 + 0) / 4
    assert q["rouge1"] == pytest.approx((1 + 1 + 2 * (2 / 8) * 1 / (2 / 8 + 1) + 0) / 4)
    with pytest.raises(ValueError, match="no predictions"):
        quality([])


def test_bits_per_param_of_known_quantized_layers():
    """A 512x256 Linear: nf4 + double quant packs 131072 params into 65536 bytes, 2048 uint8 absmax (one per
    64), 8 fp32 second-level absmax (one per 256 absmax) and an fp32 offset -> 4.1272 bits; LLM.int8 is one
    byte per param plus an fp32 scale per output row -> 8.125 bits."""
    import bitsandbytes as bnb

    from workflow.modeling import linear_weight_bits

    nf4 = torch.nn.Sequential(bnb.nn.Linear4bit(256, 512, bias=False, compute_dtype=torch.bfloat16,
                                                quant_type="nf4", compress_statistics=True)).to("cpu")
    bits = linear_weight_bits(nf4)
    assert bits["linear_params"] == 131072
    assert bits["linear_weight_bytes"] == 65536 + 2048 + 8 * 4 + 4
    assert bits["linear_bits_per_param"] == pytest.approx(4.1272, abs=1e-4)
    assert bits["linear_storage"] == "nf4+double_quant"

    int8 = torch.nn.Sequential(bnb.nn.Linear8bitLt(256, 512, bias=False, has_fp16_weights=False)).to("cpu")
    assert linear_weight_bits(int8)["linear_bits_per_param"] == pytest.approx(8 + 32 / 256)

    plain = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False).to(torch.bfloat16))
    assert linear_weight_bits(plain) == {"linear_params": 131072, "linear_weight_bytes": 262144,
                                         "linear_bits_per_param": 16.0, "linear_storage": "bfloat16"}
