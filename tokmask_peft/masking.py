"""Token masking: the one place in tokmask_peft where input tokens are replaced.

Every training path (sequence and token classification; full, LoRA and QLoRA; the CLI loop;
users of the HF ``Trainer``) goes through :func:`mask_tokens`, either by the
:class:`MaskingCollator` that wraps a padding collator, or by :func:`attach_masking`, a forward
pre-hook that masks only while ``model.training`` is true.

A strategy is three choices: which positions (``unit``: each token, each whole word, or spans of
whole words), what replaces them (``replace``: the mask token, a random ordinary token, BERT's
80/10/10, or nothing: ``delete`` drops them, see :func:`delete_positions`), and whether a consistency
term ties the masked view to the clean one
(:func:`consistency_term`). Word units need the fast tokenizer's word ids in the batch
(``word_ids``: -1 for special tokens and padding).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import torch

MASK_POLICIES = ("auto", "mask", "unk", "new")
NEW_MASK_TOKEN = "<mask>"
UNITS = ("token", "word", "span")
REPLACEMENTS = ("mask", "random", "bert", "delete")
IGNORE_INDEX = -100
NEEDS_WORD_IDS = (
    "masking unit {unit!r} needs word ids in the batch ('word_ids': the fast tokenizer's word_ids(), -1 for "
    "special tokens and padding): build features with tokmask_peft.data.encode and batches with "
    "tokmask_peft.data.padding_collator(tokenizer, task, word_ids=True) (HF Trainer: also "
    "remove_unused_columns=False), or use unit 'token'")


def check_rate(rate: float, name: str = "rate") -> float:
    """Return ``rate`` as a float, or raise ``ValueError`` naming it unless 0 <= rate < 1."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or not 0 <= rate < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {rate!r}")
    return float(rate)


def check_strategy(unit: str = "token", replace: str = "mask", span_mean: float = 3.0, rate: float = 0.0) -> None:
    """Raise ``ValueError`` naming the field unless the strategy is valid at ``rate``.

    Spans need ``rate <= span_mean / (span_mean + 1)``: above it, unmasked gaps would have to be
    shorter than one word on average.
    """
    if unit not in UNITS:
        raise ValueError(f"unit must be one of {list(UNITS)}, got {unit!r}")
    if replace not in REPLACEMENTS:
        raise ValueError(f"replace must be one of {list(REPLACEMENTS)}, got {replace!r}")
    if isinstance(span_mean, bool) or not isinstance(span_mean, (int, float)) or not span_mean >= 1:
        raise ValueError(f"span_mean must be a number >= 1, got {span_mean!r}")
    if unit == "span" and rate > span_mean / (span_mean + 1):
        raise ValueError(f"rate {rate} is too high for spans of mean length {span_mean}: at most "
                         f"span_mean / (span_mean + 1) = {span_mean / (span_mean + 1):.3f}")


