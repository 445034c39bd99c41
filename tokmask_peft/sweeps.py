"""Masking-rate sweeps: rates × seeds → one run directory (one adapter) per (rate, seed), trained
locally on one kept base or spread over a Ray cluster, then reported.

    OUT/mask_0.10/seed_0/{adapter_config.json, adapter_model.safetensors, tokmask_config.json, metrics.json, …}
    OUT/results.csv   OUT/results.md   OUT/results.png

Each grid point trains into ``seed_N.partial`` and is renamed ``seed_N`` once complete, so a crash never
leaves a run that looks finished; both executors train a point through :func:`train_one`. Locally,
``sweep.side_by_side`` trains up to K rates of one seed at once over one frozen base. Ray is optional
(``pip install 'tokmask-peft[ray]'``) and imported only by :func:`run_on_ray`: one Ray Tune trial per
point, with Ray's placement, parallelism and retries (``FailureConfig(max_failures)``). The sweep
directory must be on storage every node sees when the cluster has more than one machine.
"""
from __future__ import annotations

import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import yaml
from accelerate import PartialState

from .config import Recipe
from .console import TokmaskWarning
from .recipe_setup import Setup
from .reporting import report, update_cards
from .runs import (CHECKPOINT_DIR, METRICS_FILE, adapter_name, incomplete_because, is_complete, partial_dir, promote,
                   read_metrics, read_run_config, refuse_other_recipe, run_dir, run_dirs)
from .storage import atomic_write_text, hold
from .training import check_side_by_side, train, train_side_by_side

__all__ = ["sweep", "grid", "pending", "run_recipe", "train_one", "run_on_ray"]
SIDE_BY_SIDE_DIR = ".side_by_side"
"""Under a sweep directory: the checkpoints of groups of runs training side by side."""


