"""Load and validate params.yaml: the one place that knows its shape.

Called by the Snakefile at parse time and by every step at start. Imports no torch/transformers so that
`snakemake -n` stays fast. Errors name the key and say what to do.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from workflow.devices import bf16_capable
from workflow.errors import ParamsError

PRECISIONS = ("fp16", "bf16", "int8", "nf4")
STRATEGIES = ("single", "zero2", "zero3")
ZERO_STAGES = {"zero2": 2, "zero3": 3}  # DeepSpeed ZeRO stage of each distributed strategy
DTYPES = ("bfloat16", "float16", "float32")
Precision = Literal[PRECISIONS]  # the names, defined once above
StrategyName = Literal[STRATEGIES]
Dtype = Literal[DTYPES]
NAME_RE = r"^[A-Za-z0-9_]+$"  # model keys become wildcards and path parts: no '-', '/', spaces


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Matrix(_Strict):
    model: list[str] = Field(min_length=1)
    precision: list[Precision] = Field(min_length=1)
    strategy: list[StrategyName] = Field(min_length=1)


class ZeroMatrix(_Strict):
    """A second product for the DeepSpeed strategies, so they can run a subset of the precisions (one
    product would force every precision under every strategy, int8 x zero3 included). dvc.yaml reads it,
    so it stays in params.yaml; an empty list runs none."""

    model: list[str]
    precision: list[Precision]
    strategy: list[Literal[tuple(ZERO_STAGES)]]


class ModelEntry(_Strict):
    source: str
    revision: str | None = None
    template: str = "human_assistant"
    trust_remote_code: bool = False  # run Python code shipped with the model (config.json `auto_map`)
    allow_unpinned: bool = False  # opt out of the pinned-revision rule for remote sources
    allow_pickle: bool = False  # also use pickle weights (*.bin, *.pt): loading them can run arbitrary code
    trained_dtype: Dtype | None = None  # dtype the model was pre-trained in
    force_fp16: bool = False  # fine-tune in fp16 even though trained_dtype is bfloat16 (overflow risk)

    @model_validator(mode="before")
    @classmethod
    def _no_tokens(cls, data: object) -> object:
        if isinstance(data, dict):
            for key in data:
                if str(key).lower().endswith("token"):
                    raise ValueError(f"`{key}`: hub tokens are read from the environment only (HF_TOKEN, "
                                     "MODELSCOPE_API_TOKEN), never from params.yaml; remove it")
        return data

    @field_validator("template")
    @classmethod
    def _known_template(cls, v: str) -> str:
        from workflow.templates import TEMPLATES

        if v not in TEMPLATES:
            raise ValueError(f"unknown template '{v}'; choose one of {', '.join(sorted(TEMPLATES))}")
        return v

    @field_validator("source")
    @classmethod
    def _source_kind(cls, v: str) -> str:
        if ":" in v and not v.startswith(("builtin:", "modelscope:", "hf:", "/", "./", "../")):
            raise ValueError("must be builtin:<name>, modelscope:<id>, hf:<id> or a local directory path")
        if v.startswith(("builtin:", "modelscope:", "hf:")) and not v.split(":", 1)[1]:
            raise ValueError("names no model after the ':'")
        return v

    @model_validator(mode="after")
    def _pinned(self) -> "ModelEntry":
        if self.source.startswith(("modelscope:", "hf:")) and not self.revision and not self.allow_unpinned:
            raise ValueError(
                "remote source needs a pinned `revision` (commit or tag); set allow_unpinned: true to opt out"
            )
        return self


class BuiltinModel(_Strict):
    hidden_size: int = Field(gt=0, multiple_of=64)
    intermediate_size: int = Field(gt=0, multiple_of=64)
    num_layers: int = Field(gt=0)
    num_heads: int = Field(gt=0)
    vocab_size: int = Field(ge=512, multiple_of=64)
    max_position_embeddings: int = Field(gt=0)
    pretrain_steps: int = Field(ge=0)
    pretrain_batch_size: int = Field(gt=0)
    pretrain_lr: float = Field(gt=0)
    pretrain_seq_len: int = Field(gt=8)
    corpus_size: int = Field(gt=0)

    @model_validator(mode="after")
    def _heads_divide(self) -> "BuiltinModel":
        if self.hidden_size % self.num_heads:
            raise ValueError("hidden_size must be divisible by num_heads")
        return self


class Download(_Strict):
    cache_dir: str
    offline: bool = False
    timeout_s: float = Field(gt=0)

    @field_validator("cache_dir")
    @classmethod
    def _expand(cls, v: str) -> str:
        return str(Path(v).expanduser())  # "~/.cache/..." works as users expect


class Columns(_Strict):
    """Which column of the data holds each alpaca field."""

    instruction: str = "instruction"
    input: str = "input"
    output: str = "output"
    system: str = "system"
    history: str = "history"


class Data(_Strict):
    source: str
    builtin_rows: int = Field(gt=0)
    eval_size: int = Field(gt=0)
    max_length: int = Field(gt=8)
    columns: Columns = Columns()
    strict: bool = False  # True: the first bad row fails the step instead of being dropped and reported
    overlong: Literal["drop", "truncate_prompt", "truncate_end"] = "truncate_end"
    last_turn_only: bool = False  # multi-turn rows: train on the last reply only (default: every reply)


class Lora(_Strict):
    r: int = Field(gt=0)
    alpha: float = Field(gt=0)
    dropout: float = Field(ge=0, lt=1)
    target_modules: str | list[str]


class Train(_Strict):
    """How the adapter trains. Batching (workflow/batching.py):

    - `group_by_length` (default false): batches of similar lengths (the Trainer's LengthGroupedSampler, seeded
      by `seed` and the epoch) instead of the seeds' random batches. Off by default: it changes which examples
      share a step (each mega-batch of 50 batches is sorted by length, longest first), so the loss curve and
      what is learned differ from the seeds' recipe; packing gets the same throughput without that.
    - `packing` (default false): each batch's examples in one row without padding, each attending only to
      itself (position ids restart per example; attention split at the boundaries). The batches and their
      loss are the same as padded ones; only the padding compute goes.
    """

    max_steps: int = Field(ge=-1)
    num_train_epochs: float = Field(gt=0)
    per_device_train_batch_size: int = Field(gt=0)
    gradient_accumulation_steps: int = Field(gt=0)
    learning_rate: float = Field(gt=0)
    lr_scheduler_type: str
    warmup_steps: int = Field(ge=0)
    weight_decay: float = Field(ge=0)
    gradient_checkpointing: bool
    logging_steps: int = Field(gt=0)
    save_steps: int = Field(gt=0)
    max_grad_norm: float = Field(gt=0)
    adam_epsilon: float | None = Field(default=None, gt=0)  # None: the precision's default
    optim: str | None = None  # None: the precision's default optimizer
    group_by_length: bool = False  # similar lengths per batch; off: the seeds' random batches (docstring above)
    packing: bool = False  # padding-free rows of whole examples; off: right-padded batches as in the seeds


def _optional(field) -> object:
    """A field's type, constraints included, that also takes None."""
    kind = Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    return kind | None