def mask_tokens(
    input_ids: torch.Tensor,
    rate: float,
    mask_id: int,
    protected: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    *,
    word_ids: torch.Tensor | None = None,
    unit: str = "token",
    span_mean: float = 3.0,
    replace: str = "mask",
    random_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace unprotected tokens: each token (or each whole word, or spans of words) with probability ``rate``.

    Args:
        input_ids: integer tensor of any shape (word and span units: ``(batch, length)``); never
            modified in place.
        rate: masking probability p in [0, 1); 0 returns ``input_ids`` itself.
        mask_id: the id written into masked positions.
        protected: bool tensor like ``input_ids``, True where a token must never change
            (padding and special tokens; see :func:`protected_positions`).
        generator: the source of randomness, so that masks are reproducible.
        word_ids: word index of each token, -1 where none (specials, padding); ``word``/``span``.
        unit: ``token``, ``word`` (every piece of a chosen word) or ``span`` (whole-word spans of
            geometric length with mean ``span_mean``, covering a fraction p of words).
        replace: ``mask``; ``random`` (a random id of ``random_ids``); ``bert`` (of the chosen
            positions 80 % mask, 10 % random, 10 % unchanged).
        random_ids: the ordinary vocabulary ids random replacement draws from.

    Returns:
        A new tensor of masked ids (or ``input_ids`` when ``rate`` is 0).

    >>> g = torch.Generator().manual_seed(0)
    >>> ids = torch.tensor([[101, 7, 8, 9, 10, 11, 12, 102, 0, 0]])
    >>> protected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    >>> mask_tokens(ids, 0.5, mask_id=103, protected=protected, generator=g)
    tensor([[101,   7, 103, 103, 103,  11, 103, 102,   0,   0]])
    >>> words = torch.tensor([[-1, 0, 0, 1, 2, 2, 2, -1, -1, -1]])  # pieces of three words
    >>> mask_tokens(ids, 0.5, 103, protected, torch.Generator().manual_seed(0), word_ids=words, unit="word")
    tensor([[101, 103, 103,   9, 103, 103, 103, 102,   0,   0]])
    """
    rate = check_rate(rate)
    if rate == 0.0:
        return input_ids
    chosen = choose_positions(input_ids, rate, protected, generator, word_ids, unit, span_mean)
    return replace_positions(input_ids, chosen, mask_id, replace, random_ids, generator)


def choose_positions(input_ids: torch.Tensor, rate: float, protected: torch.Tensor | None = None,
                     generator: torch.Generator | None = None, word_ids: torch.Tensor | None = None,
                     unit: str = "token", span_mean: float = 3.0) -> torch.Tensor:
    """The positions to replace, as a bool tensor like ``input_ids`` (see :func:`mask_tokens`)."""
    check_strategy(unit, "mask", span_mean, rate)
    if unit == "token":
        chosen = _uniform(input_ids.shape, generator, input_ids.device) < rate
        if word_ids is not None:  # given: a token of no word (a segment left unmasked) is never chosen
            chosen &= word_ids.to(input_ids.device) >= 0
    else:
        if word_ids is None:
            raise ValueError(NEEDS_WORD_IDS.format(unit=unit))
        if word_ids.shape != input_ids.shape or input_ids.dim() != 2:
            raise ValueError(f"word_ids {tuple(word_ids.shape)} must match input_ids {tuple(input_ids.shape)}, "
                             "both (batch, length)")
        word_ids = word_ids.to(input_ids.device)
        words = int(word_ids.max()) + 1 if word_ids.numel() else 0
        rows = input_ids.shape[0]
        chosen_words = (_uniform((rows, max(words, 1)), generator, input_ids.device) < rate if unit == "word"
                        else _spans(rows, max(words, 1), rate, span_mean, generator, input_ids.device))
        chosen = chosen_words.gather(1, word_ids.clamp(min=0)) & (word_ids >= 0)
    if protected is not None:
        chosen &= ~protected
    return chosen


def replace_positions(input_ids: torch.Tensor, chosen: torch.Tensor, mask_id: int, replace: str = "mask",
                      random_ids: torch.Tensor | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """``input_ids`` with the ``chosen`` positions replaced as ``replace`` says (see :func:`mask_tokens`)."""
    masked = torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids)
    if replace == "mask":
        return masked
    if random_ids is None or not len(random_ids):
        raise ValueError(f"replace {replace!r} needs random_ids, the ordinary vocabulary ids to draw from "
                         "(TokenMasker.for_tokenizer supplies them)")
    random_ids = random_ids.to(input_ids.device)
    picks = torch.randint(len(random_ids), input_ids.shape, generator=generator,
                          device=generator.device if generator is not None else input_ids.device)
    drawn = random_ids[picks.to(input_ids.device)].to(input_ids.dtype)
    if replace == "random":
        return torch.where(chosen, drawn, input_ids)
    u = _uniform(input_ids.shape, generator, input_ids.device)  # bert: 80 % mask, 10 % random, 10 % kept
    return torch.where(chosen & (u >= 0.8) & (u < 0.9), drawn, torch.where(u < 0.8, masked, input_ids))


def keep_one(chosen: torch.Tensor, protected: torch.Tensor | None) -> torch.Tensor:
    """``chosen`` less, in each row where it would drop every unprotected token, the first of them: a
    deletion never empties an input."""
    maskable = ~protected if protected is not None else torch.ones_like(chosen)
    emptied = maskable.any(1) & ~(maskable & ~chosen).any(1)
    if emptied.any():
        chosen = chosen.clone()
        rows = emptied.nonzero().squeeze(1)
        chosen[rows, maskable[rows].int().argmax(1)] = False
    return chosen


def delete_positions(batch: dict, chosen: torch.Tensor, pad_id: int) -> dict:
    """``batch`` with the ``chosen`` positions dropped from each row (fairseq's WordDropout without a blank,
    OpenNMT's token drop): what is kept moves left in order and the row is padded at its end, the shape
    unchanged. Every per-token tensor moves alike: input ids (padded with ``pad_id``), attention (0),
    token type ids (0), token-task labels (-100), so labels stay aligned with their words."""
    ids, attention = batch["input_ids"], batch.get("attention_mask")
    drop = chosen if attention is None else chosen | (attention == 0)
    order = torch.argsort(drop.to(torch.int8), dim=1, stable=True)
    tail = torch.arange(ids.shape[1], device=ids.device)[None, :] >= (~drop).sum(1, keepdim=True)
    fill = {"input_ids": pad_id, "labels": IGNORE_INDEX}
    out = dict(batch)
    for key, tensor in batch.items():
        if torch.is_tensor(tensor) and tensor.dim() == 2 and tensor.shape == ids.shape:
            out[key] = tensor.gather(1, order).masked_fill(tail, fill.get(key, 0))
    return out


def _uniform(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    """Uniform draws made on the generator's device, then moved: the same seed gives the same mask on
    CPU and GPU."""
    draws = torch.rand(shape, generator=generator, device=generator.device if generator is not None else device)
    if draws.device != device:
        if device.type == "cuda":
            # A copy from pageable memory would first wait for all queued GPU work.
            draws = draws.pin_memory()
        draws = draws.to(device, non_blocking=True)
    return draws


def _spans(rows: int, words: int, rate: float, span_mean: float, generator, device) -> torch.Tensor:
    """Whole-word spans as a two-state Markov chain over words: a span continues with probability
    1 - 1/m (geometric lengths of mean m) and starts after an unmasked word with probability
    p / (m (1 - p)), whose stationary share of masked words is exactly p; the first word is masked
    with probability p, so every word is, in expectation."""
    u = _uniform((rows, words), generator, device)
    stay, start = 1 - 1 / span_mean, rate / (span_mean * (1 - rate))
    out = torch.empty(rows, words, dtype=torch.bool, device=device)
    state = u[:, 0] < rate
    out[:, 0] = state
    for w in range(1, words):
        state = torch.where(state, u[:, w] < stay, u[:, w] < start)
        out[:, w] = state
    return out


def protected_positions(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None, special_ids: Sequence[int] | torch.Tensor
) -> torch.Tensor:
    """Positions that must never be masked: padding (attention 0) and every special token id.

    Padding is protected by the attention mask, not only by id, because decoders pool the last
    non-pad token: a real token turned into pad (or pad into something else) moves the pooled one.
    """
    special = (special_ids if torch.is_tensor(special_ids) else torch.tensor(list(special_ids)))
    special = special.to(input_ids.device, input_ids.dtype)
    protected = torch.isin(input_ids, special)
    if attention_mask is not None:
        protected |= attention_mask.to(input_ids.device) == 0
    return protected


# --------------------------------------------------------------------------------------------
# Which token masks: explicit, recorded, never pad.


@dataclasses.dataclass(frozen=True)
class MaskToken:
    """The resolved mask token; saved beside every adapter so inference and reloads agree."""

    policy: str
    token: str
    id: int
    added: bool
    """True when the token was added to the tokenizer, so its embedding row must be trained."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MaskToken":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})


