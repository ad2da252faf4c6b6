"""Every chat template on the builtin tokenizer (trained here, offline): text, labels, padding, specials."""

from __future__ import annotations

import pytest

from workflow.templates import TEMPLATES, get_template
from workflow.tokenize import IGNORE_INDEX, encode, generation_batch, prepare_tokenizer, special_ids, tokenize_rows

NAMES = sorted(TEMPLATES)
ROW = {"instruction": "把数字写成中文。", "input": "37", "output": "三十七"}
SYS_ROW = {"instruction": "Say hello.", "input": "", "output": "hello", "system": "Be brief."}
MULTI = {"instruction": "Add the two numbers.", "input": "2 + 3", "output": "5",
         "history": [["Reverse the letters of the word.\ncloud", "duolc"], ["Say hi.", "hi"]]}

# Expected full text per template, spelled out from each model's documented format (not from templates.py).
EXPECTED = {
    "human_assistant": {
        "row": "Human: 把数字写成中文。\n37\n\nAssistant: 三十七</s>",
        "sys": "Be brief.\n\nHuman: Say hello.\n\nAssistant: hello</s>",
        "multi": "Human: Reverse the letters of the word.\ncloud\n\nAssistant: duolc</s>Human: Say hi.\n\nAssistant: "
                 "hi</s>Human: Add the two numbers.\n2 + 3\n\nAssistant: 5</s>",
    },
    "llama2_chat": {
        "row": "<s>[INST] 把数字写成中文。\n37 [/INST] 三十七</s>",
        "sys": "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nSay hello. [/INST] hello</s>",
        "multi": "<s>[INST] Reverse the letters of the word.\ncloud [/INST] duolc</s><s>[INST] Say hi. [/INST] hi</s>"
                 "<s>[INST] Add the two numbers.\n2 + 3 [/INST] 5</s>",
    },
    "chatglm3": {
        "row": "[gMASK]sop<|user|>\n把数字写成中文。\n37<|assistant|>\n三十七</s>",
        "sys": "[gMASK]sop<|system|>\nBe brief.<|user|>\nSay hello.<|assistant|>\nhello</s>",
        "multi": "[gMASK]sop<|user|>\nReverse the letters of the word.\ncloud<|assistant|>\nduolc<|user|>\nSay hi."
                 "<|assistant|>\nhi<|user|>\nAdd the two numbers.\n2 + 3<|assistant|>\n5</s>",
    },
    "qwen": {
        "row": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n把数字写成中文。\n37"
               "<|im_end|>\n<|im_start|>assistant\n三十七<|im_end|>",
        "sys": "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nSay hello.<|im_end|>\n"
               "<|im_start|>assistant\nhello<|im_end|>",
        "multi": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nReverse the letters "
                 "of the word.\ncloud<|im_end|>\n<|im_start|>assistant\nduolc<|im_end|>\n<|im_start|>user\nSay hi."
                 "<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n<|im_start|>user\nAdd the two numbers.\n2 + 3"
                 "<|im_end|>\n<|im_start|>assistant\n5<|im_end|>",
    },
}
# What the model learns to say, per template: every reply with its stop (ChatGLM3: the reply's leading "\n",
# and a history reply ends where the model emits the next <|user|>).
LEARNED = {
    "human_assistant": ("duolc</s>hi</s>5</s>", "5</s>"),
    "llama2_chat": ("duolc</s>hi</s>5</s>", "5</s>"),
    "chatglm3": ("\nduolc<|user|>\nhi<|user|>\n5</s>", "\n5</s>"),
    "qwen": ("duolc<|im_end|>hi<|im_end|>5<|im_end|>", "5<|im_end|>"),
}
STOP = {"human_assistant": "</s>", "llama2_chat": "</s>", "chatglm3": "</s>", "qwen": "<|im_end|>"}
PAD = {"human_assistant": "<pad>", "llama2_chat": "<pad>", "chatglm3": "<pad>", "qwen": "<|endoftext|>"}


@pytest.fixture()
def tok(builtin_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(builtin_tokenizer_dir)


def _learned(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE_INDEX])