# Per-precision overrides: every key of `train`, optional, with the same bounds (derived, never repeated).
VariantOverride = create_model(
    "VariantOverride", __base__=_Strict,
    **{name: (_optional(field), None) for name, field in Train.model_fields.items()},
)


class Strategy(_Strict):
    """How one strategy trains; for zero2/zero3 the train step generates the DeepSpeed config from it."""

    gpus: int = Field(default=1, gt=0)  # processes per node = GPUs the job asks for (on CPU: processes)
    nodes: int | Literal["slurm"] = 1  # "slurm": the node count of the SLURM allocation
    offload_optimizer: bool = False  # ZeRO-Offload: optimizer states and step on the CPU
    offload_params: bool = False  # ZeRO-3 only: parameters live on the CPU between uses
    nf4_quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = "auto"  # see precision.py

    @field_validator("nodes")
    @classmethod
    def _positive(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("must be at least 1 (or \"slurm\")")
        return v


class Distributed(_Strict):
    """How the ZeRO jobs start their processes and find their GPUs: execution, not experiment (no rerun
    when these change). workflow/distributed.py builds the launch command from them."""

    launcher: Literal["torchrun", "deepspeed"] = "torchrun"
    master_addr: str | None = None  # multi-node rendezvous host; null: first SLURM node, else this host
    master_port: int = Field(default=29500, gt=0, lt=65536)
    hostfile: str | None = None  # deepspeed launcher on several nodes: `host slots=N` lines
    gpu_lock_dir: str = "/tmp/lowprec-gpu-locks"  # machine-wide: the jobs of every project share the GPUs
    gpu_wait_s: float = Field(default=3600, ge=0)  # how long a job waits for free GPU ids before failing
    gpu_memory_gb: float | None = Field(default=None, gt=0)  # per GPU; set: variants predicted not to fit
    # (workflow/estimate.py) are refused before training. null: no check


class Merge(_Strict):
    max_shard_size: str
    check_batches: int = Field(gt=0)
    # int8/nf4 variants: merge into the original weights (base, as the seeds do) or into their quantization
    # round trip, the weights the adapter was trained against (dequantized). fp16/bf16: the same thing.
    target: Literal["base", "dequantized"] = "base"


class Evaluate(_Strict):
    per_device_eval_batch_size: int = Field(gt=0)
    max_eval_rows: int | None = Field(default=None, gt=0)
    logit_gap_batches: int = Field(default=2, gt=0)  # batches whose logits (vocab x length x batch, fp32) wait
    # on the CPU for the trained-vs-merged gap: 2 x 4 x 384 x 32000 x 4 B = 393 MB for Llama-2


class Generate(_Strict):
    """Decoding settings for the evaluate step's generations (greedy unless do_sample)."""

    max_new_tokens: int = Field(gt=0)
    do_sample: bool = False
    num_beams: int = Field(default=1, gt=0)
    temperature: float = Field(default=1.0, gt=0)  # used only when do_sample
    top_p: float = Field(default=1.0, gt=0, le=1)  # used only when do_sample
    repetition_penalty: float = Field(default=1.0, gt=0)
    batch_size: int = Field(default=16, gt=0)


class Report(_Strict):
    reference: Precision = "bf16"  # ratio columns divide by this precision's row (else the group's first)


class DvcCache(_Strict):
    """Which large outputs DVC also stores in its cache (adapters, tokenized data, metrics, curves, predictions
    and the report always are). Written into dvc.yaml: after a change, `python -m workflow.stages --write`."""

    cache_models: bool = False  # downloaded bases: a model's full size again, re-fetchable at their pinned revision
    cache_merged: bool = False  # merged models: a full model per variant, remade from base + adapter by merge


class Params(_Strict):
    matrix: Matrix
    matrix_zero: ZeroMatrix
    seed: int
    models: dict[str, ModelEntry] = Field(min_length=1)
    builtin: dict[str, BuiltinModel] = {}
    download: Download
    data: Data
    lora: Lora
    train: Train
    variants: dict[Precision, VariantOverride] = {}
    strategies: dict[StrategyName, Strategy] = {}
    distributed: Distributed = Distributed()
    merge: Merge
    evaluate: Evaluate
    generate: Generate
    report: Report = Report()
    dvc: DvcCache = DvcCache()

    @model_validator(mode="after")
    def _cross_refs(self) -> "Params":
        for name in self.models:
            if not re.match(NAME_RE, name):
                raise ValueError(f"models.{name}: model keys may use only letters, digits and '_'")
        for section, matrix in (("matrix", self.matrix), ("matrix_zero", self.matrix_zero)):
            for name in matrix.model:
                if name not in self.models:
                    raise ValueError(f"{section}.model: '{name}' is not a key of `models` ({', '.join(self.models)})")
        for name, entry in self.models.items():
            if entry.source.startswith("builtin:") and entry.source.split(":", 1)[1] not in self.builtin:
                raise ValueError(f"models.{name}.source: no `builtin.{entry.source[8:]}` section defines it")
        check_matrix(self)
        return self

    def strategy(self, name: str) -> Strategy:
        """The settings of a strategy (its `strategies` section; checked to exist for every matrix strategy)."""
        return self.strategies.get(name, Strategy())

    def processes(self, strategy: str) -> int:
        """Processes (GPUs) per node that one job of `strategy` runs: what its rule asks `gpu=` for."""
        return self.strategy(strategy).gpus

    def variant_train(self, precision: str) -> Train:
        """`train` with the precision's overrides applied."""
        override = self.variants.get(precision)
        if override is None:
            return self.train
        return self.train.model_copy(update=override.model_dump(exclude_none=True))


def variant_id(model: str, precision: str, strategy: str) -> str:
    """The name of one variant everywhere: paths, DVC stage suffixes, metrics rows."""
    return f"{model}-{precision}-{strategy}"


def variants(params: Params) -> list[dict[str, str]]:
    """Every variant of `matrix`, then of `matrix_zero`, each grouped by strategy, in a stable order."""
    out = []
    for m in (params.matrix, params.matrix_zero):
        out += [{"model": a, "precision": b, "strategy": c, "id": variant_id(a, b, c)}
                for c in m.strategy for a in m.model for b in m.precision]
    return out


def refusal(params: Params, model: str, precision: str, strategy: str, device: str | None = None,
            gpus: Sequence[tuple[str, tuple[int, int]]] = ()) -> str | None:
    """Why a variant cannot run (None: it can). Checked for the whole matrix before any compute; `device`
    ("cpu"/"cuda", None: not known yet) and `gpus` ((name, compute capability) of the GPUs the jobs may get)
    add what only that kind of machine cannot do."""
    vid = variant_id(model, precision, strategy)
    entry = params.models[model]
    settings = params.strategy(strategy)
    if strategy not in params.strategies:
        return f"strategies.{strategy}: missing; add it (`{strategy}: {{}}` takes the defaults)"
    if strategy == "single" and (settings.gpus != 1 or settings.nodes != 1 or settings.offload_optimizer):
        return "strategies.single: one device, no offload; use zero2/zero3 for several GPUs, nodes or offload"
    if settings.offload_params and strategy != "zero3":
        return f"strategies.{strategy}.offload_params: parameter offload exists only in ZeRO-3; use zero3 or remove it"
    if precision == "int8" and strategy == "zero3":
        return (f"{vid}: bitsandbytes LLM.int8 weights cannot be partitioned by ZeRO-3; "
                "use zero2 for int8, or nf4 under zero3")
    if precision == "nf4" and strategy == "zero3" and settings.nf4_quant_storage not in ("auto", "bfloat16"):
        return (f"{vid}: ZeRO-3 partitions 4-bit weights only when their storage dtype equals the compute dtype "
                f"(bfloat16), not {settings.nf4_quant_storage}; set strategies.zero3.nf4_quant_storage: auto")
    if precision == "fp16" and strategy == "zero3" and device == "cpu":
        return (f"{vid}: DeepSpeed on CPU has no fp16 mode, so ZeRO-3 would partition the weights as fp32 and "
                "train no fp16 at all; run fp16 under zero3 on GPUs, or use zero2 (fp16 weights) or bf16 here")
    old = sorted({f"{name} ({c[0]}.{c[1]})" for name, c in gpus if not bf16_capable(c)})
    if precision in ("bf16", "nf4") and device == "cuda" and old:
        return (f"{vid}: {precision} computes in bfloat16, which needs GPUs of compute capability 8.0+ (Ampere or "
                f"newer), and this machine's jobs may get {', '.join(old)} (torch.cuda.is_bf16_supported() says "
                "yes there only by emulation); use fp16 or int8 on them, or hide them with CUDA_VISIBLE_DEVICES")
    if params.variant_train(precision).packing and entry.trust_remote_code:
        return (f"{vid}: train.packing needs transformers' own attention code, which keeps packed examples apart; "
                f"models.{model} runs its own (trust_remote_code); set train.packing: false for it")
    if precision == "fp16" and entry.trained_dtype == "bfloat16" and not entry.force_fp16:
        return (f"{vid}: models.{model} was trained in bfloat16, whose range fp16 lacks (activations overflow, "
                f"the loss turns NaN); use bf16 or nf4, or set models.{model}.force_fp16: true to try anyway")
    return None


def check_matrix(params: Params, device: str | None = None, gpus: Sequence[tuple[str, tuple[int, int]]] = ()) -> None:
    """Refuse the first impossible variant of the matrix (on `device` with `gpus`, when known), naming it and
    the reason."""
    seen = set()
    for v in variants(params):
        if v["id"] in seen:
            raise ValueError(f"{v['id']}: in both matrix and matrix_zero; list each variant once")
        seen.add(v["id"])
        reason = refusal(params, v["model"], v["precision"], v["strategy"], device, gpus)
        if reason:
            raise ValueError(reason)


def check_machine(params: Params, device: str, path: str | Path,
                  gpus: Sequence[tuple[str, tuple[int, int]]] = ()) -> None:
    """`check_matrix` for the machine the jobs run on (`cpu`/`cuda`, its GPUs' names and compute capabilities:
    `workflow.devices.Machine.described`): a ParamsError naming the params file."""
    try:
        check_matrix(params, device, gpus)
    except ValueError as exc:
        raise ParamsError(f"{path}: {exc}") from None


def _location(err: dict) -> str:
    return ".".join(str(p) for p in err["loc"] if not str(p).startswith(("function-", "literal[")))


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ParamsError with a one-line, key-naming message."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"{path}: not found; run from the project root or pass --params")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML ({exc.__class__.__name__}); fix the syntax") from exc
    return validate_params(raw, path)


def validate_params(raw: object, path: str | Path = "params.yaml") -> Params:
    """Validate an already-parsed params mapping (the Snakefile's `config`); errors name `path` and the key."""
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: must be a mapping of sections (matrix, models, train, ...)")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = _location(first)  # empty for cross-section checks, whose message names the keys itself
        msg = first["msg"].removeprefix("Value error, ")
        if first["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check its spelling"
        extra = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ParamsError(f"{path}: {key + ': ' if key else ''}{msg}{extra}") from exc
