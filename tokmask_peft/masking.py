"""Token masking: the one place in tokmask_peft where input tokens are replaced.

Every training path (sequence and token classification; full, LoRA and QLoRA; the CLI loop;
users of the HF ``Trainer``) goes through :func:`mask_tokens`, either by the
:class:`MaskingCollator` that wraps a padding collator, or by :func:`attach_masking`, a forward
pre-hook that masks only while ``model.training`` is true.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterable, Sequence

import torch

MASK_POLICIES = ("auto", "mask", "unk", "new")
NEW_MASK_TOKEN = "<mask>"


def check_rate(rate: float, name: str = "rate") -> float:
    """Return ``rate`` as a float, or raise ``ValueError`` naming it unless 0 <= rate < 1."""
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or math.isnan(rate) or not 0 <= rate < 1:
        raise ValueError(f"{name} must lie in [0, 1), got {rate!r}")
    return float(rate)


def mask_tokens(
    input_ids: torch.Tensor,
    rate: float,
    mask_id: int,
    protected: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Replace each unprotected token by ``mask_id`` independently with probability ``rate``.

    Args:
        input_ids: integer tensor of any shape; never modified in place.
        rate: masking probability p in [0, 1); 0 returns ``input_ids`` itself.
        mask_id: the id written into masked positions.
        protected: bool tensor like ``input_ids``, True where a token must never change
            (padding and special tokens; see :func:`protected_positions`).
        generator: the source of randomness, so that masks are reproducible.

    Returns:
        A new tensor of masked ids (or ``input_ids`` when ``rate`` is 0).

    >>> g = torch.Generator().manual_seed(0)
    >>> ids = torch.tensor([[101, 7, 8, 9, 10, 11, 12, 102, 0, 0]])
    >>> protected = torch.tensor([[1, 0, 0, 0, 0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    >>> mask_tokens(ids, 0.5, mask_id=103, protected=protected, generator=g)
    tensor([[101,   7, 103, 103, 103,  11, 103, 102,   0,   0]])
    """
    rate = check_rate(rate)
    if rate == 0.0:
        return input_ids
    # Draw on the generator's device, then move: the same seed gives the same mask on CPU and GPU.
    device = generator.device if generator is not None else input_ids.device
    draws = torch.rand(input_ids.shape, generator=generator, device=device)
    if draws.device != input_ids.device:
        if input_ids.device.type == "cuda":
            # A copy from pageable memory would first wait for all queued GPU work.
            draws = draws.pin_memory()
        draws = draws.to(input_ids.device, non_blocking=True)
    chosen = draws < rate
    if protected is not None:
        chosen &= ~protected
    return torch.where(chosen, torch.full_like(input_ids, mask_id), input_ids)


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
    """Holds mask id, special ids, the current rate and a generator; masks a batch on call.

    Shared by the collator and the model hook. ``rate`` is a plain attribute so a training loop
    can set it from a :class:`RateSchedule` each step. The generator is re-seeded inside each
    DataLoader worker from ``seed`` and the worker's own seed (which the DataLoader draws anew
    every epoch), so masks differ between epochs and workers yet repeat for a given seed.
    """

    def __init__(self, mask_id: int, special_ids: Iterable[int], rate: float = 0.1, seed: int = 0):
        self.mask_id = int(mask_id)
        self.special_ids = sorted({int(i) for i in special_ids})
        self.rate = check_rate(rate)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self._worker_seed: int | None = None
        self._special_on: dict[tuple, torch.Tensor] = {}  # one host->device copy per device

    @classmethod
    def for_tokenizer(cls, tokenizer, mask_token: MaskToken, rate: float = 0.1, seed: int = 0) -> "TokenMasker":
        """Protect every id the tokenizer calls special (BOS/EOS/CLS/SEP/pad/added specials)."""
        special = set(tokenizer.all_special_ids)
        if tokenizer.pad_token_id is not None:
            special.add(tokenizer.pad_token_id)
        return cls(mask_token.id, special, rate=rate, seed=seed)

    def _sync_worker_generator(self) -> None:
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_seed != info.seed:
            self._worker_seed = info.seed
            self.generator.manual_seed((self.seed * 1_000_003 + info.seed) % 2**63)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.rate == 0.0:
            return input_ids
        self._sync_worker_generator()
        key = (input_ids.device, input_ids.dtype, tuple(self.special_ids))
        special = self._special_on.get(key)
        if special is None:
            special = self._special_on[key] = torch.tensor(self.special_ids, dtype=input_ids.dtype,
                                                           device=input_ids.device)
        protected = protected_positions(input_ids, attention_mask, special)
        return mask_tokens(input_ids, self.rate, self.mask_id, protected, self.generator)

    def state_dict(self) -> dict[str, Any]:
        return {"rate": self.rate, "seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rate = check_rate(state["rate"])
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


class MaskingCollator:
    """Wraps a padding collator and masks ``input_ids`` of each batch it builds.

    Use it for training only; evaluation and prediction use the wrapped collator itself.
    Labels are never touched.
    """

    def __init__(self, collator: Callable[[list], dict], masker: TokenMasker):
        self.collator = collator
        self.masker = masker

    def __call__(self, features: list) -> dict:
        batch = self.collator(features)
        batch["input_ids"] = self.masker(batch["input_ids"], batch.get("attention_mask"))
        return batch


def attach_masking(model: torch.nn.Module, masker: TokenMasker) -> torch.utils.hooks.RemovableHandle:
    """Mask ``input_ids`` on every forward call while ``model.training`` is true.

    For loops you do not own (HF ``Trainer``, TRL, Lightning): they call ``model.train()`` and
    ``model.eval()`` already, so masking follows training and never reaches evaluation.
    Returns the hook handle; ``handle.remove()`` detaches it.
    """

    def hook(module, args, kwargs):
        if not module.training:
            return None
        if args:  # input_ids passed positionally, maybe attention_mask too (HF's argument order)
            attention_mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            return (masker(args[0], attention_mask), *args[1:]), kwargs
        if kwargs.get("input_ids") is None:
            return None
        kwargs["input_ids"] = masker(kwargs["input_ids"], kwargs.get("attention_mask"))
        return args, kwargs

    return model.register_forward_pre_hook(hook, with_kwargs=True)
