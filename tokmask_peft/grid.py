"""A sweep's grid: rates × seeds, each point one run trained into ``seed_N.partial`` and promoted to
``seed_N`` once complete. Both executors (local, Ray) train a point through :func:`train_one`.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import PartialState

from .config import Recipe
from .packed_training import train_pack
from .runs import is_complete, partial_dir, promote, refuse_other_recipe, run_dir
from .setup import Setup
from .training import train


PACKS_DIR = ".packs"
"""Under a sweep directory: the checkpoints of packs in training (``sweep.pack``)."""


def grid(recipe: Recipe) -> list[tuple[float, int]]:
    return [(rate, seed) for rate in recipe.sweep.rates for seed in recipe.sweep.seeds]


def run_recipe(recipe: Recipe, rate: float, seed: int) -> Recipe:
    return recipe.with_overrides([f"masking.rate={rate}", f"train.seed={seed}"])


def pending(recipe: Recipe, out: Path) -> list[tuple[float, int]]:
    """The (rate, seed) pairs whose run directory is not complete yet."""
    return [(rate, seed) for rate, seed in grid(recipe) if not is_complete(run_dir(out, rate, seed))]


def check_finished_runs(recipe: Recipe, out: Path) -> None:
    """Refuse to extend a sweep whose finished runs were trained with another recipe: the table
    would mix the two, and ``recipe.yaml`` would describe only one of them. New rates and seeds
    are fine; output paths, logging and workers may differ."""
    for rate, seed in grid(recipe):
        path = run_dir(out, rate, seed)
        if is_complete(path):
            refuse_other_recipe(path, run_recipe(recipe, rate, seed),
                                "sweep into another output directory, or delete the runs to retrain them")


def packs(todo: list[tuple[float, int]], size: int) -> list[tuple[list[float], int]]:
    """The pending points as packs: up to ``size`` rates of one seed each (every point alone for 0 or 1)."""
    if size <= 1:
        return [([rate], seed) for rate, seed in todo]
    by_seed: dict[int, list[float]] = {}
    for rate, seed in todo:
        by_seed.setdefault(seed, []).append(rate)
    return [(rates[i:i + size], seed) for seed, rates in by_seed.items() for i in range(0, len(rates), size)]


def train_packed(recipe: Recipe, rates: list[float], seed: int, out: Path, setup: Setup) -> list[Path]:
    """Train the grid points ``rates`` × ``seed`` as one pack (:mod:`~tokmask_peft.packed_training`), each
    into its ``.partial`` directory, renamed once complete; one point left is trained alone."""
    finals = [run_dir(out, rate, seed) for rate in rates]
    todo = [(rate, partial_dir(final)) for rate, final in zip(rates, finals) if not is_complete(partial_dir(final))]
    checkpoint = pack_dir(out, [rate for rate, _ in todo], seed)
    if len(todo) > 1:
        train_pack([run_recipe(recipe, rate, seed) for rate, _ in todo], [partial for _, partial in todo], setup,
                   checkpoint)
    elif todo:
        train(run_recipe(recipe, todo[0][0], seed), setup=setup, output_dir=todo[0][1])
    for final in finals:
        promote(partial_dir(final), final)
    shutil.rmtree(checkpoint, ignore_errors=True)
    if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()
    return finals


def pack_dir(out: Path, rates: list[float], seed: int) -> Path:
    """Where a pack keeps its checkpoint while it trains: named by its seed and rates, so a pack of
    other rates never resumes from it."""
    return out / PACKS_DIR / f"seed_{seed}_mask_{'_'.join(f'{rate:.2f}' for rate in rates)}"


def train_one(recipe: Recipe, rate: float, seed: int, out: Path, setup: Setup | None = None) -> Path:
    """Train one grid point into ``<run>.partial`` and rename it once complete.

    A crash leaves only the ``.partial`` directory (which the next attempt resumes from its
    checkpoint), never a run that looks finished.
    """
    final = run_dir(out, rate, seed)
    partial = partial_dir(final)
    # A whole partial run crashed before the rename: only the rename is left.
    if not is_complete(partial):
        train(run_recipe(recipe, rate, seed), setup=setup, output_dir=partial)
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        promote(partial, final)
    state.wait_for_everyone()
    return final
