"""Full fine-tuning against LoRA / QLoRA on the same recipe: F1, trainable parameters, wall time,
peak memory and size on disk, in one table.

Each method trains in its own process, so its peak memory is its own (a process's maximum
resident size only grows).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from .config import METHODS, Recipe
from .runs import is_complete, read_metrics, refuse_other_recipe
from .reporting import COMPARISON_FILE
from .storage import atomic_write_text, write_json

ROWS = "comparison.json"
"""Beside the table (``COMPARISON_FILE``, named as ``tokmask report A B`` names its own): the rows as JSON."""


def directory_mb(path: Path) -> float:
    """Size on disk of what a user ships: weights, configs, tokenizer (no logs or checkpoints)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.suffix != ".jsonl") / 2**20


def compare(recipe: Recipe, out: str | Path, methods=("full", "lora", "qlora"),
            method_overrides: dict[str, list[str]] | None = None) -> list[dict]:
    """Train (or reuse) ``out/<method>`` for each method and return one row per method.

    Args:
        recipe: the shared recipe; only ``model.method`` (and ``method_overrides``) differ.
        out: where ``out/full``, ``out/lora``, … go; finished runs are read, not retrained.
        methods: any of full, lora, qlora.
        method_overrides: extra ``key=value`` per method, e.g. ``{"full": ["train.lr=2e-5"]}``.
    """
    out = Path(out)
    recipes = {}
    for method in methods:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        recipes[method] = recipe.with_overrides([f"model.method={method}", f"train.output_dir={out / method}",
                                                 *(method_overrides or {}).get(method, [])])
        refuse_other_recipe(out / method, recipes[method], "compare into another output directory, or delete "
                            "the run to retrain it")
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, r in recipes.items():
        run = out / method
        if not is_complete(run):
            path = out / f"recipe_{method}.yaml"
            path.write_text(yaml.safe_dump(r.to_dict(), sort_keys=False))
            subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "train", str(path)], check=True)
        rows.append(method_row(method, run))
    atomic_write_text(out / COMPARISON_FILE, compare_table(rows))
    write_json(out / ROWS, rows)
    return rows


def method_row(method: str, run: Path) -> dict:
    """The table's row for one finished run: best dev F1, parameters, time, memory, size on disk."""
    metrics = read_metrics(run)
    best = metrics["best"]
    return {"method": method, "weighted_f1": best["weighted_f1"], "macro_f1": best["macro_f1"],
            "trainable_params": metrics["trainable_params"], "total_params": metrics["total_params"],
            "wall_time_s": metrics["wall_time_s"], "peak_memory_mb": metrics["peak_memory_mb"],
            "disk_mb": directory_mb(run)}


def compare_table(rows: list[dict]) -> str:
    lines = ["| method | dev weighted F1 | dev macro F1 | trainable params | % of total | wall time (s) "
             "| peak memory (MB) | size on disk (MB) |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['weighted_f1']:.4f} | {r['macro_f1']:.4f} | {r['trainable_params']:,} | "
                     f"{100 * r['trainable_params'] / r['total_params']:.2f} | {r['wall_time_s']:.1f} | "
                     f"{r['peak_memory_mb']:.0f} | {r['disk_mb']:.1f} |")
    return "\n".join(lines) + "\n"
