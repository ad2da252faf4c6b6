"""How the train step batches tokenized examples: padded (the seeds' recipe), length-grouped or packed.

Both collators count what they produce, real tokens and the slots of the batches they build, for the
padding efficiency in the timing metrics. Packing puts a batch's examples into one row without padding, so
the model must attend within each example only. transformers 5 (masking_utils, modeling_flash_attention_utils)
does that for:

- `sdpa`, `eager`, `flex_attention`: a block-diagonal mask derived from position ids that restart, but only
  when the batch has no attention_mask and the model no KV cache (the train step sets use_cache=False);
  the mask covers the whole row, so its cost grows with the row's length squared (on this 2-core CPU a row
  of 8 alpaca examples took 7x the attention time of the padded batch). For `sdpa` the train step therefore
  switches to `PER_EXAMPLE_SDPA`: the same sdpa kernel on the examples side by side. `flex_attention`
  isolates on CPU too (tested) but has no backward there (torch 2.13), so it trains only on CUDA.
- `flash_attention_2/3/4` (CUDA): varlen kernels fed the `cu_seq_lens_*` boundaries the collator returns.

Any other implementation (a model's own code, paged attention, kernels registered elsewhere) is refused.
"""

from __future__ import annotations

import torch
from transformers import DataCollatorForSeq2Seq
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.trainer_pt_utils import (
    LengthGroupedSampler,
    get_length_grouped_indices,
)

from workflow.errors import ParamsError

FEATURES = ("input_ids", "attention_mask", "labels")  # what the collators read of an example
PER_EXAMPLE_SDPA = "sdpa_per_example"  # the registered name of `per_example_sdpa`
ISOLATING = ("eager", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
             PER_EXAMPLE_SDPA)  # attention implementations that keep packed examples apart (module docstring)


class _Counting:
    """Counts real tokens (attention mask 1 in the examples) and slots (elements of the built input_ids)."""

    real = slots = 0

    def count(self, features: list[dict], input_ids: torch.Tensor) -> None:
        self.real += sum(int(sum(f["attention_mask"])) for f in features)
        self.slots += input_ids.numel()

    def efficiency(self) -> float | None:
        """Real tokens / slots over every batch built so far (None before the first)."""
        return self.real / self.slots if self.slots else None


class PaddedCollator(_Counting):
    """The seeds' batches: right-padded to the batch's longest example, labels -100 on the padding."""

    def __init__(self, tokenizer):
        self.pad = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def __call__(self, features: list[dict]) -> dict:
        features = [{k: f[k] for k in FEATURES} for f in features]  # a `length` column stays behind
        batch = self.pad(features)
        self.count(features, batch["input_ids"])
        return batch


class PackedCollator(_Counting):
    """A batch's examples one after another in a single row of shape (1, total tokens), no padding.

    position_ids restart at 0 with every example; the first label of every example is -100 (the model
    would predict it from the previous example's last token; alone, nothing predicts it either), so every
    other label, the prompt's -100 and each example's eos included, is what it is in the padded batch.
    `cu_seq_lens_q/k` (example boundaries) and `max_length_q/k` are FlashAttention's varlen kwargs, which
    `per_example_sdpa` reads too. No attention_mask: given one, transformers treats the row as one sequence.
    """

    def __call__(self, features: list[dict]) -> dict:
        ids, labels, positions, bounds = [], [], [], [0]
        for f in features:
            n = len(f["input_ids"])
            ids += list(f["input_ids"])
            labels += [-100, *list(f["labels"])[1:]]
            positions += range(n)
            bounds.append(bounds[-1] + n)
        cu = torch.tensor(bounds, dtype=torch.int32)
        longest = int(cu.diff().max())
        batch = {
            "input_ids": torch.tensor([ids]),
            "labels": torch.tensor([labels]),
            "position_ids": torch.tensor([positions]),
            "cu_seq_lens_q": cu, "cu_seq_lens_k": cu,
            "max_length_q": longest, "max_length_k": longest,
        }
        self.count(features, batch["input_ids"])
        return batch


