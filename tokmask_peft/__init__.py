"""tokmask_peft: token masking for LoRA/QLoRA text classifiers, driven by Accelerate.

The public API (the README lists it):
    Recipe                    recipes: YAML in, validated, key=value overrides
    train, sweep, report      one run; rates x seeds with one adapter per run; the results table
    Classifier, merge_run     inference with many adapters on one base; merged export
    compare                   full vs LoRA vs QLoRA on one recipe
    mask_tokens, TokenMasker, MaskingCollator, attach_masking, resolve_mask_token, RateSchedule,
    consistency_term, symmetric_kl
                              the masking core, for loops you own or do not own
"""
from .masking import (
    MaskingCollator,
    MaskToken,
    RateSchedule,
    TokenMasker,
    attach_masking,
    consistency_term,
    mask_tokens,
    protected_positions,
    resolve_mask_token,
    symmetric_kl,
)

__version__ = "0.1.0"

_LAZY = {
    "Recipe": "config", "train": "training", "Setup": "recipe_setup", "sweep": "sweeps", "report": "reporting",
    "Classifier": "inference", "merge_run": "inference", "compare": "comparison",
}


def __getattr__(name):
    # The training stack (transformers, peft, accelerate) loads only when asked for, so that
    # `from tokmask_peft import mask_tokens` stays light for users of other trainers.
    if name in _LAZY:
        import importlib

        from .console import quiet_for_library

        quiet_for_library()  # before the stack imports peft (which imports bitsandbytes, which speaks)

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'tokmask_peft' has no attribute {name!r}")


__all__ = ["MaskingCollator", "MaskToken", "RateSchedule", "TokenMasker", "attach_masking", "consistency_term",
           "mask_tokens", "protected_positions", "resolve_mask_token", "symmetric_kl", *_LAZY]