def resolve_mask_token(tokenizer, policy: str = "auto") -> MaskToken:
    """Choose the mask token for ``tokenizer`` by ``policy``, adding ``<mask>`` where asked.

    Policies: ``auto`` (the tokenizer's mask token, else its unk token, else a new ``<mask>``),
    ``mask``, ``unk``, ``new``, or any token string already in the vocabulary. ``new`` (and
    ``auto`` on Qwen2.5, which has neither mask nor unk) mutates ``tokenizer``: the model's
    embeddings must then be resized and the new row trained (:mod:`tokmask_peft.modeling` does).

    Raises:
        ValueError: the policy cannot be met, or the chosen id equals the pad id.
    """
    if not isinstance(policy, str) or not policy:
        raise ValueError(f"mask token policy must be a non-empty string, got {policy!r}")
    added = False
    if policy == "auto":
        if tokenizer.mask_token_id is not None:
            policy = "mask"
        elif tokenizer.unk_token_id is not None:
            policy = "unk"
        else:
            policy = "new"
        return dataclasses.replace(resolve_mask_token(tokenizer, policy), policy=f"auto:{policy}")
    if policy == "mask":
        if tokenizer.mask_token_id is None:
            raise ValueError("mask token policy 'mask': this tokenizer has no mask token (try 'unk' or 'new')")
        token = tokenizer.mask_token
    elif policy == "unk":
        if tokenizer.unk_token_id is None:
            raise ValueError("mask token policy 'unk': this tokenizer has no unk token (try 'new')")
        token = tokenizer.unk_token
    elif policy == "new":
        token = NEW_MASK_TOKEN
        if token not in tokenizer.get_vocab():
            tokenizer.add_special_tokens({"additional_special_tokens": [token]}, replace_extra_special_tokens=False)
            added = True
    else:
        token = policy
        if token not in tokenizer.get_vocab():
            raise ValueError(f"mask token {token!r} is not in the tokenizer's vocabulary; use policy 'new' to add one")
        policy = "token"
    token_id = tokenizer.convert_tokens_to_ids(token)
    if tokenizer.pad_token_id is not None and token_id == tokenizer.pad_token_id:
        raise ValueError(
            f"mask token {token!r} (id {token_id}) is the pad token: decoders pool the last non-pad "
            "token, so masking into pad would move the pooled position; choose another mask token"
        )
    return MaskToken(policy=policy, token=token, id=int(token_id), added=added)