@pytest.mark.parametrize("name", NAMES)
def test_decoded_text_and_labels(tok, name):
    template = get_template(name)
    prepare_tokenizer(tok, template)
    stop = tok.convert_tokens_to_ids(STOP[name])
    for key, row in (("row", ROW), ("sys", SYS_ROW), ("multi", MULTI)):
        ids, labels, start = encode([row], tok, template)[0]
        assert tok.decode(ids) == EXPECTED[name][key], key
        assert labels[-1] == ids[-1] == stop, key  # the last label is the template's stop token
        assert len(ids) == len(labels)
    ids, labels, start = encode([ROW], tok, template)[0]
    assert all(x == IGNORE_INDEX for x in labels[:start]) and start > 0  # every prompt token masked
    assert labels[start:] == ids[start:]  # the reply and its stop: all labelled
    assert _learned(tok, ids, labels) == {"chatglm3": "\n三十七</s>", "qwen": "三十七<|im_end|>"}.get(name, "三十七</s>")


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_labels_every_reply_or_the_last(tok, name):
    template = get_template(name)
    every, last_only = LEARNED[name]
    ids, labels, _ = encode([MULTI], tok, template)[0]
    assert _learned(tok, ids, labels) == every
    ids2, labels2, _ = encode([MULTI], tok, template, last_turn_only=True)[0]
    assert ids2 == ids and _learned(tok, ids2, labels2) == last_only


@pytest.mark.parametrize("name", NAMES)
def test_special_tokens_are_single_ids(tok, name):
    template = get_template(name)
    ids = special_ids(tok, template)
    assert set(ids) == template.specials()
    for token, token_id in ids.items():
        if token not in ("eos", "bos"):
            assert tok(token, add_special_tokens=False)["input_ids"] == [token_id]
            assert tok.convert_ids_to_tokens(token_id) == token
    full, _, _ = encode([MULTI], tok, template)[0]
    text_ids = tok(EXPECTED[name]["multi"], add_special_tokens=False)["input_ids"]
    assert full == text_ids  # inserting by id gives what the tokenizer makes of the rendered text


