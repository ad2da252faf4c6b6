"""The default tiny causal LM, built fully offline and deterministically from a seed.

A byte-level BPE tokenizer trained on the project's task corpus, a small `LlamaForCausalLM`, and a short
full-parameter pre-training on the corpus so the base already knows the tasks' facts. Used by the download
step for `builtin:<name>` sources.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path

from workflow import tasks
from workflow.errors import ParamsError
from workflow.io import write_json_atomic
from workflow.params import BuiltinModel
from workflow.templates import TEMPLATES, render_prompt

log = logging.getLogger("workflow.builtin")

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
# Tokens the chat templates of ChatGLM3, Qwen and Llama-2 use, so any template renders with single ids.
CHAT_TOKENS = ("[gMASK]", "sop", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|im_start|>",
               "<|im_end|>", "<|endoftext|>", "[INST]", "[/INST]", "<<SYS>>", "<</SYS>>")
VOCAB_MULTIPLE = 64  # bitsandbytes' CPU 4-bit kernels need every Linear dim to be a multiple of 64


def tokenizer_corpus(spec: BuiltinModel, seed: int) -> list[str]:
    """Corpus sentences plus the default template's rendered prompts/responses (its words get merges)."""
    texts = tasks.corpus_texts(spec.corpus_size, seed)
    rows = tasks.alpaca_rows(max(spec.corpus_size // 4, len(tasks.TASKS)), seed)  # a quarter: enough for merges
    template = TEMPLATES["human_assistant"]  # the default's format; other templates' text is common words
    texts += [render_prompt(template, r["instruction"], r["input"]) + r["output"] for r in rows]
    return texts


def train_tokenizer(spec: BuiltinModel, seed: int):
    """A transformers fast tokenizer (byte-level BPE) that adds no bos/eos by itself."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # `sop` must not match inside ordinary words ("isopod"); the bracketed tokens cannot occur in text.
    specials = [AddedToken(t, special=True, single_word=t == "sop", normalized=False)
                for t in (UNK, BOS, EOS, PAD, *CHAT_TOKENS)]
    tok = Tokenizer(models.BPE())
    # Spaces, digits and CJK characters are tokens of their own, so an answer tokenizes the same after
    # "Assistant: " (space already in the prompt) as after "= " in the pre-training corpus; otherwise BPE's
    # "Ġ7" vs "7" would make every fine-tuning answer a token the base has barely seen.
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(" ", behavior="isolated"),
        pre_tokenizers.Split(Regex(r"[\u3000-\u303f\u4e00-\u9fff\uff00-\uffef]"), behavior="isolated"),
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),  # exact round trip: no added space
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=spec.vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(spec, seed), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        extra_special_tokens=list(CHAT_TOKENS),
        add_bos_token=False, add_eos_token=False,  # tokenize.py appends eos itself; nothing implicit
        clean_up_tokenization_spaces=False,  # the clean-up rewrites " ." and would break exact decoding
        model_max_length=spec.max_position_embeddings,
    )


def make_model(spec: BuiltinModel, tokenizer):
    """A randomly initialised (global torch seed) Llama sized by `spec` and the tokenizer."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    ids = {f"{k}_token_id": tokenizer.convert_tokens_to_ids(t) for k, t in (("bos", BOS), ("eos", EOS), ("pad", PAD))}
    config = LlamaConfig(
        vocab_size=math.ceil(len(tokenizer) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_heads,
        max_position_embeddings=spec.max_position_embeddings,
        tie_word_embeddings=False,
        **ids,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(**ids)
    return model


def packed_sequences(tokenizer, texts: list[str], seq_len: int):
    """All texts, each followed by eos, concatenated and cut into rows of `seq_len` (tail dropped)."""
    import torch

    ids: list[int] = []
    for enc in tokenizer(texts, add_special_tokens=False).input_ids:
        ids += enc + [tokenizer.eos_token_id]
    n = len(ids) // seq_len
    if n == 0:
        raise ParamsError(f"builtin: the corpus has {len(ids)} tokens, fewer than pretrain_seq_len {seq_len}; "
                          "raise corpus_size")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def pretrain(model, data, spec: BuiltinModel, seed: int) -> dict:
    """Plain causal-LM AdamW loop; returns losses on a fixed batch before and after, and the curve."""
    import torch

    gen = torch.Generator().manual_seed(seed)  # batch order: local generator, global RNG untouched
    fixed = data[: spec.pretrain_batch_size]

    def fixed_loss() -> float:
        model.eval()
        with torch.no_grad():
            loss = model(input_ids=fixed, labels=fixed).loss.item()
        model.train()
        return loss

    opt = torch.optim.AdamW(model.parameters(), lr=spec.pretrain_lr, weight_decay=0.0)
    warmup = max(1, spec.pretrain_steps // 20)  # 5% linear warm-up, then cosine decay to 10% of the peak

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        t = (step - warmup) / max(1, spec.pretrain_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    start = fixed_loss()
    curve = []
    model.train()
    for step in range(spec.pretrain_steps):
        batch = data[torch.randint(len(data), (spec.pretrain_batch_size,), generator=gen)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        curve.append(round(loss.item(), 4))
    model.eval()
    return {"loss_start": start, "loss_end": fixed_loss(), "train_loss_every_10": curve[::10]}


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run torch on one intra-op thread for the block, then restore the previous count.

    Why: the same bytes on any machine (reduction order does not depend on the core count), and robustness
    to neighbours. Measured on 2 cores: alone, 0.107 s/step on one thread vs 0.061 on two (~32 s vs ~18 s
    for 300 steps); beside another busy torch process, 0.14 vs 2.4 s/step (OpenMP oversubscription: the
    pytest fixture took 302 s instead of 34 s).
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def build_builtin(name: str, spec: BuiltinModel, seed: int, out_dir: Path) -> dict:
    """Build, pre-train and save the builtin model `name` into `out_dir`; return what pretrain.json holds."""
    with one_thread():
        return _build(name, spec, seed, Path(out_dir))


def _build(name: str, spec: BuiltinModel, seed: int, out_dir: Path) -> dict:
    import torch

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = train_tokenizer(spec, seed)
    model = make_model(spec, tokenizer)
    data = packed_sequences(tokenizer, tasks.corpus_texts(spec.corpus_size, seed), spec.pretrain_seq_len)
    log.info("builtin %s: vocab %d, %d params, %d sequences of %d tokens", name, len(tokenizer),
             model.num_parameters(), len(data), spec.pretrain_seq_len)
    losses = pretrain(model, data, spec, seed)
    model.save_pretrained(out_dir)  # transformers 5 always writes safetensors (no safe_serialization arg)
    tokenizer.save_pretrained(out_dir)
    info = {
        "name": name,
        "seed": seed,
        "spec": spec.model_dump(),
        "tokenizer_size": len(tokenizer),
        "vocab_size": model.config.vocab_size,
        "num_parameters": model.num_parameters(),
        "pretrain_sequences": len(data),
        **losses,
    }  # no timings in the file: same seed, same bytes
    write_json_atomic(out_dir / "pretrain.json", info)
    log.info("builtin %s: pretrain loss %.3f -> %.3f in %.1f s", name, info["loss_start"], info["loss_end"],
             time.perf_counter() - t0)
    return info
