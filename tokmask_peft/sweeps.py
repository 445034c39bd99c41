"""Masking-rate sweeps: rates × seeds → one run directory (one adapter) per (rate, seed), trained
locally on one kept base or spread over a Ray cluster, then reported.

    OUT/mask_0.10/seed_0/{adapter_config.json, adapter_model.safetensors, tokmask_config.json, metrics.json, …}
    OUT/results.csv   OUT/results.md   OUT/results.png
"""
from __future__ import annotations

from pathlib import Path

import yaml

from .config import Recipe
from .grid import check_finished_runs, grid, packs, pending, run_recipe, train_one, train_packed
from .packed_training import check_packable
from .ray_executor import run_on_ray
from .reporting import report
from .runs import run_dir
from .setup import Setup
from .storage import atomic_write_text, hold

__all__ = ["sweep", "report", "grid", "pending", "run_dir", "run_recipe", "train_one"]


def sweep(recipe: Recipe, out: str | Path | None = None, executor: str = "local", **executor_options) -> list[dict]:
    """Train every missing (rate, seed) run of ``recipe.sweep`` and write the report.

    The local executor loads tokenizer, data and (for LoRA/QLoRA) the frozen base once and gives
    each run a fresh adapter; ``executor='ray'`` spreads the runs over a Ray cluster.

    Returns:
        The rows of ``results.csv``.
    """
    out = Path(out or recipe.train.output_dir)
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if recipe.sweep.pack > 1:
        if executor != "local":
            raise ValueError(f"sweep.pack={recipe.sweep.pack} trains on the local executor; set sweep.pack=0 for Ray")
        check_packable(recipe)
    with hold(out, "sweep"):  # a second sweep on this directory is refused at once, naming this one
        check_finished_runs(recipe, out)
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        todo = pending(recipe, out)
        if executor == "local":
            setup = Setup.from_recipe(recipe) if todo else None
            for rates, seed in packs(todo, recipe.sweep.pack):
                if len(rates) > 1:
                    train_packed(recipe, rates, seed, out, setup)
                else:
                    train_one(recipe, rates[0], seed, out, setup)
        else:
            run_on_ray(recipe, out, todo, **executor_options)
        return report(out)