# --------------------------------------------------------------------------------------------
# How the rate changes during training: a pure function of (step, total steps).


SCHEDULES = ("constant", "warmup", "linear")


@dataclasses.dataclass(frozen=True)
class RateSchedule:
    """Masking rate over training.

    ``constant``: p throughout. ``warmup``: linear 0 → p over the first ``warmup_fraction`` of
    steps, then p. ``linear``: from ``start`` to p over all steps.
    """

    rate: float = 0.1
    kind: str = "constant"
    warmup_fraction: float = 0.1
    start: float = 0.0

    def __post_init__(self):
        check_rate(self.rate, "rate")
        check_rate(self.start, "start")
        if self.kind not in SCHEDULES:
            raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {self.kind!r}")
        if not 0 <= self.warmup_fraction <= 1:
            raise ValueError(f"warmup_fraction must lie in [0, 1], got {self.warmup_fraction!r}")

    def rate_at(self, step: int, total_steps: int) -> float:
        """The rate in force at optimizer step ``step`` (0-based) of ``total_steps``."""
        progress = min(max(step, 0) / max(total_steps, 1), 1.0)
        if self.kind == "constant":
            return self.rate
        if self.kind == "warmup":
            if self.warmup_fraction == 0 or progress >= self.warmup_fraction:
                return self.rate
            return self.rate * progress / self.warmup_fraction
        return self.start + (self.rate - self.start) * progress


# --------------------------------------------------------------------------------------------
# The stateful pieces that carry rate, ids and RNG to the two places masking is applied.


