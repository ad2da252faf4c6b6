"""Prompt templates: how an alpaca row becomes prompt text and response text.

A template is data, not code paths: the registry maps a name to a `Template`. Tokenization (prompt
masked with -100, response, eos as its own id) is done by `workflow.tokenize`, which is the same for every
template. Imports nothing heavy so params validation can check template names at Snakefile parse time.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """Prompt layout of one chat format.

    `prompt` is formatted with the row's fields; `strip_prompt` strips the joined user text before the
    assistant prefix is appended (the seeds' Llama-2 recipe); `assistant_prefix` ends the prompt.
    """

    name: str
    user: str  # formatted with instruction/input; the two are joined with "\n"
    assistant_prefix: str
    strip_user: bool = True


TEMPLATES: dict[str, Template] = {
    # Seeds 001 process_func: "\n".join(["Human: " + instruction, input]).strip() + "\n\nAssistant: "
    "human_assistant": Template(name="human_assistant", user="Human: {text}", assistant_prefix="\n\nAssistant: "),
}


def get_template(name: str) -> Template:
    """The registered template called `name`."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise KeyError(f"unknown template '{name}'; registered: {', '.join(sorted(TEMPLATES))}") from None


def render_prompt(template: Template, instruction: str, input_text: str = "") -> str:
    """The prompt text (everything before the response) for one alpaca row."""
    text = "\n".join([instruction, input_text])
    user = template.user.format(text=text)
    if template.strip_user:
        user = user.strip()
    return user + template.assistant_prefix
