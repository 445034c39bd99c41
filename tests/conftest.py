"""Shared fixtures: real tokenizers and LinCE data from ../shared, tiny random models from configs."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(os.environ.get("TOKMASK_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
TOKENIZERS = SHARED / "tokenizers"
LINCE = SHARED / "data" / "lince"


def shared_path(*parts: str) -> Path:
    """A path under ../shared, or skip the test saying what is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not found: set TOKMASK_SHARED to the shared assets folder")
    return path


@pytest.fixture
def load_tokenizer():
    from transformers import AutoTokenizer

    def load(name: str):
        return AutoTokenizer.from_pretrained(shared_path("tokenizers", name))

    return load
