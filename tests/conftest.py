"""Fixtures: real tokenizers and LinCE data from ../shared, tiny random models from configs (see helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import make_tiny_model, shared_path, write_toy_data


@pytest.fixture
def load_tokenizer():
    from transformers import AutoTokenizer

    def load(name: str):
        return AutoTokenizer.from_pretrained(shared_path("tokenizers", name))

    return load


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(kind: str) -> str:
        if kind not in made:
            made[kind] = make_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return str(made[kind])

    return get


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory):
    return write_toy_data(tmp_path_factory.mktemp("toy"))


@pytest.fixture
def make_recipe(tiny_model, toy_data, tmp_path):
    from tokmask_peft.config import Recipe

    def make(kind="qwen", task="sequence", method="lora", **sections):
        d = {
            "model": {"name": tiny_model(kind), "task": task, "method": method, "lora_r": 8, "lora_alpha": 16,
                      "lora_dropout": 0.0},
            "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16},
            "masking": {"rate": 0.1},
            "train": {"output_dir": str(tmp_path / "run"), "epochs": 3, "batch_size": 16, "lr": 5e-3,
                      "warmup_ratio": 0.0, "seed": 0, "log_every": 1},
        }
        for section, values in sections.items():
            d.setdefault(section, {}).update(values)
        return Recipe.from_dict(d)

    return make

