"""The README's public API: every name imports as the function or class it documents."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import tokmask_peft


def _run(code: str) -> None:
    """In a fresh interpreter: import order decides what a package attribute holds."""
    subprocess.run([sys.executable, "-c", textwrap.dedent(code)], check=True, timeout=300)


def test_public_names_are_the_documented_objects_whatever_was_imported_first():
    # The CLI imports every submodule first; a submodule named like a public function
    # (tokmask_peft/train.py vs train()) would then shadow the function.
    _run("""
        import inspect
        import tokmask_peft.cli
        from tokmask_peft import (Recipe, train, sweep, report, Classifier, merge_run, compare, Setup,
                                  mask_tokens, TokenMasker, MaskingCollator, attach_masking,
                                  resolve_mask_token, RateSchedule)
        names = dict(train=train, sweep=sweep, report=report, merge_run=merge_run, compare=compare,
                     mask_tokens=mask_tokens, attach_masking=attach_masking, resolve_mask_token=resolve_mask_token)
        for name, obj in names.items():
            assert inspect.isfunction(obj) and obj.__name__ == name, (name, obj)
        for cls in (Recipe, Classifier, Setup, TokenMasker, MaskingCollator, RateSchedule):
            assert inspect.isclass(cls), cls
    """)


def test_masking_core_imports_without_the_training_stack():
    _run("""
        import sys
        from tokmask_peft import mask_tokens, TokenMasker, attach_masking
        heavy = [m for m in ("peft", "accelerate", "transformers") if m in sys.modules]
        assert not heavy, heavy
    """)


def test_all_lists_only_importable_names():
    missing = [name for name in tokmask_peft.__all__ if getattr(tokmask_peft, name, None) is None]
    assert not missing