def per_example_sdpa(module, query, key, value, attention_mask, cu_seq_lens_q=None, **kwargs):
    """transformers' sdpa attention on each packed example alone (boundaries: `cu_seq_lens_q`): causal
    within an example, nothing across. Without boundaries: plain sdpa.

    The examples are laid side by side for the attention alone, right-padded to the longest: (examples,
    heads, longest, head_dim), one causal sdpa call. Causality keeps the padding out of every real query
    (padding comes after it), so no mask is needed, and the rows are then gathered back. The attention costs
    what a padded batch's does, the rest of the model runs on the packed tokens only."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one row, got a batch of {query.shape[0]}")
    gather, keep, examples, longest = _side_by_side(cu_seq_lens_q.to(query.device))

    def spread(x):  # (1, heads, tokens, dim) -> (examples, heads, longest, dim)
        return x[0].index_select(1, gather).unflatten(1, (examples, longest)).transpose(0, 1)

    out = sdpa_attention_forward(module, spread(query), spread(key), spread(value), None, **kwargs)[0]
    return out.flatten(0, 1).index_select(0, keep).unsqueeze(0), None  # (1, tokens, heads, dim)


def _side_by_side(cu: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """For examples at the boundaries `cu` of a packed row: the row position each slot of the padded layout
    (examples x longest) reads (padding repeats the example's last token, masked out by causality), the slots
    of the real tokens in row order, the number of examples and the longest."""
    starts, lengths = cu[:-1].long(), cu.diff().long()
    examples, longest = lengths.numel(), int(lengths.max())
    j = torch.arange(longest, device=cu.device)
    gather = (starts[:, None] + torch.minimum(j[None], lengths[:, None] - 1)).flatten()
    slots = torch.arange(examples * longest, device=cu.device).view(examples, longest)
    return gather, slots[j[None] < lengths[:, None]], examples, longest


ALL_ATTENTION_FUNCTIONS.register(PER_EXAMPLE_SDPA, per_example_sdpa)
ALL_MASK_ATTENTION_FUNCTIONS.register(PER_EXAMPLE_SDPA, sdpa_mask)  # padded batches (eval, generation) as sdpa


def use_packed_attention(model) -> str:
    """Make `model` (before the LoRA wrap) attend within each packed example only, and return the attention
    implementation it then uses; a ParamsError naming `train.packing` when its attention cannot."""
    config = model.config
    name = type(model).__name__
    if not type(model).__module__.startswith("transformers.models."):
        raise ParamsError(f"train.packing: {name} runs its own modeling code, which need not keep packed examples "
                          "apart; set train.packing: false")
    impl = config._attn_implementation
    sliding = "sliding_attention" in (getattr(config, "layer_types", None) or ())
    if impl == "sdpa" and not sliding:  # per-example calls would drop a sliding window; the mask path keeps it
        model.set_attn_implementation(PER_EXAMPLE_SDPA)
    elif impl not in ISOLATING + ("sdpa",):
        raise ParamsError(f"train.packing: {name} uses the {impl!r} attention, which does not keep packed "
                          f"examples apart (those that do: sdpa, {', '.join(ISOLATING[:-1])}); "
                          "set train.packing: false")
    config.use_cache = False  # with a KV cache transformers builds no packed mask (eager, flex, sdpa's mask path)
    return config._attn_implementation


class GroupedSampler(LengthGroupedSampler):
    """The Trainer's length grouping (mega-batches of 50 batches sorted by length, the longest batch first),
    its order drawn from `seed` and the epoch rather than the global RNG: a resumed run (which restores
    the RNG state of its checkpoint before the epoch's order is drawn) then sees an unbroken run's batches."""

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        super().__init__(batch_size, lengths=lengths)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:  # called by the Trainer (through accelerate) at each epoch
        self.epoch = epoch

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(get_length_grouped_indices(self.lengths, self.batch_size, generator=generator))


def example_lengths(dataset) -> list[int]:
    """Tokens of every example of a tokenized split (from Arrow, without decoding the rows)."""
    import pyarrow.compute as pc

    return pc.list_value_length(dataset.with_format("arrow")["input_ids"]).to_pylist()
