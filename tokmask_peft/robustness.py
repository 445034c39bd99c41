"""Robustness: shifted copies of an evaluation set (corrupted at severity q, or redacted), the same for
every run and rate.

The shifts are one registry, :data:`CORRUPTIONS` (name → title, function, whether it takes a severity,
whether it needs word tags): scoring, condition names, the results columns, the report's titles and
plots all read it, so a new shift is one entry and its function. Each graded one is drawn with a fixed
seed from (corruption, q) alone, so every run of every sweep is scored on identical copies:

- ``delete``: each word is dropped with probability q (a text keeps at least one word; token
  tasks drop the word's label with it);
- ``mask``: each word is replaced, all of its sub-word pieces, by the mask token (through
  :func:`~tokmask_peft.masking.mask_tokens` with ``unit='word'``: special tokens and padding stay);
- ``typo``: each word of two or more characters gets one typo with probability q: two adjacent
  characters swapped, one deleted, or a letter inserted;
- ``entities_mask`` / ``entities_placeholder`` / ``entities_delete``: every word tagged ``ne`` (LinCE's
  named entities) masked (all its pieces), replaced by the literal ``[NAME]`` that PII scrubbers write
  (tokenised as text: the model never saw it), or deleted (a text keeps at least one word). No severity;
  data without word tags is refused.

The graded shifts change both texts of a sentence pair. q = 0 returns the clean set itself. A
*condition* is a shift with its severity: ``mask@0.2``, ``entities_placeholder`` (:func:`condition_name`).
"""
from __future__ import annotations

import dataclasses
import random
import string
import zlib
from typing import Callable

import torch

from .data import Example, encode
from .masking import mask_tokens
from .metrics import DEFAULT_METRICS

def corruption_seed(kind: str, q: float) -> int:
    return zlib.crc32(f"{kind}:{q:.4f}".encode())


def _words(example: Example) -> tuple[list[str], list | None]:
    if isinstance(example.text, list):
        return list(example.text), list(example.label) if isinstance(example.label, list) else None
    return example.text.split(), None


def _rebuild(example: Example, words: list[str], labels: list | None) -> Example:
    if isinstance(example.text, list):
        return dataclasses.replace(example, text=words, label=labels if labels is not None else example.label)
    return dataclasses.replace(example, text=" ".join(words))


def shift_words(examples: list[Example], seed: int, change: Callable) -> list[Example]:
    """Each example's words, and a sentence pair's second text after them, through ``change(words, labels,
    rng)`` → ``(words, labels)``, one seeded stream for the whole set (single texts draw as they always did)."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        changed = _rebuild(ex, *change(*_words(ex), rng))
        if ex.pair is not None:
            changed = dataclasses.replace(changed, pair=" ".join(change(ex.pair.split(), None, rng)[0]))
        out.append(changed)
    return out


def delete_words(examples: list[Example], q: float, seed: int) -> list[Example]:
    def delete(words: list[str], labels: list | None, rng: random.Random) -> tuple[list[str], list | None]:
        if not words:
            return words, labels
        keep = [i for i in range(len(words)) if rng.random() >= q] or [rng.randrange(len(words))]
        return [words[i] for i in keep], [labels[i] for i in keep] if labels else None
    return shift_words(examples, seed, delete)


def typo(word: str, rng: random.Random) -> str:
    """One typo inside ``word``: swap two adjacent characters, delete one, or insert a letter."""
    i = rng.randrange(len(word) - 1)
    kind = rng.randrange(3)
    if kind == 0:
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    return word[:i + 1] + rng.choice(string.ascii_lowercase) + word[i + 1:]


def typo_words(examples: list[Example], q: float, seed: int) -> list[Example]:
    def misspell(words: list[str], labels: list | None, rng: random.Random) -> tuple[list[str], list | None]:
        return [typo(w, rng) if len(w) > 1 and rng.random() < q else w for w in words], labels
    return shift_words(examples, seed, misspell)


def mask_words(features: list[dict], q: float, seed: int, mask_id: int) -> list[dict]:
    """Encoded features with each word's pieces replaced by ``mask_id`` with probability q."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for f in features:
        ids = torch.tensor([f["input_ids"]])
        words = torch.tensor([[-1 if w is None else w for w in f["word_ids"]]])
        masked = mask_tokens(ids, q, mask_id, generator=generator, word_ids=words, unit="word")
        out.append({**f, "input_ids": masked[0].tolist()})
    return out


@dataclasses.dataclass(frozen=True)
class Corruption:
    title: str
    """How the report names it: "words deleted"."""
    apply: Callable[[list[Example], list[dict], float, int, Callable, int], list[dict]]
    """``(examples, features, q, seed, encode, mask_id)`` → the corrupted set's features."""
    graded: bool = True
    """Takes a severity q (``train.robustness``); an ungraded shift is applied whole."""
    needs_tags: bool = False
    """Reads per-word tags (LinCE's ``ne``): refused on data without them."""


ENTITY_TAG = "ne"
PLACEHOLDER = "[NAME]"


def entity_words(example: Example) -> list[bool]:
    if example.tags is None:
        raise ValueError(f"{example.source}: no word tags: entity redaction needs LinCE-tagged data")
    return [tag == ENTITY_TAG for tag in example.tags]


