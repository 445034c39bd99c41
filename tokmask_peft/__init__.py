"""tokmask_peft: token masking for LoRA/QLoRA text classifiers."""
from .masking import (
    MaskingCollator,
    MaskToken,
    RateSchedule,
    TokenMasker,
    attach_masking,
    mask_tokens,
    protected_positions,
    resolve_mask_token,
)

__version__ = "0.1.0"
