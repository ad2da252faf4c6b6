"""Benchmark (not a test): preprocess tokenization rows/s beside one raw batched tokenizer call.

Generates ~50k alpaca rows with an alpaca_data_zh-like length mix (short Chinese instructions, input empty
for most rows, replies from a few characters to several hundred), tokenizes them with the builtin model's
fast tokenizer through `workflow.tokenize.tokenize_rows` (template rendering, special ids, labels, length
policy) and through one plain `tokenizer(texts)` call over the same rendered texts, and prints both.

    python scripts/bench_preprocess.py [--rows 50000] [--templates human_assistant qwen]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workflow.builtin import train_tokenizer  # noqa: E402
from workflow.data import judge_rows  # noqa: E402
from workflow.params import Columns, load_params  # noqa: E402
from workflow.templates import TEMPLATES, get_template  # noqa: E402
from workflow.tokenize import encode, tokenize_rows  # noqa: E402

ZH = "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指几九区强放决西被干做必战先回则任取据处队南给色光门即保治北造百规热领七海口东导器压志世金增争济阶油思术极交受联什认六共权收证改清己美再采转更单风切打白教速花带安场身车例真务具万每目至达走积示议声报斗完类八离华名确才科张信马节话米整空元况今集温传土许步群广石记需段研界拉林律叫且究观越织装影算低持音众书布复容儿须际商非验连断深难近矿千周委素技备半办青省列习响约支般史感劳便团往酸历市克何除消构府称太准精值号率族维划选标写存候毛亲快效斯院查江型眼王按格养易置派层片始却专状育厂京识适属圆包火住调满县局照参红细引听该铁价严"
EN = ("the model data train token learn answer question list write explain describe give example reason "
      "number time people water world language write story poem plan summary").split()


def alpaca_like_rows(n: int, seed: int) -> list[dict]:
    """`n` rows whose field lengths follow alpaca_data_zh's rough shape (characters, not tokens)."""
    rng = random.Random(seed)

    def zh(k: int) -> str:
        return "".join(rng.choice(ZH) for _ in range(k)) + "。"

    rows = []
    for _ in range(n):
        instruction = zh(rng.randint(6, 40))
        input_text = zh(rng.randint(5, 120)) if rng.random() < 0.35 else ""
        reply_len = min(int(rng.lognormvariate(4.3, 0.8)), 900)  # median ~75 chars, long tail
        output = zh(reply_len) if rng.random() < 0.9 else " ".join(rng.choice(EN) for _ in range(reply_len // 4 + 1))
        rows.append({"instruction": instruction, "input": input_text, "output": output})
    return rows


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--templates", nargs="+", default=["human_assistant", "qwen"], choices=sorted(TEMPLATES))
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    tok = train_tokenizer(params.builtin["tiny-llama"], params.seed)
    records = alpaca_like_rows(args.rows, 0)
    rows = [r for _, r in judge_rows(list(enumerate(records, 1)), Columns().model_dump(), _NoBad())]
    print(f"{len(rows)} rows, tokenizer: builtin tiny-llama (fast BPE, vocab {len(tok)}), "
          f"max_length {args.max_length}, best of {args.runs}")
    for name in args.templates:
        template = get_template(name)
        ids = encode(rows[:1], tok, template)[0][0]
        texts = [tok.decode(ids) for ids, _, _ in encode(rows, tok, template)]  # the rendered conversations
        raw = best_of(args.runs, lambda: tok(texts, add_special_tokens=False))
        step = best_of(args.runs, lambda: tokenize_rows(rows, tok, template, args.max_length))
        lengths = sorted(len(x) for x in tokenize_rows(rows, tok, template, 10**9)[0]["input_ids"])
        print(f"{name:16s} preprocess {len(rows) / step:9.0f} rows/s | raw batched call {len(rows) / raw:9.0f} "
              f"rows/s | ratio {raw / step:.2f} | tokens p50 {lengths[len(lengths) // 2]} p95 "
              f"{lengths[int(len(lengths) * 0.95)]} (first example {len(ids)} tokens)")


class _NoBad:
    """The generated rows are all good; a bad one would be a bug in this script."""

    def add(self, reason, number, field=""):
        raise AssertionError(f"generated row {number} is bad: {reason}")


if __name__ == "__main__":
    main()
