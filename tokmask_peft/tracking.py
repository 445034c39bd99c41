"""Experiment trackers through Accelerate (``train.report_to``), not a logger of our own.

Each run is one tracker run named after its place in the sweep (``mask_0.10/seed_0``) inside one
experiment (``train.run_name``, default the output directory's name). The recipe goes in as
hyperparameters (rate, seed, strategy, method, model, ...), and the loss, learning rate, mask rate
and dev metrics are logged as scalars at the steps ``log.jsonl`` records them. ``log.jsonl`` stays
the run's own record. Local trackers (TensorBoard) write to ``SWEEP/tracking/<run>/``; MLflow follows
``MLFLOW_TRACKING_URI``, and W&B and the others follow their usual environment.
"""
from __future__ import annotations

import importlib.util
import re
from pathlib import Path

# Accelerate's tracker names → the module that must import, and the package to install.
TRACKERS = {"tensorboard": (("tensorboard", "tensorboardX"), "tensorboard"), "wandb": (("wandb",), "wandb"),
            "mlflow": (("mlflow",), "mlflow"), "aim": (("aim",), "aim"), "comet_ml": (("comet_ml",), "comet-ml"),
            "clearml": (("clearml",), "clearml"), "dvclive": (("dvclive",), "dvclive"),
            "swanlab": (("swanlab",), "swanlab"), "trackio": (("trackio",), "trackio")}
RUN_NAME_KEY = {"mlflow": "run_name", "wandb": "name", "comet_ml": "experiment_name", "aim": "run_name"}


def check_trackers(names: list[str]) -> None:
    """Refuse unknown trackers and trackers whose package is not installed, naming what to install."""
    if not isinstance(names, list):
        raise ValueError(f"train.report_to must be a list of tracker names, got {names!r}")
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"train.report_to: unknown tracker {name!r}; Accelerate supports {sorted(TRACKERS)}")
        modules, package = TRACKERS[name]
        if not any(importlib.util.find_spec(m) for m in modules):
            raise ValueError(f"train.report_to names {name!r}, but its package is not installed: pip install {package}")


def run_place(out: Path) -> tuple[Path, str]:
    """(where local trackers write, the run's name): a sweep's ``mask_0.10/seed_0(.partial)`` writes
    under the sweep's ``tracking/``; a lone run under its own."""
    seed = re.fullmatch(r"(seed_\d+)(\.partial)?", out.name)
    if seed and out.parent.name.startswith("mask_"):
        return out.parent.parent / "tracking", f"{out.parent.name}/{seed.group(1)}"
    return out / "tracking", out.name


def accelerator_options(recipe, out: Path) -> dict:
    """``Accelerator(**...)`` arguments that turn the trackers on (none when ``report_to`` is empty)."""
    if not recipe.train.report_to:
        return {}
    root, label = run_place(out)
    return {"log_with": list(recipe.train.report_to), "project_dir": str(root / label)}


def start(accelerator, recipe, out: Path) -> None:
    if not recipe.train.report_to:
        return
    root, label = run_place(out)
    experiment = recipe.train.run_name or (root.parent.name if root.parent.name else "tokmask")
    accelerator.init_trackers(experiment, config=hyperparameters(recipe),
                              init_kwargs={t: {RUN_NAME_KEY[t]: label} for t in recipe.train.report_to
                                           if t in RUN_NAME_KEY})


def hyperparameters(recipe) -> dict:
    """The recipe, flattened to ``section.key`` scalars (lists and None as text, as trackers want)."""
    flat = {}
    for section, values in recipe.to_dict().items():
        if section == "sweep":
            continue
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat


def scalars(record: dict) -> tuple[dict, int] | None:
    """A ``log.jsonl`` record as tracker scalars and their step (train/... or dev/...)."""
    if "eval" in record:
        ev = record["eval"]
        return {f"dev/{k}": v for k, v in ev.items() if k not in ("step", "epoch")}, ev["step"]
    if "loss" in record:
        return {f"train/{k}": record[k] for k in ("loss", "lr", "mask_rate", "epoch") if k in record}, record["step"]
    return None
