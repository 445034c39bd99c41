"""Faster prediction with an unmerged adapter: the LoRA update goes into the base layer's output
with one in-place ``addmm``.

PEFT computes ``result + lora_B(lora_A(x)) * scaling``: two temporaries the size of the output
and three passes over it. On a CPU those passes, not the rank-r matmuls, made unmerged prediction
~25 % slower than the merged model (benchmarks/adapter_switch.py). The fused form is the same
arithmetic: ``result.addmm_(lora_A(x), lora_B.weight.T, alpha=scaling)``.

It is installed per module instance (the PEFT class is never touched) and used only where it is
exact: no gradients, eval mode, one active plain LoRA adapter, not merged, no mixed-batch
``adapter_names``, matching dtypes. Anything else runs the module's own PEFT forward.
"""
from __future__ import annotations

import types

import torch
from peft.tuners.lora.layer import Linear as LoraLinear

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
