"""Chat templates as data: how a conversation becomes a sequence of text parts and special tokens.

A `Template` lists, per role, `Part`s: plain text (a format string, tokenized on its own WITHOUT special
tokens) or a special token (inserted by id; see `workflow.tokenize.special_ids`). Turning parts into ids,
labels and padding is `workflow.tokenize`'s job and is the same code for every template. Imports nothing
heavy so params validation can check template names at Snakefile parse time.

Fields available to format strings: user parts get {instruction}, {input} and {prompt} (the two joined by
"\n", empty ones left out; a history turn's user text fills all of them as {instruction}/{prompt});
system parts get {system}; response parts get {response}.
"""

from __future__ import annotations

from dataclasses import dataclass

EOS = "eos"  # stands for the tokenizer's own eos token, whatever it is called
BOS = "bos"  # the tokenizer's own bos token


@dataclass(frozen=True)
class Part:
    """One piece of a turn: `text` (a format string) or `special` (a token name, or EOS/BOS)."""

    text: str | None = None
    special: str | None = None
    strip: bool = False  # strip the formatted text (the seeds strip "Human: {instruction}\n{input}") ...
    tail: str = ""  # ... then append this constant, in the same tokenizer call


def T(text: str, strip: bool = False, tail: str = "") -> Part:  # noqa: N802 - short names keep the registry readable
    return Part(text=text, strip=strip, tail=tail)


def S(special: str) -> Part:  # noqa: N802
    return Part(special=special)


@dataclass(frozen=True)
class Template:
    """The layout of one chat format; see the module docstring for the fields its text parts use.

    prefix: once at the start.  system: only when there is a system prompt (the row's or `default_system`).
    user: one user turn *including* the assistant header that opens the reply (all masked with -100).
    user_with_system: the first user turn when there is a system prompt, replacing `system` + `user`
    (Llama-2 puts <<SYS>> inside the first [INST]).
    response: the reply text (labelled).  stop: tokens closing a reply, labelled: the model learns to emit
    them.  history_stop: the same for replies that are followed by another turn (None = `stop`).
    separator: masked parts between a reply's stop and the next user turn.  label_next_role: the next
    turn's first token ends a history reply and is labelled (ChatGLM3 stops at `<|user|>`).
    stop_words: what generation stops at.  pad: the pad token the template wants (None: tokenizer's own,
    else eos).
    """

    name: str
    user: tuple[Part, ...]
    response: tuple[Part, ...] = (T("{response}"),)
    stop: tuple[Part, ...] = (S(EOS),)
    history_stop: tuple[Part, ...] | None = None
    prefix: tuple[Part, ...] = ()
    system: tuple[Part, ...] = ()
    user_with_system: tuple[Part, ...] | None = None
    default_system: str = ""
    separator: tuple[Part, ...] = ()
    label_next_role: bool = False
    stop_words: tuple[str, ...] = (EOS,)
    pad: str | None = None

    def specials(self) -> set[str]:
        """Every special token name the template inserts."""
        parts = self.prefix + self.system + self.user + self.response + self.stop + self.separator
        parts += (self.history_stop or ()) + (self.user_with_system or ())
        return {p.special for p in parts if p.special} | set(self.stop_words) | ({self.pad} if self.pad else set())


TEMPLATES: dict[str, Template] = {
    # Seeds 001 process_func: "\n".join(["Human: " + instruction, input]).strip() + "\n\nAssistant: "
    # + response + eos. One text part, so the prompt tokenizes exactly as the seeds' single call does.
    "human_assistant": Template(
        name="human_assistant",
        user=(T("Human: {instruction}\n{input}", strip=True, tail="\n\nAssistant: "),),
        system=(T("{system}\n\n"),),
    ),
    # Llama-2-chat: <s>[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST] {response} </s>, next turn
    # starts with <s> again. [INST] and <<SYS>> are plain text in Llama-2's own vocabulary.
    "llama2_chat": Template(
        name="llama2_chat",
        prefix=(S(BOS),),
        user=(T("[INST] {prompt} [/INST] "),),
        user_with_system=(T("[INST] <<SYS>>\n{system}\n<</SYS>>\n\n{prompt} [/INST] "),),
        separator=(S(BOS),),
    ),
    # ChatGLM3 build_chat_input: [gMASK]sop, then per message <|role|> + encode("\n") + encode(text), and
    # <|assistant|> to open the reply; the reply's first token is "\n" (seeds 000 §3.10). History replies
    # end where the model emits the next <|user|>; the last one ends with eos.
    "chatglm3": Template(
        name="chatglm3",
        prefix=(S("[gMASK]"), S("sop")),
        system=(S("<|system|>"), T("\n"), T("{system}")),
        user=(S("<|user|>"), T("\n"), T("{prompt}"), S("<|assistant|>")),
        response=(T("\n"), T("{response}")),
        history_stop=(),
        label_next_role=True,
        stop_words=(EOS, "<|user|>", "<|observation|>"),
    ),
    # Qwen chat (ChatML): <|im_start|>role\ntext<|im_end|>\n per message; <|im_end|> is the stop that is
    # learned, <|endoftext|> pads (Qwen's tokenizer has no pad; pad = eos would mask the stop).
    "qwen": Template(
        name="qwen",
        system=(S("<|im_start|>"), T("system\n{system}"), S("<|im_end|>"), T("\n")),
        default_system="You are a helpful assistant.",
        user=(S("<|im_start|>"), T("user\n{prompt}"), S("<|im_end|>"), T("\n"), S("<|im_start|>"),
              T("assistant\n")),
        stop=(S("<|im_end|>"),),
        separator=(T("\n"),),
        stop_words=("<|im_end|>", "<|endoftext|>"),
        pad="<|endoftext|>",
    ),
}


def get_template(name: str) -> Template:
    """The registered template called `name`."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template '{name}'; registered: {', '.join(sorted(TEMPLATES))}") from None


def user_fields(instruction: str, input_text: str = "") -> dict[str, str]:
    """The format fields of a user turn."""
    return {"instruction": instruction, "input": input_text,
            "prompt": "\n".join(x for x in (instruction, input_text) if x)}


def render_part(part: Part, fields: dict[str, str]) -> str:
    """The text of a text part with `fields` filled in."""
    text = part.text.format(**fields)
    return (text.strip() if part.strip else text) + part.tail


def render_prompt(template: Template, instruction: str, input_text: str = "") -> str:
    """The user turn's text parts joined (special tokens left out): plain text for tokenizer corpora."""
    fields = user_fields(instruction, input_text)
    return "".join(render_part(p, fields) for p in template.user if p.text is not None)
