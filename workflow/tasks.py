"""The project's own instruction tasks: deterministic, bilingual (Chinese/English), answers checkable.

`builtin_split` writes the default fine-tuning data (alpaca format, distinct rows, eval rows on held-out
words and numbers); `corpus_texts` writes plain sentences stating the same kind of facts, used to train the builtin tokenizer and pre-train the builtin model, so the
base knows the facts and fine-tuning only has to teach the instruction format and when to stop.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

from workflow.errors import ParamsError

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


@dataclass(frozen=True)
class Task:
    """One instruction task over a finite domain of values.

    draw: one value from an RNG (the corpus and `alpaca_rows` stream).  render: value -> (instruction, input,
    output, fact sentence).  domain: every value.  held_out_key: what "held out" means for a value, as
    (kind, value): a held-out key never appears in a train row of any task that shares its kind, so the
    eval rows ask for words and numbers no training answer showed.
    """

    draw: Callable[[random.Random], tuple]
    render: Callable[..., tuple[str, str, str, str]]
    domain: tuple[tuple, ...]
    held_out_key: Callable[..., tuple[str, object]]

    def __call__(self, rng: random.Random) -> tuple[str, str, str, str]:
        return self.render(*self.draw(rng))


def _word_task(instruction: str, answer: Callable[[str], str], fact: str) -> Task:
    return Task(draw=lambda rng: (rng.choice(_WORDS),),
                render=lambda w: (instruction, w, answer(w), fact.format(w=w, a=answer(w))),
                domain=tuple((w,) for w in _WORDS), held_out_key=lambda w: ("word", w))


def _add(instruction: str, fact: str) -> Task:
    return Task(draw=lambda rng: (rng.randint(0, 9), rng.randint(0, 9)),
                render=lambda a, b: (instruction, f"{a} + {b}", str(a + b), fact.format(a=a, b=b, s=a + b)),
                domain=tuple((a, b) for a in range(10) for b in range(10)),
                held_out_key=lambda a, b: ("number", a + b))


TASKS: tuple[Task, ...] = (
    _add("Add the two numbers.", "{a} + {b} = {s}."),
    _add("计算两个数的和。", "{a} 加 {b} 等于 {s}。"),
    _word_task("Reverse the letters of the word.", lambda w: w[::-1], "{w} reversed is {a}."),
    _word_task("把这个单词的字母倒过来写。", lambda w: w[::-1], "{w} 倒过来写是 {a}。"),
    _word_task("Write the word in capital letters.", str.upper, "{w} in capital letters is {a}."),
    _word_task("How many letters does the word have?", lambda w: str(len(w)), "{w} has {a} letters."),
    Task(draw=lambda rng: (rng.randint(0, 99),),
         render=lambda n: ("把数字写成中文。", str(n), number_zh(n), f"{n} 写成中文是{number_zh(n)}。"),
         domain=tuple((n,) for n in range(100)), held_out_key=lambda n: ("number", n)),
    Task(draw=lambda rng: tuple(rng.sample(range(20), 2)),
         render=lambda a, b: ("Which number is larger?", f"{a}, {b}", str(max(a, b)),
                              f"{max(a, b)} is larger than {min(a, b)}."),
         domain=tuple((a, b) for a in range(20) for b in range(20) if a != b),
         held_out_key=lambda a, b: ("number", max(a, b))),
    Task(draw=lambda rng: rng.choice(sorted(_WORDS_ZH.items())),
         render=lambda zh, en: ("把这个汉字翻译成英文。", zh, en, f"{zh} 的英文是 {en}。"),
         domain=tuple(sorted(_WORDS_ZH.items())), held_out_key=lambda zh, en: ("zh", zh)),
    _word_task("What is the first letter of the word?", lambda w: w[0], "The first letter of {w} is {a}."),
)
HELD_OUT_SHARE = 0.15  # of each key kind's values (words, numbers, characters) kept out of every train row


def _row(task: Task, value: tuple) -> dict[str, str]:
    instruction, input_text, output, _ = task.render(*value)
    return {"instruction": instruction, "input": input_text, "output": output}


def alpaca_rows(n: int, seed: int) -> list[dict[str, str]]:
    """`n` alpaca rows drawn at random (repeats possible), cycling through every task; same seed, same rows.
    Used for tokenizer corpora and as sample user data; the builtin experiment's data is `builtin_split`."""
    rng = random.Random(seed)
    return [_row(TASKS[i % len(TASKS)], TASKS[i % len(TASKS)].draw(rng)) for i in range(n)]


def held_out_keys(seed: int) -> set[tuple[str, object]]:
    """The held-out (kind, value) keys: each task gets at least HELD_OUT_SHARE of its rows held out, keys
    taken in a seeded order per kind (a key held out for one task is held out for every task of its kind)."""
    rng = random.Random(seed + 2)  # its own stream: the split does not move when the row streams change
    order: dict[str, list] = {}
    for task in TASKS:
        for value in task.domain:
            kind, key = task.held_out_key(*value)
            order.setdefault(kind, [])
            if key not in order[kind]:
                order[kind].append(key)
    for keys in order.values():
        rng.shuffle(keys)
    held: set[tuple[str, object]] = set()
    for task in TASKS:
        keys = [task.held_out_key(*v) for v in task.domain]
        kind = keys[0][0]
        for key in order[kind]:
            if sum(k in held for k in keys) >= math.ceil(HELD_OUT_SHARE * len(keys)):
                break
            if (kind, key) in keys:
                held.add((kind, key))
    return held


def _round_robin(pools: list[list[dict]], n: int) -> list[dict]:
    """Up to `n` rows taken one task at a time, so any prefix mixes every task that still has rows."""
    out: list[dict] = []
    while len(out) < n and any(pools):
        for pool in pools:
            if pool and len(out) < n:
                out.append(pool.pop())
    return out


def builtin_split(n_rows: int, eval_size: int, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval) alpaca rows of `builtin:tasks`: `n_rows` distinct rows in all, `eval_size` of them for
    eval. Eval rows are built only from held-out keys and train rows never use one, so the eval measures
    whether fine-tuning generalises to facts it was not shown (the base knows them all from pre-training)."""
    held = held_out_keys(seed)
    rng = random.Random(seed)
    train_pools, eval_pools = [], []
    for task in TASKS:
        values = list(task.domain)
        rng.shuffle(values)
        train_pools.append([_row(task, v) for v in values if task.held_out_key(*v) not in held])
        eval_pools.append([_row(task, v) for v in values if task.held_out_key(*v) in held])
    eval_rows = _round_robin(eval_pools, eval_size)
    train_rows = _round_robin(train_pools, n_rows - eval_size)
    if len(eval_rows) < eval_size:
        raise ParamsError(f"data.eval_size: builtin:tasks holds out {len(eval_rows)} distinct rows, fewer than "
                          f"{eval_size}; lower data.eval_size")
    if len(train_rows) < n_rows - eval_size:
        raise ParamsError(f"data.builtin_rows: builtin:tasks has {len(train_rows) + eval_size} distinct rows "
                          f"for eval_size {eval_size}, fewer than {n_rows}; lower data.builtin_rows")
    return train_rows, eval_rows


def corpus_texts(n: int, seed: int) -> list[str]:
    """`n` plain fact sentences over the same tasks and their whole domains (held-out keys included)."""
    rng = random.Random(seed + 1)  # offset: the corpus is not the fine-tuning data verbatim
    return [TASKS[i % len(TASKS)](rng)[3] for i in range(n)]
