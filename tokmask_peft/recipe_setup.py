"""What every run of one recipe shares: tokenizer, mask token, labels, encoded splits, and for
LoRA/QLoRA the frozen base, built once so a sweep gives each run a fresh adapter instead of
reloading (and, for QLoRA, re-quantising) the base.
"""
from __future__ import annotations

import dataclasses
import random
import warnings
from typing import Any, Callable, NamedTuple

import torch

from .config import TEST_SET, Recipe, resolve_path
from .console import TokmaskWarning
from .data import Example, check_labels, encode, label_names, read_examples
from .masking import MaskToken
from .modeling import (
    DTYPES,
    add_adapter,
    base_identity,
    build_model,
    check_positions,
    prepare_precision,
    prepare_tokenizer,
)
from .problems import output_names
from .runs import DEV_SET
from .robustness import CORRUPTIONS, corrupted_features

TEST_SHUFFLE_SEED = 7
"""The test carve's own shuffle, apart from the seed-0 shuffles of dev_fraction and max_train_examples."""
COMPUTE_DTYPES = {"no": None, "bf16": "bfloat16", "fp16": "float16"}
MIN_DEV_EXAMPLES = 30
"""Below this a dev set cannot pick an epoch or judge a rate (one example moves accuracy by > 3 points): warned."""


class Splits(NamedTuple):
    train: list[Example]
    dev: list[Example]
    extra: dict[str, list[Example]]
    whole_train: list[Example]
    """The training file as read, before any carve or subset: multi-label takes its label set from it."""


def read_splits(recipe: Recipe, extra_sets: bool = True) -> Splits:
    """Train, dev and extra evaluation examples, with the recipe's subsets taken (``extra_sets=False``: the
    ``data.extra_eval`` files, maybe a whole other corpus, are not read; the test carve still is).

    Shuffles are fixed (seed 0): every rate and seed of a sweep sees the same split and subset.
    """
    d, task = recipe.data, recipe.model.task

    def read(path, split, source: dict | None = None):
        s = source or {"format": d.format, "text_column": d.text_column, "label_column": d.label_column,
                       "encoding_errors": d.encoding_errors}
        return read_examples(resolve_path(path), s["format"], task, s["text_column"], s["label_column"],
                             d.fold_tags, split, s["encoding_errors"], d.text_pair_column,
                             d.label_format(recipe.model.problem_type))

    whole_train = train = read(d.train, "train")
    held_out = {}
    if d.test_from_train:
        if d.test_from_train >= len(train):
            raise ValueError(f"data.test_from_train={d.test_from_train} leaves no training data: "
                             f"{d.train} holds {len(train)} examples")
        train = random.Random(TEST_SHUFFLE_SEED).sample(train, len(train))
        held_out[TEST_SET], train = train[:d.test_from_train], train[d.test_from_train:]
        # Repeated texts (retweets: 49 in LinCE SA train) would leak the test set into training.
        seen = {_key(e) for e in held_out[TEST_SET]}
        train = [e for e in train if _key(e) not in seen]
    if d.dev_fraction:
        train = random.Random(0).sample(train, len(train))
        n_dev = max(1, int(len(train) * d.dev_fraction))
        dev, train = train[:n_dev], train[n_dev:]
    else:
        dev = read(d.dev, "validation")
    dev = dev[: d.max_eval_examples or None]
    if len(dev) < MIN_DEV_EXAMPLES:
        warnings.warn(f"the dev set holds {len(dev)} examples: the best epoch and rate are picked on it and the "
                      f"verdicts judged on it, where one example moves accuracy by {100 / len(dev):.0f} points; give "
                      "data.dev or a larger data.dev_fraction", TokmaskWarning, stacklevel=3)
    if d.max_train_examples and d.max_train_examples < len(train):
        train = random.Random(0).sample(train, d.max_train_examples)
    extra = {name: extra_set(read, d.eval_source(name))[: d.max_eval_examples or None]
             for name in (d.extra_eval if extra_sets else ())}
    return Splits(train, dev, {**extra, **held_out}, whole_train)


def extra_set(read: Callable, source: dict) -> list[Example]:
    """An extra evaluation set as its entry says: read its own way, a fixed random sample where it asks one."""
    examples = read(source["path"], "validation", source)
    if source["sample"] and source["sample"] < len(examples):
        examples = random.Random(EXTRA_SAMPLE_SEED).sample(examples, int(source["sample"]))
    return examples


EXTRA_SAMPLE_SEED = 11


def _key(example: Example):
    return (tuple(example.text) if isinstance(example.text, list) else example.text), example.pair


