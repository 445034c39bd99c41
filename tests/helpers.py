"""Test helpers: the shared assets' paths, tiny random models saved like hub checkpoints, toy data,
and fault injection. Plain functions; the fixtures in conftest.py wrap them."""
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


# ---- tiny models (random weights) saved like hub checkpoints, and toy data ---------------------


ENGLISH = "the good great happy love nice movie day friend really best fun sun water house".split()
SPANISH = "el la bueno malo casa agua amigo dia sol muy mejor triste perro gato noche".split()


def _tiny_config(kind: str, vocab: int):
    from transformers import (
        BertConfig,
        DistilBertConfig,
        LlamaConfig,
        Qwen2Config,
        XLMRobertaConfig,
    )

    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
    if kind == "bert":
        return BertConfig(vocab_size=vocab, max_position_embeddings=128, pad_token_id=0, **common)
    if kind == "xlmr":  # positions start after the pad id: two more than the longest input
        return XLMRobertaConfig(vocab_size=vocab, max_position_embeddings=130, pad_token_id=0, **common)
    if kind == "distilbert":
        return DistilBertConfig(vocab_size=vocab, dim=64, n_layers=2, n_heads=4, hidden_dim=128, pad_token_id=0)
    if kind == "llama":
        return LlamaConfig(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=128, pad_token_id=2,
                           **common)
    return Qwen2Config(vocab_size=vocab, num_key_value_heads=2, max_position_embeddings=128,
                       pad_token_id=151643, tie_word_embeddings=True, **common)


TOKENIZER_OF = {"bert": "bert-uncased", "xlmr": "bert-uncased", "distilbert": "bert-uncased", "llama": "llama2",
                "qwen": "qwen"}


ENCODERS = ("bert", "xlmr", "distilbert")  # saved as bare encoders: the task head is new at load


def make_tiny_model(kind: str, path: Path) -> Path:
    """A 2-layer hidden-64 model (bitsandbytes 4-bit on CPU needs >= 64 inputs) with the real tokenizer's vocabulary, saved with that tokenizer."""
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(shared_path("tokenizers", TOKENIZER_OF[kind]))
    torch.manual_seed(0)
    # Like the real Qwen2.5 checkpoints, leave spare embedding rows, so the added <mask> fits.
    config = _tiny_config(kind, len(tokenizer) + (64 if kind == "qwen" else 0))
    model = AutoModel.from_config(config) if kind in ENCODERS else AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def write_toy_data(folder: Path, n_train: int = 96, n_dev: int = 32, seed: int = 0) -> dict[str, Path]:
    """Learnable toy data: sentence label = the sentence's main language (95 % of its words);
    token tag = each word's language.

    Written as LinCE CoNLL (sentiment-style headers carry the sentence label), so the same files
    serve sequence and token classification.
    """
    import random

    rng = random.Random(seed)
    paths = {}
    for split, n in (("train", n_train), ("dev", n_dev)):
        lines = []
        for i in range(n):
            english = rng.random() < 0.5
            words = [(rng.choice(ENGLISH), "lang1") if rng.random() < (0.95 if english else 0.05)
                     else (rng.choice(SPANISH), "lang2") for _ in range(rng.randint(3, 9))]
            label = "positive" if english else "negative"
            lines.append(f"# sent_enum = {i + 1}\t{label}")
            lines += [f"{w}\t{t}" for w, t in words] + [""]
        paths[split] = folder / f"{split}.conll"
        paths[split].write_text("\n".join(lines))
    return paths


def logged_losses(run: Path) -> list[float]:
    """The training losses a run wrote to its log.jsonl, one per logged step."""
    import json

    return [r["loss"] for r in map(json.loads, (run / "log.jsonl").read_text().splitlines()) if "loss" in r]


def kill_at_training_step(monkeypatch, step: int) -> None:
    """Make the loop die (as a killed process would) in the forward pass of training step ``step``."""
    import torch

    import tokmask_peft.training as loop

    real_loss, calls = loop.task_loss, {"n": 0}

    def loss(problem, logits, labels, *args):
        if torch.is_grad_enabled():  # training, not evaluation
            calls["n"] += 1
            if calls["n"] == step:
                raise KeyboardInterrupt(f"simulated kill at step {step}")
        return real_loss(problem, logits, labels, *args)

    monkeypatch.setattr(loop, "task_loss", loss)



def one_epoch_llama_recipe(tiny_model, toy_data, out: Path, **sections):
    """A tiny LoRA recipe that trains in seconds, for module-scoped fixtures (``make_recipe`` is per test)."""
    from tokmask_peft.config import Recipe

    d = {"model": {"name": tiny_model("llama"), "task": "sequence", "method": "lora", "lora_r": 4, "lora_alpha": 8},
         "data": {"train": str(toy_data["train"]), "dev": str(toy_data["dev"]), "max_length": 16},
         "train": {"output_dir": str(out), "epochs": 1, "batch_size": 16, "lr": 5e-3, "seed": 0}}
    for section, values in sections.items():
        d.setdefault(section, {}).update(values)
    return Recipe.from_dict(d)
