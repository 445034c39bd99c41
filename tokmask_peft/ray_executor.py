"""Spread a sweep's (rate, seed) runs over a Ray cluster: one Ray Tune trial per run.

Optional (``pip install 'tokmask-peft[ray]'``); nothing else in the package imports Ray. Each
trial calls the same :func:`tokmask_peft.grid.train_one` as the local executor, so the
directory layout, the ``.partial``-then-rename rule and resuming from a checkpoint are the
same; Ray adds placement, parallelism and retries (``FailureConfig(max_failures)``). The sweep
directory must be on storage every node sees (a shared filesystem) when the cluster has more
than one machine.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from .config import Recipe
from .grid import train_one
from .runs import read_metrics


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
