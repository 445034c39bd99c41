"""K adapters of one recipe in one PEFT model, trained side by side in one pass over the shared frozen
base (``sweep.side_by_side``): the PEFT mechanics; the loop is :mod:`~tokmask_peft.training`'s.

A sweep trains the same recipe at K masking rates of one seed: same data order, same initial adapter
and head, only the mask differs. On a GPU a small LoRA step is launch-bound, so K steps cost about
what one step over K times the rows costs. Each batch is replicated K times (rows k·B … k·B+B
are slot k's, masked at slot k's rate) and routes each slice through its own adapter:

- every LoRA linear holds K adapters (PEFT's multi-adapter model, one ``adapter_name`` per slot) and
  adds slot k's low-rank update to slice k with two batched matmuls over the stacked weights;
- the head (``modules_to_save``) and a trained ``<mask>`` row (``trainable_token_indices``) exist
  once per slot; each slice goes through its own.

Each slot's tensors are its own PEFT adapter, so its optimizer state, clipping, early stopping and
saving stay separate, and a slot saves as an ordinary run directory that plain PEFT loads.

PEFT internals used here (checked against peft 0.21): ``lora_A``/``lora_B``/``lora_dropout``/``scaling``/
``lora_variant`` of LoRA layers, ``modules_to_save`` of ``ModulesToSaveWrapper``, and
``trainable_token_indices``/``trainable_tokens_delta``/``_get_embed_scale()`` of trainable token rows.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch

from .masking import TokenMasker

__all__ = ["AdapterSlots", "SlotMasker", "slot_names", "replicate"]
FIRST = "default"
"""Slot 0 is PEFT's own adapter; the others are copies of it (same initial weights)."""


def slot_names(k: int) -> list[str]:
    return [FIRST, *(f"slot_{i}" for i in range(1, k))]


def replicate(batch: dict, k: int) -> dict:
    """Every tensor of ``batch`` stacked ``k`` times along the batch dimension (slot k: rows k·B…)."""
    if k == 1:
        return batch
    return {key: value.repeat(k, *[1] * (value.dim() - 1)) if torch.is_tensor(value) else value
            for key, value in batch.items()}


class AdapterSlots:
    """The slots of a PEFT model, and which of them the next forward pass runs (``active``, in row order).

    Args:
        model: a PEFT model fresh from ``get_peft_model`` (one adapter, ``default``), before any
            precision casting: the copies must be cast with it.
        k: the number of slots; ``default`` is copied ``k - 1`` times.
    """

    def __init__(self, model, k: int):
        from peft.tuners.lora import LoraLayer
        from peft.tuners.trainable_tokens.layer import TrainableTokensLayer
        from peft.utils import ModulesToSaveWrapper

        self.names = slot_names(k)
        self.active = list(self.names)
        config = model.peft_config[FIRST]
        for name in self.names[1:]:
            model.add_adapter(name, config)
        _copy_first_into_others(model, self.names)
        self.lora = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.heads = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        self.tokens = [m for m in model.modules() if isinstance(m, TrainableTokensLayer)]
        for layer in self.lora:
            _check_plain_lora(layer)
        self.params = {name: _slot_parameters(model, self, name) for name in self.names}
        for layer in (*self.lora, *self.tokens):
            layer.enable_adapters(False)  # the base path only; the hook adds the slots' updates
        for params in self.params.values():
            for p in params.values():
                p.requires_grad_(True)
        self.handles = [*(m.register_forward_hook(self._lora_hook) for m in self.lora),
                        *(m.register_forward_hook(self._head_hook) for m in self.heads),
                        *(m.register_forward_hook(self._tokens_hook) for m in self.tokens)]

    @contextlib.contextmanager
    def only(self, names: list[str] | str) -> Iterator[None]:
        """Run just these slots (in this order) inside the block: evaluation of one slot, fewer slots."""
        before, self.active = self.active, [names] if isinstance(names, str) else list(names)
        try:
            yield
        finally:
            self.active = before

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def _chunks(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        k = len(self.active)
        if x.shape[0] % k:
            raise ValueError(f"a side-by-side forward needs a batch of {k} equal slices, got {x.shape[0]} rows")
        return x.chunk(k)

    def _lora_hook(self, layer, args, result):
        x = args[0]
        k = len(self.active)
        a = torch.stack([layer.lora_A[n].weight for n in self.active])  # (k, r, in)
        b = torch.stack([layer.lora_B[n].weight for n in self.active])  # (k, out, r)
        first = self.active[0]
        x = layer.lora_dropout[first](x.to(a.dtype)).reshape(k, -1, x.shape[-1])  # slice k: its rows, flattened
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2)) * layer.scaling[first]
        return result + delta.reshape(result.shape).to(result.dtype)

    def _head_hook(self, wrapper, args, result):
        outputs = [wrapper.modules_to_save[n](chunk) for n, chunk in zip(self.active, self._chunks(args[0]))]
        return torch.cat(outputs)

    def _tokens_hook(self, layer, args, result):
        ids = args[0]
        slices = []
        for name, chunk, out in zip(self.active, self._chunks(ids), self._chunks(result)):
            delta = layer.trainable_tokens_delta[name].to(out.dtype)
            scale = layer._get_embed_scale()
            for j, token in enumerate(layer.token_indices[name]):
                row = delta[j] if scale is None else delta[j] * scale.to(out.dtype)
                out = torch.where((chunk == token)[..., None], row, out)
            slices.append(out)
        return torch.cat(slices)