@dataclasses.dataclass
class Setup:
    """Tokenizer, mask token, labels and tokenised splits: built once, shared by a sweep's runs.

    For LoRA/QLoRA it also keeps the frozen base model (see :meth:`model_for`).
    """

    recipe: Recipe
    tokenizer: Any
    mask_token: MaskToken
    labels: list[str]
    train_features: list[dict]
    dev_features: list[dict]
    extra_features: dict[str, list[dict]]
    base: Any = None
    frozen_dtype: torch.dtype | None = None
    """Set once a run stores the kept base's frozen linears in bf16/fp16: later runs must match it."""
    dev_examples: list = dataclasses.field(default_factory=list)
    """The dev examples as read, for shifted copies (``train.robustness``)."""
    extra_examples: dict = dataclasses.field(default_factory=dict)
    """Each held-out set's examples as read, for shifted copies."""
    base_identity: str | None = None
    """:func:`~tokmask_peft.modeling.base_identity` of the base, recorded with each run's weights."""

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "Setup":
        tokenizer, mask_token = prepare_tokenizer(recipe.model)
        train, dev, extra, whole_train = read_splits(recipe)
        problem = recipe.model.problem_type
        # Multi-label: every label of the training file, so a rare one missing from a subset still has its
        # output (trained as a negative on every example) and a dev row that has it is scored, not refused.
        names = label_names(whole_train if problem == "multi_label" else train)
        labels = output_names(problem, names if problem != "regression" else [])
        if problem != "regression" and len(labels) < 2:
            raise ValueError(f"{recipe.data.train}: training data has {len(labels)} label(s) {labels}; need at least 2")
        if problem != "regression":
            for examples in (dev, *extra.values()):
                check_labels(examples, labels)
        label2id = {label: i for i, label in enumerate(labels)}

        def enc(examples):
            return encode(examples, tokenizer, recipe.model.task, label2id, recipe.data.max_length, problem,
                          recipe.masking.segments)

        return cls(recipe, tokenizer, mask_token, labels, enc(train), enc(dev),
                   {name: enc(ex) for name, ex in extra.items()}, dev_examples=dev, extra_examples=extra,
                   base_identity=base_identity(recipe.model))

    def tagged(self, evaluation_set: str) -> bool:
        """Whether every example of an evaluation set carries word tags (entity redaction needs them)."""
        examples = self.dev_examples if evaluation_set == DEV_SET else self.extra_examples[evaluation_set]
        return bool(examples) and all(ex.tags is not None for ex in examples)

    def can_shift(self, evaluation_set: str, kind: str) -> bool:
        """Whether a set gets a copy under shift ``kind``: entity redaction reads word tags, which a set of
        another corpus may lack."""
        return not CORRUPTIONS[kind].needs_tags or self.tagged(evaluation_set)

    def robustness_features(self, kind: str, q: float | None, evaluation_set: str = DEV_SET) -> list[dict]:
        """An evaluation set (dev, or a held-out one) under shift ``kind`` at severity ``q`` (None: an
        ungraded shift): the same copy for every run and rate."""
        examples, features = ((self.dev_examples, self.dev_features) if evaluation_set == DEV_SET else
                              (self.extra_examples[evaluation_set], self.extra_features[evaluation_set]))
        return corrupted_features(examples, features, kind, q, self.tokenizer,
                                  self.recipe.model.task, {label: i for i, label in enumerate(self.labels)},
                                  self.recipe.data.max_length, self.mask_token.id, self.recipe.model.problem_type)

    def model_for(self, seed: int, device: torch.device | None = None, mixed_precision: str = "no",
                  cast_frozen: bool = True, before_precision: Callable[[Any], None] | None = None):
        """A model ready to train for ``seed``: a fresh full model, or a fresh adapter on the kept base,
        prepared for ``mixed_precision`` (see :func:`~tokmask_peft.modeling.prepare_precision`).

        ``cast_frozen=False`` where the distributed wrapper flattens parameters to one dtype (FSDP).
        ``before_precision(model)`` runs on the fresh model first (a pack adds its adapters there, so
        they are cast like the first).
        """
        compute_dtype = DTYPES.get(COMPUTE_DTYPES[mixed_precision])
        if self.frozen_dtype not in (None, compute_dtype):
            raise ValueError(f"this Setup's kept base holds {self.frozen_dtype} weights from an earlier "
                             f"mixed-precision run; build a new Setup for mixed_precision={mixed_precision!r}")
        cfg = self.recipe.model
        if cfg.method == "full" or self.base is None:
            model = build_model(cfg, self.labels, self.tokenizer, self.mask_token, seed, device)
            if cfg.method != "full":
                self.base = model.get_base_model()
        else:
            model = add_adapter(self.base, cfg, self.mask_token, seed)
        check_positions(model.config, self.recipe.data.max_length)  # before a batch that long fails in training
        if before_precision is not None:
            before_precision(model)
        if prepare_precision(model, cfg.method, compute_dtype, cast_frozen):
            self.frozen_dtype = compute_dtype
        return model

    def release(self, model) -> None:
        """Strip the adapter so the kept base is as loaded (``get_peft_model`` mutated it); layers that
        ``train.compile`` compiled stay compiled, for the next run."""
        if self.recipe.model.method != "full" and self.base is not None:
            model.unload()
