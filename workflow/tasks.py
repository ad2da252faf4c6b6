"""The project's own instruction tasks: deterministic, bilingual (Chinese/English), answers checkable.

`alpaca_rows` writes the default fine-tuning data (alpaca format); `corpus_texts` writes plain sentences
stating the same kind of facts, used to train the builtin tokenizer and pre-train the builtin model, so the
base knows the facts and fine-tuning only has to teach the instruction format and when to stop.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# Every task draws from a small finite domain (a few hundred facts at most), so the builtin model sees each
# fact many times in pre-training and fine-tuning has only to teach the format and when to stop.
_DIGITS_ZH = "零一二三四五六七八九"
_WORDS = (
    "apple river stone cloud green music paper light water table happy orange silver garden window "
    "bridge candle forest planet rabbit summer winter yellow pencil rocket tiger coffee dragon"
).split()
_WORDS_ZH = {"猫": "cat", "狗": "dog", "水": "water", "火": "fire", "山": "mountain", "书": "book",
             "花": "flower", "鱼": "fish", "月": "moon", "日": "sun", "雨": "rain", "树": "tree"}


def number_zh(n: int) -> str:
    """Chinese numeral for 0 <= n < 100 (e.g. 37 -> 三十七)."""
    if n < 10:
        return _DIGITS_ZH[n]
    tens, ones = divmod(n, 10)
    head = "" if tens == 1 else _DIGITS_ZH[tens]
    return head + "十" + (_DIGITS_ZH[ones] if ones else "")


# Each task returns (instruction, input, output, fact sentence for the corpus).
Task = Callable[[random.Random], tuple[str, str, str, str]]


def _add_en(rng: random.Random):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return "Add the two numbers.", f"{a} + {b}", str(a + b), f"{a} + {b} = {a + b}."


def _add_zh(rng: random.Random):
    a, b = rng.randint(0, 9), rng.randint(0, 9)
    return "计算两个数的和。", f"{a} + {b}", str(a + b), f"{a} 加 {b} 等于 {a + b}。"


def _reverse_en(rng: random.Random):
    w = rng.choice(_WORDS)
    return "Reverse the letters of the word.", w, w[::-1], f"{w} reversed is {w[::-1]}."


def _reverse_zh(rng: random.Random):
    w = rng.choice(_WORDS)
    return "把这个单词的字母倒过来写。", w, w[::-1], f"{w} 倒过来写是 {w[::-1]}。"


def _upper_en(rng: random.Random):
    w = rng.choice(_WORDS)
    return "Write the word in capital letters.", w, w.upper(), f"{w} in capital letters is {w.upper()}."


def _count_en(rng: random.Random):
    w = rng.choice(_WORDS)
    return "How many letters does the word have?", w, str(len(w)), f"{w} has {len(w)} letters."


def _number_zh(rng: random.Random):
    n = rng.randint(0, 99)
    return "把数字写成中文。", str(n), number_zh(n), f"{n} 写成中文是{number_zh(n)}。"


def _max_en(rng: random.Random):
    a, b = rng.sample(range(20), 2)
    return "Which number is larger?", f"{a}, {b}", str(max(a, b)), f"{max(a, b)} is larger than {min(a, b)}."


def _translate_zh(rng: random.Random):
    zh, en = rng.choice(sorted(_WORDS_ZH.items()))
    return "把这个汉字翻译成英文。", zh, en, f"{zh} 的英文是 {en}。"


def _first_en(rng: random.Random):
    w = rng.choice(_WORDS)
    return "What is the first letter of the word?", w, w[0], f"The first letter of {w} is {w[0]}."


TASKS: tuple[Task, ...] = (_add_en, _add_zh, _reverse_en, _reverse_zh, _upper_en, _count_en, _number_zh,
                           _max_en, _translate_zh, _first_en)


def alpaca_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` alpaca rows (instruction, input, output), cycling through every task; same seed, same rows."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        instruction, input_text, output, _ = TASKS[i % len(TASKS)](rng)
        rows.append({"instruction": instruction, "input": input_text, "output": output})
    return rows


def corpus_texts(n: int, seed: int) -> list[str]:
    """`n` plain fact sentences over the same tasks (a different stream from `alpaca_rows`)."""
    rng = random.Random(seed + 1)  # offset: the corpus is not the fine-tuning data verbatim
    return [TASKS[i % len(TASKS)](rng)[3] for i in range(n)]
