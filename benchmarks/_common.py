"""Helpers every benchmark shares: timing by alternation, and a self-describing JSON result."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator


def environment() -> dict:
    import torch

    from tokmask_peft.runs import package_versions

    return {
        "machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "versions": package_versions(),
    }


def timed(fn: Callable[[], object]) -> float:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, interleaved A B A B …, so machine noise hits all alike."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            times[name].append(timed(fn))
    return times


def median(xs) -> float:
    return statistics.median(xs)


def benchmark_parser(doc: str | None, **options) -> argparse.ArgumentParser:
    """The flags every benchmark takes, ``--tiny`` (seconds on a tiny model: CI's check that the
    script runs) and ``--out``, plus ``--NAME`` for each keyword (its type taken from the default)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a few seconds on a tiny model: checks the script runs")
    parser.add_argument("--out", default="benchmarks/results", help="where the JSON result goes")
    for name, default in options.items():
        parser.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    return parser


def write_result(name: str, result: dict, out_dir: str | os.PathLike = "benchmarks/results") -> Path:
    from tokmask_peft.storage import atomic_write_text

    path = Path(out_dir) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": name, "environment": environment(), **result}
    atomic_write_text(path, json.dumps(result, indent=2, default=str))  # a reader never sees half a file
    print(f"wrote {path}")
    return path


# ---- shared set-up: a mid-size random decoder with a real tokenizer, real LinCE text ---------

SHARED = Path(os.environ.get("TOKMASK_SHARED", Path(__file__).resolve().parents[1] / ".." / "shared")).resolve()
SHAPES = {  # name: (hidden, layers, heads, kv heads, intermediate)
    "tiny": (64, 2, 4, 2, 128),
    "small": (256, 4, 4, 2, 704),       # intermediates are multiples of 64: bitsandbytes 4-bit on CPU needs it
    "medium": (512, 4, 8, 4, 1408),
    "tinyllama-1.1b": (2048, 22, 32, 4, 5632),
    "qwen2.5-0.5b": (896, 24, 14, 2, 4864),
    # Qwen2.5-0.5B's 24 layers at hidden 64: per-op overhead dominates a step, as it does on a GPU.
    "qwen2.5-0.5b-narrow": (64, 24, 4, 2, 128),
}


def make_decoder(shape: str, path: Path, tokenizer: str = "llama2") -> Path:
    """A random-weight Llama (or Qwen2 for qwen shapes) classifier base with a real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if (path / "config.json").exists():
        return path
    hidden, layers, heads, kv, inter = SHAPES[shape]
    qwen = shape.startswith("qwen")
    tok = AutoTokenizer.from_pretrained(SHARED / "tokenizers" / ("qwen" if qwen else tokenizer))
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  num_key_value_heads=kv, intermediate_size=inter, max_position_embeddings=512)
    torch.manual_seed(0)
    if qwen:
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=151_936, pad_token_id=tok.pad_token_id,
                                             tie_word_embeddings=True, **common))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), pad_token_id=2, **common))
    model.to(torch.bfloat16).save_pretrained(path)  # half the bytes to write and read; loads as any dtype
    tok.save_pretrained(path)
    return path


@contextlib.contextmanager
def decoder(shape: str, tokenizer: str = "llama2") -> Iterator[tuple[Path, Path]]:
    """A temporary folder and, inside it, a random-weight decoder of ``shape``: ``(folder, model_dir)``."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        yield tmp, make_decoder(shape, tmp / "model", tokenizer)


def lince_recipe(model_dir: Path, output_dir: Path, task: str = "sequence", **sections) -> dict:
    """A recipe dict on real LinCE SA (or LID) text; sections update its parts."""
    folder = "sa_spaeng" if task == "sequence" else "lid_spaeng"
    recipe = {
        "model": {"name": str(model_dir), "task": task, "method": "lora", "lora_r": 16, "lora_alpha": 32,
                  "lora_dropout": 0.0},
        "data": {"train": str(SHARED / "data" / "lince" / folder / "train.conll"),
                 "dev": str(SHARED / "data" / "lince" / folder / "dev.conll"), "max_length": 64},
        "masking": {"rate": 0.1},
        "train": {"output_dir": str(output_dir), "epochs": 1, "batch_size": 32, "lr": 2e-4, "seed": 0},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    return recipe


def lora_step_parts(model_dir: Path, folder: Path, batch: int, device, word_ids: bool = False):
    """What a training-step benchmark needs: a LoRA model on a LinCE SA recipe in training mode, its
    Setup, an AdamW over its trainable tensors, and one batch of the ``batch`` longest tweets on
    ``device`` (with word ids for word and span masking). Returns (setup, model, optimizer, batch, labels)."""
    import torch

    from tokmask_peft.config import Recipe
    from tokmask_peft.data import padding_collator
    from tokmask_peft.recipe_setup import Setup

    setup = Setup.from_recipe(Recipe.from_dict(lince_recipe(model_dir, folder / "run",
                                                            data={"max_train_examples": 256})))
    model = setup.model_for(0).to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    features = sorted(setup.train_features, key=lambda f: len(f["input_ids"]))[-batch:]
    inputs = {k: v.to(device) for k, v in padding_collator(setup.tokenizer, "sequence", word_ids)(features).items()}
    return setup, model, optimizer, inputs, inputs.pop("labels")