def redact_entities(examples: list[Example], how: str) -> list[Example]:
    """Every ``ne`` word replaced by :data:`PLACEHOLDER` (``how='placeholder'``) or dropped (``'delete'``;
    a text of entities alone keeps its first word); token tasks keep their labels aligned."""
    out = []
    for ex in examples:
        words, labels = _words(ex)
        entity = entity_words(ex)
        if how == "placeholder":
            out.append(_rebuild(ex, [PLACEHOLDER if e else w for w, e in zip(words, entity)], labels))
            continue
        keep = [i for i, e in enumerate(entity) if not e] or [0]
        out.append(dataclasses.replace(_rebuild(ex, [words[i] for i in keep], [labels[i] for i in keep] if labels
                                                else None), tags=[ex.tags[i] for i in keep]))
    return out


def mask_entities(examples: list[Example], features: list[dict], mask_id: int) -> list[dict]:
    """Encoded features with every piece of every ``ne`` word replaced by ``mask_id``."""
    out = []
    for ex, f in zip(examples, features):
        entity = entity_words(ex)
        ids = [mask_id if w is not None and w < len(entity) and entity[w] else t
               for t, w in zip(f["input_ids"], f["word_ids"])]
        out.append({**f, "input_ids": ids})
    return out


def _by_words(change: Callable[[list[Example], float, int], list[Example]]):
    return lambda examples, features, q, seed, encode_examples, mask_id: encode_examples(change(examples, q, seed))


CORRUPTIONS: dict[str, Corruption] = {
    "delete": Corruption("words deleted", _by_words(delete_words)),
    "mask": Corruption("words masked", lambda examples, features, q, seed, _, mask_id: mask_words(features, q, seed,
                                                                                                  mask_id)),
    "typo": Corruption("words with typos", _by_words(typo_words)),
    "entities_mask": Corruption("named entities masked", lambda examples, features, q, seed, _, mask_id:
                                mask_entities(examples, features, mask_id), graded=False, needs_tags=True),
    "entities_placeholder": Corruption(f"named entities replaced by {PLACEHOLDER}", lambda examples, features, q,
                                       seed, encode_examples, mask_id: encode_examples(
                                           redact_entities(examples, "placeholder")), graded=False, needs_tags=True),
    "entities_delete": Corruption("named entities deleted", lambda examples, features, q, seed, encode_examples,
                                  mask_id: encode_examples(redact_entities(examples, "delete")), graded=False,
                                  needs_tags=True),
}
GRADED_DEFAULT = ("delete", "mask", "typo")
"""The shifts ``train.robustness`` scores when ``train.robustness_conditions`` names none."""
ROBUSTNESS_METRICS = DEFAULT_METRICS
"""The metric a results row carries for each corruption and severity, by problem type: the problem's own
(weighted F1, micro F1, Pearson), never ``train.metric``, which recipes often set to the loss."""


def check_corruption(kind: str, field: str = "corruption") -> Corruption:
    if kind not in CORRUPTIONS:
        raise ValueError(f"{field} must be one of {list(CORRUPTIONS)}, got {kind!r}")
    return CORRUPTIONS[kind]


def condition_name(kind: str, q: float | None = None) -> str:
    """``mask@0.2`` for a graded shift at severity q; the shift's own name for an ungraded one."""
    return kind if q is None else f"{kind}@{q:g}"


def conditions(kinds: list[str], severities: list[float]) -> list[tuple[str, float | None]]:
    """Every (shift, severity) a run is scored under: graded shifts at each severity, the others once."""
    return [(kind, q) for kind in kinds for q in (severities if CORRUPTIONS[kind].graded else [None])]


def condition_title(condition: str) -> str:
    """``mask@0.2`` → "words masked (q = 0.2)"; an ungraded shift → its title."""
    kind, _, q = condition.partition("@")
    title = CORRUPTIONS[kind].title if kind in CORRUPTIONS else kind
    return f"{title} (q = {q})" if q else title


def shifted_set(evaluation_set: str, condition: str) -> str:
    """The name a condition's copy of an evaluation set is saved under: ``test:mask@0.2``."""
    return f"{evaluation_set}:{condition}"


def robustness_column(kind: str, q: float | str, problem: str = "single_label") -> str:
    """``mask_0.20_weighted_f1``: weighted F1 on dev with a fraction 0.2 of words masked (``…_pearson`` for
    regression, ``…_micro_f1`` for multi-label)."""
    return f"{kind}_{float(q):.2f}_{ROBUSTNESS_METRICS[problem]}"


def parse_robustness_column(column: str) -> tuple[str, float, str] | None:
    """``(kind, q, metric)`` of a :func:`robustness_column` name (whatever underscores the kind holds);
    None for any other column."""
    for kind in sorted(CORRUPTIONS, key=len, reverse=True):
        for metric in dict.fromkeys(ROBUSTNESS_METRICS.values()):
            prefix, suffix = f"{kind}_", f"_{metric}"
            if column.startswith(prefix) and column.endswith(suffix):
                try:
                    return kind, float(column[len(prefix):-len(suffix)]), metric
                except ValueError:
                    continue
    return None


def corrupted_features(examples: list[Example], features: list[dict], kind: str, q: float, tokenizer, task: str,
                       label2id: dict[str, int], max_length: int, mask_id: int,
                       problem: str = "single_label") -> list[dict]:
    """The evaluation set's features under corruption ``kind`` at severity ``q`` (of a sentence pair, both
    texts: each word of either may be deleted, misspelt or masked)."""
    corruption = check_corruption(kind)
    if q == 0 and corruption.graded:
        return features
    return corruption.apply(examples, features, q, corruption_seed(kind, q or 0.0),
                            lambda changed: encode(changed, tokenizer, task, label2id, max_length, problem), mask_id)