class TokenMasker:
    """Holds mask id, special ids, the strategy, the current rate and a generator; masks a batch on call.

    Shared by the collator and the model hook. ``rate`` is a plain attribute so a training loop
    can set it from a :class:`RateSchedule` each step. The generator is re-seeded inside each
    DataLoader worker from ``seed`` and the worker's own seed (which the DataLoader draws anew
    every epoch), so masks differ between epochs and workers yet repeat for a given seed.
    """

    def __init__(self, mask_id: int, special_ids: Iterable[int], rate: float = 0.1, seed: int = 0,
                 unit: str = "token", replace: str = "mask", span_mean: float = 3.0,
                 random_ids: Sequence[int] | torch.Tensor | None = None, pad_id: int | None = None):
        self.mask_id = int(mask_id)
        self.special_ids = sorted({int(i) for i in special_ids})
        self.rate = check_rate(rate)
        check_strategy(unit, replace, span_mean, self.rate)
        self.unit, self.replace, self.span_mean = unit, replace, float(span_mean)
        self.random_ids = None if random_ids is None else torch.as_tensor(random_ids, dtype=torch.long)
        if replace in ("random", "bert") and (self.random_ids is None or not len(self.random_ids)):
            raise ValueError(f"replace {replace!r} needs random_ids: build the masker with TokenMasker.for_tokenizer")
        if replace == "delete" and pad_id is None:
            raise ValueError("replace 'delete' needs pad_id (what fills a row's end): build the masker with "
                             "TokenMasker.for_tokenizer")
        self.pad_id = pad_id
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.paused = False
        self._worker_seed: int | None = None
        self._on_device: dict[tuple, torch.Tensor] = {}  # one host->device copy per device (see _on)

    @classmethod
    def for_tokenizer(cls, tokenizer, mask_token: MaskToken, rate: float = 0.1, seed: int = 0,
                      **strategy) -> "TokenMasker":
        """Protect every id the tokenizer calls special (BOS/EOS/CLS/SEP/pad/added specials); random
        replacement draws from :func:`ordinary_ids`. ``strategy``: ``unit``, ``replace``, ``span_mean``."""
        special = set(tokenizer.all_special_ids)
        if tokenizer.pad_token_id is not None:
            special.add(tokenizer.pad_token_id)
        if strategy.get("replace", "mask") in ("random", "bert"):
            strategy["random_ids"] = ordinary_ids(tokenizer)
        return cls(mask_token.id, special, rate=rate, seed=seed, pad_id=tokenizer.pad_token_id, **strategy)

    def _sync_worker_generator(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.generator.manual_seed((self.seed * 1_000_003 + info.seed) % 2**63)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 word_ids: torch.Tensor | None = None) -> torch.Tensor:
        if self.replace == "delete":
            raise ValueError("replace 'delete' changes the attention mask and token labels too: call "
                             "masker.apply(batch), as attach_masking and MaskingCollator do")
        if self.rate == 0.0 or self.paused:
            return input_ids
        self._sync_worker_generator()
        special = self._on(("special", *self.special_ids), lambda: torch.tensor(self.special_ids), input_ids)
        random_ids = None if self.random_ids is None else self._on(("random",), lambda: self.random_ids, input_ids)
        protected = protected_positions(input_ids, attention_mask, special)
        return mask_tokens(input_ids, self.rate, self.mask_id, protected, self.generator, word_ids=word_ids,
                           unit=self.unit, span_mean=self.span_mean, replace=self.replace, random_ids=random_ids)

    def apply(self, batch: dict) -> dict:
        """``batch`` (a dict of tensors; its ``word_ids`` taken out) masked: input ids replaced, or with
        ``replace='delete'`` the chosen units dropped from every per-token tensor alike (labels of a token
        task included, where the batch carries them)."""
        batch = dict(batch)
        word_ids = batch.pop("word_ids", None)
        if self.replace != "delete":
            batch["input_ids"] = self(batch["input_ids"], batch.get("attention_mask"), word_ids)
            return batch
        if self.rate == 0.0 or self.paused:
            return batch
        self._sync_worker_generator()
        ids = batch["input_ids"]
        special = self._on(("special", *self.special_ids), lambda: torch.tensor(self.special_ids), ids)
        protected = protected_positions(ids, batch.get("attention_mask"), special)
        chosen = choose_positions(ids, self.rate, protected, self.generator, word_ids, self.unit, self.span_mean)
        self.last_deleted = keep_one(chosen, protected)
        return delete_positions(batch, self.last_deleted, self.pad_id)

    def follow(self, labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """A token task's labels moved as the last :meth:`apply` moved its batch (a loop that keeps the labels
        out of the model call, like tokmask_peft's, aligns them with the shortened rows this way)."""
        deleted = getattr(self, "last_deleted", None)
        if deleted is None or self.replace != "delete" or self.rate == 0.0 or self.paused:
            return labels
        moved = {"input_ids": labels, "attention_mask": attention_mask, "labels": labels}
        return delete_positions(moved, deleted.to(labels.device), self.pad_id)["labels"]

    def _on(self, name: tuple, make: Callable[[], torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The tensor ``make`` builds, on ``like``'s device and dtype, copied there once (not once per batch)."""
        key = (*name, like.device, like.dtype)
        if key not in self._on_device:
            self._on_device[key] = make().to(like.device, like.dtype)
        return self._on_device[key]

    @contextlib.contextmanager
    def pause(self):
        """Pass batches through unmasked inside the block: the clean view of the consistency term."""
        before, self.paused = self.paused, True
        try:
            yield self
        finally:
            self.paused = before

    def state_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rate = check_rate(state["rate"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


def ordinary_ids(tokenizer) -> torch.Tensor:
    """Ids random replacement may emit: the vocabulary less special, added and pad tokens."""
    excluded = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    if tokenizer.pad_token_id is not None:
        excluded.add(tokenizer.pad_token_id)
    return torch.tensor([i for i in range(len(tokenizer)) if i not in excluded], dtype=torch.long)


class MaskingCollator:
    """Wraps a padding collator and masks ``input_ids`` of each batch it builds.

    Use it for training only; evaluation and prediction use the wrapped collator itself.
    Labels never change (``replace='delete'`` moves a token task's labels with their words).
    """

    def __init__(self, collator: Callable[[list], dict], masker: TokenMasker):
        self.collator = collator
        self.masker = masker

    def __call__(self, features: list) -> dict:
        return self.masker.apply(self.collator(features))  # (the model's forward takes no word ids)


def attach_masking(model: torch.nn.Module, masker: TokenMasker) -> torch.utils.hooks.RemovableHandle:
    """Mask ``input_ids`` on every forward call while ``model.training`` is true.

    For loops you do not own (HF ``Trainer``, TRL, Lightning): they call ``model.train()`` and
    ``model.eval()`` already, so masking follows training and never reaches evaluation. A
    ``word_ids`` keyword (word and span units) is taken out of the call in every mode.
    With ``replace='delete'`` the hook drops the chosen positions from every per-token tensor of the call
    (labels too, where the loop passes them in, as the ``Trainer`` does). Returns the hook handle;
    ``handle.remove()`` detaches it.
    """

    def hook(module, args, kwargs):
        word_ids = kwargs.pop("word_ids", None)
        if not module.training:
            return args, kwargs
        if args:  # input_ids passed positionally, maybe attention_mask too (HF's argument order)
            attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            return (masker(args[0], attention_mask, word_ids), *args[1:]), kwargs
        if kwargs.get("input_ids") is None:
            return args, kwargs
        tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        return args, {**kwargs, **masker.apply({**tensors, "word_ids": word_ids})}

    return model.register_forward_pre_hook(hook, with_kwargs=True)


# --------------------------------------------------------------------------------------------
# The consistency term: the masked view's predictions tied to the clean view's.


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, labels: torch.Tensor | None = None,
                 ignore_index: int = -100) -> torch.Tensor:
    """Mean over positions of ½ [KL(p_a ‖ p_b) + KL(p_b ‖ p_a)] of the two softmaxes: ≥ 0, and exactly
    0 for identical logits. Token tasks: only positions whose label is not ``ignore_index``.

    >>> symmetric_kl(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 2.0]]))
    tensor(0.)
    """
    a = logits_a.reshape(-1, logits_a.shape[-1]).float()
    b = logits_b.reshape(-1, logits_b.shape[-1]).float()
    if labels is not None and labels.dim() > 1:
        keep = labels.reshape(-1) != ignore_index
        a, b = a[keep], b[keep]
    if a.shape[0] == 0:
        return a.sum() * 0.0
    log_a, log_b = torch.log_softmax(a, -1), torch.log_softmax(b, -1)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1) + (log_b.exp() * (log_b - log_a)).sum(-1)
    return 0.5 * kl.mean()


def consistency_term(model: torch.nn.Module, inputs: dict, masked_logits: torch.Tensor, masker: TokenMasker,
                     labels: torch.Tensor | None = None, stop_grad: bool = False) -> torch.Tensor:
    """Symmetric KL between the masked view's predictions and a second, clean (unmasked) pass.

    Cutoff (arXiv 2009.13818) and UDA-style consistency: add ``λ · consistency_term(...)`` to the
    loss. At rate 0 with dropout on, the two passes differ only by dropout: this is R-Drop. With
    ``stop_grad`` the clean pass is a fixed target (no graph, cheaper); otherwise gradients flow
    through both passes. ``inputs``: the model's keyword inputs, unmasked (the hook masks them).
    """
    return symmetric_kl(masked_logits, clean_view(model, inputs, masker, stop_grad), labels)


def clean_view(model: torch.nn.Module, inputs: dict, masker, stop_grad: bool = False) -> torch.Tensor:
    """The logits of ``inputs`` with ``masker`` paused: the consistency term's clean pass."""
    with masker.pause(), (torch.no_grad() if stop_grad else contextlib.nullcontext()):
        return model(**inputs).logits