def sweep(recipe: Recipe, out: str | Path | None = None, executor: str = "local", **executor_options) -> list[dict]:
    """Train every missing (rate, seed) run of ``recipe.sweep`` and write the report.

    The local executor loads tokenizer, data and (for LoRA/QLoRA) the frozen base once and gives
    each run a fresh adapter; ``executor='ray'`` spreads the runs over a Ray cluster (options: those
    of :func:`run_on_ray`).

    Returns:
        The rows of ``results.csv``.
    """
    out = Path(out or recipe.train.output_dir)
    if executor not in ("local", "ray"):
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    if recipe.sweep.side_by_side > 1:
        if executor != "local":
            raise ValueError(f"sweep.side_by_side={recipe.sweep.side_by_side} trains on the local executor; "
                             "set sweep.side_by_side=0 for Ray")
        check_side_by_side(recipe)
    with hold(out, "sweep"):  # a second sweep on this directory is refused at once, naming this one
        check_finished_runs(recipe, out)
        atomic_write_text(out / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        todo = pending(recipe, out, warn=True)
        if executor == "local":
            train_locally(recipe, out, todo)
        else:
            run_on_ray(recipe, out, todo, **executor_options)
        rows = report(out)
        update_cards(out, rows)
        return rows


# ---- the grid ------------------------------------------------------------------------------------


def grid(recipe: Recipe) -> list[tuple[float, int]]:
    return [(rate, seed) for rate in recipe.sweep.rates for seed in recipe.sweep.seeds]


def run_recipe(recipe: Recipe, rate: float, seed: int) -> Recipe:
    return recipe.with_overrides([f"masking.rate={rate}", f"train.seed={seed}"])


def pending(recipe: Recipe, out: Path, warn: bool = False) -> list[tuple[float, int]]:
    """The (rate, seed) pairs whose run directory is not complete yet; with ``warn``, a run directory that
    is there but not whole (damaged, cut short) is named before it is trained again."""
    todo = []
    for rate, seed in grid(recipe):
        path = run_dir(out, rate, seed)
        why = incomplete_because(path)
        if why is None:
            continue
        if warn and path.exists():
            warnings.warn(f"{path} is not a whole run ({why}); training it again", TokmaskWarning, stacklevel=2)
        todo.append((rate, seed))
    return todo


def check_finished_runs(recipe: Recipe, out: Path) -> None:
    """Refuse to extend a sweep whose finished runs were trained with another recipe: every finished run
    in the directory, not only the new grid's points (a new rate or seed under another recipe would mix
    the two in one table, and ``recipe.yaml`` would describe only one of them). Output paths, logging
    and workers may differ."""
    for path in run_dirs(out, warn=False):
        config = read_run_config(path)
        refuse_other_recipe(path, run_recipe(recipe, config["masking"]["rate"], config["seed"]),
                            "sweep into another output directory, or delete the runs to retrain them")


# ---- the local executor --------------------------------------------------------------------------


def train_locally(recipe: Recipe, out: Path, todo: list[tuple[float, int]]) -> None:
    """The pending points one after another (or side by side), on one kept base, each announced with
    where the sweep stands and, after the first, about how long the rest will take."""
    setup = Setup.from_recipe(recipe) if todo else None
    started, done = time.perf_counter(), 0
    for rates, seed in groups(todo, recipe.sweep.side_by_side):
        print(progress_line(done, len(todo), rates, seed, time.perf_counter() - started), flush=True)
        if len(rates) > 1:
            train_group(recipe, rates, seed, out, setup)
        else:
            train_one(recipe, rates[0], seed, out, setup)
        done += len(rates)


def progress_line(done: int, total: int, rates: list[float], seed: int, elapsed_s: float) -> str:
    """``run 3/6: mask_0.10/seed_1 (about 4 min left)``; a group: ``runs 1-3/6 side by side: …``.

    >>> progress_line(2, 4, [0.1], 1, 120.0)
    'run 3/4: mask_0.10/seed_1 (about 2 min left)'
    """
    names = ", ".join(f"{adapter_name(rate)}/seed_{seed}" for rate in rates)
    which = (f"run {done + 1}/{total}" if len(rates) == 1 else
             f"runs {done + 1}-{done + len(rates)}/{total} side by side")
    left = elapsed_s / done * (total - done) if done else None
    return f"{which}: {names}" + (f" (about {_duration(left)} left)" if left is not None else "")


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"


def train_one(recipe: Recipe, rate: float, seed: int, out: Path, setup: Setup | None = None) -> Path:
    """Train one grid point into ``<run>.partial`` and rename it once complete.

    A crash leaves only the ``.partial`` directory (which the next attempt resumes from its
    checkpoint), never a run that looks finished.
    """
    final = run_dir(out, rate, seed)
    partial = partial_dir(final)
    # A whole partial run crashed before the rename: only the rename is left, if this recipe trained it.
    if is_complete(partial):
        refuse_other_recipe(partial, run_recipe(recipe, rate, seed), f"delete {partial} to train it again")
    else:
        train(run_recipe(recipe, rate, seed), setup=setup, output_dir=partial)
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        promote(partial, final)
    state.wait_for_everyone()
    return final


def groups(todo: list[tuple[float, int]], size: int) -> list[tuple[list[float], int]]:
    """The pending points as groups to train side by side: up to ``size`` rates of one seed each
    (every point alone for 0 or 1)."""
    if size <= 1:
        return [([rate], seed) for rate, seed in todo]
    by_seed: dict[int, list[float]] = {}
    for rate, seed in todo:
        by_seed.setdefault(seed, []).append(rate)
    return [(rates[i:i + size], seed) for seed, rates in by_seed.items() for i in range(0, len(rates), size)]


def train_group(recipe: Recipe, rates: list[float], seed: int, out: Path, setup: Setup) -> list[Path]:
    """Train the grid points ``rates`` × ``seed`` side by side, each into its ``.partial`` directory,
    renamed once complete; one point left is trained alone.

    A group killed while it wrote its runs' results resumes whole from its checkpoint: the runs it had
    finished are finished again from the same state (identical files), so no run is retrained alone."""
    finals = [run_dir(out, rate, seed) for rate in rates]
    partials = [partial_dir(final) for final in finals]
    for rate, partial in zip(rates, partials):
        if is_complete(partial):
            refuse_other_recipe(partial, run_recipe(recipe, rate, seed), f"delete {partial} to train it again")
    checkpoint = group_dir(out, rates, seed)
    if (checkpoint / CHECKPOINT_DIR / "recipe.json").is_file():
        for partial in partials:
            (partial / METRICS_FILE).unlink(missing_ok=True)  # finished again from the group's checkpoint
    todo = [(rate, partial) for rate, partial in zip(rates, partials) if not is_complete(partial)]
    checkpoint = group_dir(out, [rate for rate, _ in todo], seed)
    if len(todo) > 1:
        train_side_by_side([run_recipe(recipe, rate, seed) for rate, _ in todo], [partial for _, partial in todo],
                           setup, checkpoint)
    elif todo:
        train(run_recipe(recipe, todo[0][0], seed), setup=setup, output_dir=todo[0][1])
    for final in finals:
        promote(partial_dir(final), final)
    shutil.rmtree(checkpoint, ignore_errors=True)
    if checkpoint.parent.is_dir() and not any(checkpoint.parent.iterdir()):
        checkpoint.parent.rmdir()
    return finals


def group_dir(out: Path, rates: list[float], seed: int) -> Path:
    """Where a side-by-side group keeps its checkpoint while it trains: named by its seed and rates, so
    a group of other rates never resumes from it."""
    return out / SIDE_BY_SIDE_DIR / f"seed_{seed}_mask_{'_'.join(f'{rate:.2f}' for rate in rates)}"


# ---- the Ray executor ----------------------------------------------------------------------------


def train_trial(config: dict) -> None:
    """The Ray Tune trainable: train one grid point of the sweep, report its best dev metrics."""
    import torch
    from ray import tune

    os.chdir(config["cwd"])  # recipes use paths relative to where the sweep was started
    torch.set_num_threads(max(1, int(config["cpus"])))
    rate, seed = config["point"]
    run = train_one(config["recipe"], rate, seed, Path(config["out"]))
    best = read_metrics(run)["best"] or {}
    tune.report({k: v for k, v in best.items() if isinstance(v, (int, float))})


def run_on_ray(recipe: Recipe, out: Path, points: list[tuple[float, int]], cpus_per_run: float = 1.0,
               gpus_per_run: float = 0.0, max_failures: int = 2, address: str | None = None,
               num_cpus: int | None = None, trial: Callable[[dict], None] = train_trial) -> None:
    """Run ``points`` (the missing (rate, seed) pairs) as Ray Tune trials, in parallel as resources allow.

    Args:
        recipe: the sweep's recipe.
        out: the sweep directory (absolute paths are sent to the workers).
        points: (rate, seed) pairs to train; finished ones are already left out by the caller.
        cpus_per_run, gpus_per_run: Ray resources per trial (a GPU per run for real models).
        max_failures: Ray retries of a failed trial; a retry resumes from the run's checkpoint.
        address: a Ray cluster address; default ``RAY_ADDRESS`` or, without it, a local Ray.
        num_cpus: CPUs of a local Ray started here (tests keep it to this machine's two).
        trial: the trainable (default :func:`train_trial`); wrap it to add logging or faults.

    Raises:
        RuntimeError: naming every run still failing after its retries.
    """
    if not points:
        return
    try:
        import ray
        from ray import tune
    except ImportError as e:
        raise ImportError("the ray executor needs Ray: pip install 'tokmask-peft[ray]'") from e
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), num_cpus=num_cpus,
                 include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    out = Path(out).resolve()
    try:
        tuner = tune.Tuner(
            tune.with_resources(trial, {"cpu": cpus_per_run, "gpu": gpus_per_run}),
            param_space={"point": tune.grid_search([list(p) for p in points]), "recipe": recipe, "out": str(out),
                         "cwd": os.getcwd(), "cpus": cpus_per_run},
            run_config=tune.RunConfig(name="ray", storage_path=str(out / ".ray"), verbose=0,
                                      failure_config=tune.FailureConfig(max_failures=max_failures)),
        )
        results = tuner.fit()
        failed = [r.config["point"] for r in results if r.error]
        if failed:
            raise RuntimeError(f"{len(failed)} run(s) failed after {max_failures} retries: (rate, seed) = {failed}; "
                               f"see {out / '.ray'}")
    finally:
        if started_here:
            ray.shutdown()
