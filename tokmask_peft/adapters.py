"""Many adapters on one base: names, per-adapter configs, switching, and a fused unmerged forward.

The PEFT internals inference uses live in this module (checked against peft 0.21): the per-module
active-adapter attributes that ``set_adapter`` writes, and ``lora_A``/``lora_B``/``scaling``/``lora_variant``
of LoRA layers in the fused forward (training side by side has its own, listed in
:mod:`~tokmask_peft.adapter_slots`). Loading and saving go through PEFT's public API only.

The fused forward: PEFT computes ``result + lora_B(lora_A(x)) * scaling``, two temporaries the size
of the output and three passes over it. On a CPU those passes, not the rank-r matmuls, made
unmerged prediction ~25 % slower than the merged model (benchmarks/adapter_switch.py). The fused
form is the same arithmetic: ``result.addmm_(lora_A(x), lora_B.weight.T, alpha=scaling)``. It is
installed per module instance (the PEFT class is never touched) and used only where it is exact:
no gradients, eval mode, one active plain LoRA adapter, not merged, no mixed-batch
``adapter_names``, matching dtypes. Anything else runs the module's own PEFT forward.
"""
from __future__ import annotations

import copy
import types
from pathlib import Path
from typing import Callable

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

SWITCHED_ATTRIBUTES = ("_active_adapter", "active_adapter")


def peft_name(name: str) -> str:
    """PEFT adapter names cannot hold dots (they become module names): ``mask_0.10`` → ``mask_0_10``."""
    return name.replace(".", "_")


def same_head(a: dict, b: dict) -> bool:
    """Two runs' adapters can live in one PEFT model: same task and labels, so the same head shape."""
    return a["task"] == b["task"] and a["labels"] == b["labels"]


class AdapterSet:
    """The adapters loaded on one base, by public name (``mask_0.10``), each with its run config.

    Adapters of one task and label set share a PEFT model. An adapter of another task or label set
    gets its own PEFT model over a classifier whose body is the same body (``new_head`` builds it:
    :func:`~tokmask_peft.modeling.classifier_on_body`), so the body's LoRA layers hold every adapter
    and one base serves them all; :attr:`model` is the PEFT model of the active adapter.

    Switching replays recorded state: PEFT's ``set_adapter`` walks the module tree and resets
    requires_grad on every adapter of every layer (~21 ms on a 30-layer model with 6 adapters). In
    inference mode it leaves all of them frozen, so what differs between adapters is only each
    module's active-adapter attribute; recorded when adapters are loaded, a switch costs ~0.3 ms.
    """

    def __init__(self, model, name: str, config: dict):
        """``model``: a ``PeftModel`` holding one adapter, loaded under ``peft_name(name)``."""
        self.configs: dict[str, dict] = {name: config}
        self.models: dict[str, torch.nn.Module] = {name: model}  # the PEFT model that runs each adapter
        self._active = name
        self._switches: dict[str, list[tuple]] = {}
        fuse_lora_inference(model)  # unmerged adapters predict at (near) merged speed
        self._record_switches()

    @classmethod
    def load(cls, base, run_dir: str | Path, name: str, config: dict) -> "AdapterSet":
        from peft import PeftModel

        return cls(PeftModel.from_pretrained(base, run_dir, adapter_name=peft_name(name)), name, config)

    @property
    def names(self) -> list[str]:
        return list(self.configs)

    @property
    def active(self) -> str:
        return self._active

    @property
    def model(self) -> torch.nn.Module:
        return self.models[self._active]

    def add(self, run_dir: str | Path, name: str, config: dict, new_head: Callable[[], torch.nn.Module]) -> None:
        """Attach ``run_dir``'s adapter as ``name``; ``new_head()`` builds the classifier for a new task or label set."""
        from peft import PeftModel

        clash = [n for n in self.configs if peft_name(n) == peft_name(name)]
        if clash:
            raise ValueError(f"an adapter named {clash[0]!r} is already loaded; pass another name")
        sibling = next((n for n, c in self.configs.items() if same_head(c, config)), None)
        if sibling is not None:
            model = self.models[sibling]
            model.load_adapter(str(run_dir), adapter_name=peft_name(name))
        else:
            model = PeftModel.from_pretrained(new_head(), run_dir, adapter_name=peft_name(name))
        fuse_lora_inference(model)  # the new adapter may wrap modules the first did not
        self.configs[name], self.models[name] = config, model
        self._record_switches()  # it may also have added modules: record every adapter afresh
        model.eval()

    def use(self, name: str) -> None:
        if name not in self.configs:
            raise KeyError(f"no adapter {name!r}; loaded: {self.names}")
        self._replay(name)

    def _replay(self, name: str) -> None:
        for module, attr, value in self._switches[name]:
            setattr(module, attr, copy.copy(value))
        self._active = name

    def _record_switches(self) -> None:
        """Record, per adapter, the state its PEFT model's ``set_adapter`` leaves; :meth:`use` replays it."""
        self._switches.clear()
        for name, model in self.models.items():
            model.set_adapter(peft_name(name), inference_mode=True)
            self._switches[name] = [(module, attr, copy.copy(vars(module)[attr]))
                                    for module in model.modules()
                                    for attr in SWITCHED_ATTRIBUTES if attr in vars(module)]
        self._replay(self._active)


_PEFT_FORWARD = "_tokmask_peft_forward"


def fuse_lora_inference(model: torch.nn.Module, enable: bool = True) -> int:
    """Install (or, with ``enable=False``, remove) the fused forward on every plain LoRA Linear.

    Idempotent; call again after loading an adapter that targets new modules.

    Returns:
        How many modules carry the fused forward afterwards.
    """
    count = 0
    for module in model.modules():
        if type(module) is not LoraLinear or type(module.get_base_layer()) is not torch.nn.Linear:
            continue  # quantised (bitsandbytes) and other layer types keep PEFT's forward
        fused = _PEFT_FORWARD in vars(module)
        if enable and not fused:
            setattr(module, _PEFT_FORWARD, module.forward)
            module.forward = types.MethodType(_fused_forward, module)
        elif not enable and fused:
            del module.forward  # the instance attribute: the class's forward shows through again
            delattr(module, _PEFT_FORWARD)
        count += enable
    return count


def _fused_forward(self: LoraLinear, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    if (args or kwargs or torch.is_grad_enabled() or self.training or self.disable_adapters or self.merged
            or name not in self.lora_A or name in self.lora_variant or self.lora_B[name].bias is not None
            or not x.dtype == self.lora_A[name].weight.dtype == self.get_base_layer().weight.dtype):
        return getattr(self, _PEFT_FORWARD)(x, *args, **kwargs)
    result = self.base_layer(x)
    low = self.lora_A[name](x)  # dropout is the identity in eval mode
    result.view(-1, result.shape[-1]).addmm_(low.view(-1, low.shape[-1]), self.lora_B[name].weight.t(),
                                              alpha=self.scaling[name])
    return result