def _copy_first_into_others(model, names: list[str]) -> None:
    """Every slot starts where a lone run of this seed starts: from ``default``'s fresh weights."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    first = get_peft_model_state_dict(model, adapter_name=FIRST)
    for name in names[1:]:
        set_peft_model_state_dict(model, first, adapter_name=name)


def _check_plain_lora(layer) -> None:
    """The batched update covers the plain low-rank product on a linear layer, nothing else."""
    kinds = {type(m).__name__ for m in layer.lora_A.values()}
    if kinds != {"Linear"} or layer.lora_variant or any(m.bias is not None for m in layer.lora_A.values()):
        raise ValueError(f"sweep.side_by_side supports plain LoRA on linear layers; {type(layer).__name__} has "
                         f"{sorted(kinds)} adapters{' with a variant (DoRA…)' if layer.lora_variant else ''}")


def _slot_parameters(model, slots: AdapterSlots, name: str) -> dict[str, torch.nn.Parameter]:
    """Slot ``name``'s tensors, by their names in ``model``: its LoRA matrices, head copy, token rows."""
    owned = set()
    for layer in slots.lora:
        owned |= {id(p) for p in (*layer.lora_A[name].parameters(), *layer.lora_B[name].parameters())}
    for wrapper in slots.heads:
        owned |= {id(p) for p in wrapper.modules_to_save[name].parameters()}
    for layer in slots.tokens:
        owned.add(id(layer.trainable_tokens_delta[name]))
    return {n: p for n, p in model.named_parameters() if id(p) in owned}


class SlotMasker:
    """One :class:`TokenMasker` per slot, each masking its own slice of a replicated batch.

    The masking hook calls it like a single masker; slot k's generator draws exactly what a lone run's
    would, so a slot sees the masks its lone run would have seen.
    """

    def __init__(self, slots: AdapterSlots, maskers: dict[str, TokenMasker]):
        self.slots, self.maskers = slots, maskers

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 word_ids: torch.Tensor | None = None) -> torch.Tensor:
        k = len(self.slots.active)
        split = [t.chunk(k) if t is not None else [None] * k for t in (input_ids, attention_mask, word_ids)]
        return torch.cat([self.maskers[name](*parts) for name, *parts in zip(self.slots.active, *split)])

    def apply(self, batch: dict) -> dict:
        """:meth:`TokenMasker.apply` slot by slot, each on its own slice of the replicated batch."""
        k = len(self.slots.active)
        parts = [{} for _ in range(k)]
        for key, tensor in batch.items():
            for part, piece in zip(parts, tensor.chunk(k) if tensor is not None else [None] * k):
                part[key] = piece
        done = [self.maskers[name].apply(part) for name, part in zip(self.slots.active, parts)]
        return {key: torch.cat([d[key] for d in done]) for key in done[0]}

    def state_dict(self) -> dict:
        return {name: masker.state_dict() for name, masker in self.maskers.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, masker in self.maskers.items():
            masker.load_state_dict(state[name])

    @contextlib.contextmanager
    def pause(self):
        with contextlib.ExitStack() as stack:
            for masker in self.maskers.values():
                stack.enter_context(masker.pause())
            yield self