def test_missing_special_token_fails_clearly(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.train_from_iterator(["plain words only"] * 10, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    plain = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>", eos_token="</s>")
    plain.name_or_path = "plain-tok"
    for name, missing in (("chatglm3", "'<|assistant|>'"), ("qwen", "'<|endoftext|>'"), ("llama2_chat", "bos token")):
        with pytest.raises(ValueError, match=f"'plain-tok' has no (single token )?{missing}, which template '{name}'"):
            encode([ROW], plain, get_template(name))


@pytest.mark.parametrize("name", NAMES)
def test_right_padding_for_training_never_labels_pad(tok, name):
    from transformers import DataCollatorForSeq2Seq

    template = get_template(name)
    prepare_tokenizer(tok, template)
    pad = tok.convert_tokens_to_ids(PAD[name])
    assert tok.pad_token_id == pad and tok.padding_side == "right"
    cols, _ = tokenize_rows([ROW, SYS_ROW, MULTI], tok, template, max_length=512)
    features = [dict(zip(cols, values)) for values in zip(*cols.values())]
    batch = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=IGNORE_INDEX)(features)
    for i, n in enumerate(len(x) for x in cols["input_ids"]):
        mask, ids, labels = batch["attention_mask"][i], batch["input_ids"][i], batch["labels"][i]
        assert mask[:n].all() and not mask[n:].any()  # real tokens first: right padding
        assert (ids[n:] == pad).all() and (labels[n:] == IGNORE_INDEX).all()  # no pad is ever labelled
        assert ids[:n].tolist() == cols["input_ids"][i] and labels[n - 1] == tok.convert_tokens_to_ids(STOP[name])


@pytest.mark.parametrize("name", NAMES)
def test_left_padding_for_batched_generation(tok, name):
    template = get_template(name)
    prepare_tokenizer(tok, template)
    rows = [ROW, SYS_ROW, MULTI]
    batch = generation_batch(rows, tok, template)
    prompts = [ids[:start] for ids, _, start in encode(rows, tok, template)]
    width = max(map(len, prompts))
    for i, prompt in enumerate(prompts):
        pad_n = width - len(prompt)
        assert batch["input_ids"][i].tolist() == [tok.pad_token_id] * pad_n + prompt  # pads on the left
        assert batch["attention_mask"][i].tolist() == [0] * pad_n + [1] * len(prompt)
    assert tok.padding_side == "right"  # generation padding does not leak into training


def test_qwen_equals_apply_chat_template(tok):
    template = get_template("qwen")
    for row in (ROW, SYS_ROW, MULTI):
        messages = [{"role": "system", "content": row.get("system") or "You are a helpful assistant."}]
        for user, reply in row.get("history", []):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        user = "\n".join(x for x in (row["instruction"], row["input"]) if x)
        messages.append({"role": "user", "content": user})
        ids, _, start = encode([row], tok, template)[0]
        prompt = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
        assert ids[:start] == prompt
        messages.append({"role": "assistant", "content": row["output"]})
        full = tok.apply_chat_template(messages, return_dict=False)
        assert ids + tok("\n", add_special_tokens=False)["input_ids"] == full  # ChatML ends each message with \n


def test_chatglm3_prompt_matches_build_chat_input(tok):
    """ChatGLM3's build_chat_input, transcribed: [gMASK] sop, per message <|role|> + encode("\\n") +
    encode(content), then <|assistant|>; the first token the model must produce is "\\n"."""
    template = get_template("chatglm3")
    cmd = tok.convert_tokens_to_ids

    def encode_text(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    history = [("user", u) for u, _ in MULTI["history"]]
    messages = [m for (u, a) in MULTI["history"] for m in (("user", u), ("assistant", a))]
    assert len(history) == 2
    expected = [cmd("[gMASK]"), cmd("sop")]
    for role, content in messages + [("user", "Add the two numbers.\n2 + 3")]:
        expected += [cmd(f"<|{role}|>")] + encode_text("\n") + encode_text(content)
    expected.append(cmd("<|assistant|>"))
    ids, labels, start = encode([MULTI], tok, template)[0]
    assert ids[:start] == expected
    assert tok.decode(ids[start]) == "\n" and labels[start] == ids[start]


@pytest.mark.parametrize("name", NAMES)
def test_truncation_modes(tok, name):
    template = get_template(name)
    stop = tok.convert_tokens_to_ids(STOP[name])
    long_row = {"instruction": "Repeat the sentence.", "input": "apple river stone " * 20, "output": "cloud green"}
    long_reply = {"instruction": "Say it.", "input": "", "output": "apple river stone " * 30}
    rows = [ROW, long_row, long_reply]
    full = encode(rows, tok, template)
    max_length = 64
    assert len(full[0][0]) <= max_length < min(len(full[1][0]), len(full[2][0]))

    cols, out = tokenize_rows(rows, tok, template, max_length, overlong="drop")
    assert out["kept"] == [0] and out["too_long"] == [1, 2] and cols["input_ids"] == [full[0][0]]

    cols, out = tokenize_rows(rows, tok, template, max_length, overlong="truncate_prompt")
    assert out["kept"] == [0, 1] and out["truncated"] == [1] and out["too_long"] == [2]
    ids, labels = cols["input_ids"][1], cols["labels"][1]
    start = full[1][2]
    reply = full[1][0][start:]  # the reply and its stop, kept whole
    assert len(ids) <= max_length and ids[-len(reply):] == reply and labels[-len(reply):] == reply
    assert labels[-1] == stop and all(x == IGNORE_INDEX for x in labels[: -len(reply)])
    assert tok.decode(ids).startswith(EXPECTED[name]["row"][:6])  # the template's head survives the cut
    assert "Repeat the sentence." in tok.decode(ids)  # the instruction is kept; the input was cut

    cols, out = tokenize_rows(rows, tok, template, max_length, overlong="truncate_end")
    assert full[1][2] >= max_length  # long_row's prompt alone fills max_length: nothing left to learn
    assert out["kept"] == [0, 2] and out["too_long"] == [1] and out["truncated"] == out["eos_truncated"] == [2]
    ids, labels = cols["input_ids"][1], cols["labels"][1]
    assert ids == full[2][0][:max_length] and labels == full[2][1][:max_length] and labels[-1] != stop


@pytest.mark.parametrize("name", NAMES)
def test_multi_turn_generation_prompt_ends_with_the_last_user_turn(tok, name):
    """preprocess stores reply_start: the generation prompt is every turn before the final reply."""
    template = get_template(name)
    prepare_tokenizer(tok, template)
    cols, _ = tokenize_rows([MULTI], tok, template, max_length=512)
    start = cols["reply_start"][0]
    prompt = tok.decode(cols["input_ids"][0][:start])
    full = EXPECTED[name]["multi"]
    reply = {"chatglm3": "\n5</s>", "qwen": "5<|im_end|>"}.get(name, "5</s>")
    assert full == prompt + reply  # ends with the last user turn and its assistant header, history before it
    assert prompt.count("duolc") == 1 and prompt.count("hi") >= 1
