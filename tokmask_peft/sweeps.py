"""Masking-rate sweeps: rates × seeds → one run directory (one adapter) per (rate, seed), and a
results table and plot rebuilt from those directories alone.

    OUT/mask_0.10/seed_0/{adapter_config.json, adapter_model.safetensors, tokmask_config.json, metrics.json, …}
    OUT/results.csv   OUT/results.md   OUT/results.png
"""
from __future__ import annotations

import csv
import json
import shutil
import statistics
from pathlib import Path
from typing import Iterable

import yaml

from .config import Recipe
from .training import METRICS_FILE, TOKMASK_CONFIG, Setup, refuse_other_recipe, train

REPORT_METRICS = ("weighted_f1", "macro_f1", "accuracy", "loss")


def run_dir(out: str | Path, rate: float, seed: int) -> Path:
    """``OUT/mask_0.10/seed_0``: the rate with two decimals names the adapter too."""
    return Path(out) / f"mask_{rate:.2f}" / f"seed_{seed}"


def is_complete(path: Path) -> bool:
    return (path / METRICS_FILE).is_file() and (path / TOKMASK_CONFIG).is_file()


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


def train_one(recipe: Recipe, rate: float, seed: int, out: Path, setup: Setup | None = None) -> Path:
    """Train one grid point into ``<run>.partial`` and rename it once complete.

    A crash leaves only the ``.partial`` directory (which the next attempt resumes from its
    checkpoint), never a run that looks finished.
    """
    from accelerate import PartialState

    final = run_dir(out, rate, seed)
    partial = final.with_name(final.name + ".partial")
    # A partial with metrics finished but crashed before the rename: only the rename is left.
    if not (partial / METRICS_FILE).exists():
        train(run_recipe(recipe, rate, seed), setup=setup, output_dir=partial)
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        partial.rename(final)
    state.wait_for_everyone()
    return final


def sweep(recipe: Recipe, out: str | Path | None = None, executor: str = "local", **executor_options) -> list[dict]:
    """Train every missing (rate, seed) run of ``recipe.sweep`` and write the report.

    The local executor loads tokenizer, data and (for LoRA/QLoRA) the frozen base once and gives
    each run a fresh adapter; ``executor='ray'`` spreads the runs over a Ray cluster.

    Returns:
        The rows of ``results.csv``.
    """
    out = Path(out or recipe.train.output_dir)
    check_finished_runs(recipe, out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    todo = pending(recipe, out)
    if executor == "local":
        setup = Setup.from_recipe(recipe) if todo else None
        for rate, seed in todo:
            train_one(recipe, rate, seed, out, setup)
    elif executor == "ray":
        from .ray_executor import run_on_ray

        run_on_ray(recipe, out, todo, **executor_options)
    else:
        raise ValueError(f"executor must be 'local' or 'ray', got {executor!r}")
    return report(out)


# ---- the report, from the run directories alone ---------------------------------------------


def collect(out: str | Path) -> list[dict]:
    """One row per complete run under ``out`` (``mask_*/seed_*``), sorted by rate then seed."""
    rows = []
    for path in sorted(Path(out).glob("mask_*/seed_*")):
        if not is_complete(path):
            continue
        metrics = json.loads((path / METRICS_FILE).read_text())
        config = json.loads((path / TOKMASK_CONFIG).read_text())
        best = metrics["best"] or {}
        rows.append({
            "rate": config["masking"]["rate"], "seed": config["seed"], "method": config["method"],
            **{m: best.get(m) for m in REPORT_METRICS}, "best_epoch": best.get("epoch"), "best_step": best.get("step"),
            "trainable_params": metrics["trainable_params"], "wall_time_s": round(metrics["wall_time_s"], 2),
            "peak_memory_mb": round(metrics["peak_memory_mb"], 1),
            **{f"{name}_{m}": values[m] for name, values in metrics.get("extra_eval", {}).items()
               for m in ("weighted_f1", "macro_f1")},
            "run": str(path.relative_to(out)),
        })
    return sorted(rows, key=lambda r: (r["rate"], r["seed"]))


def summarise(rows: Iterable[dict], metric: str = "weighted_f1") -> list[dict]:
    """Mean and sample standard deviation per rate, and which rate is best on ``metric``."""
    by_rate: dict[float, list[dict]] = {}
    for row in rows:
        by_rate.setdefault(row["rate"], []).append(row)
    columns = [m for m in REPORT_METRICS] + sorted({k for r in rows for k in r if k.endswith("_f1")} -
                                                   set(REPORT_METRICS))
    summary = []
    for rate, group in sorted(by_rate.items()):
        entry = {"rate": rate, "seeds": len(group)}
        for m in columns:
            values = [r[m] for r in group if r.get(m) is not None]
            if values:
                entry[m] = statistics.fmean(values)
                entry[f"{m}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary.append(entry)
    if summary:
        pick = min if metric == "loss" else max
        best = pick(summary, key=lambda e: e.get(metric, float("nan")))
        for entry in summary:
            entry["best"] = entry is best
    return summary


def report(out: str | Path, metric: str = "weighted_f1") -> list[dict]:
    """Rebuild ``results.csv``, ``results.md`` and ``results.png`` from the run directories."""
    out = Path(out)
    rows = collect(out)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {out} (expected mask_*/seed_*/{METRICS_FILE})")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    summary = summarise(rows, metric)
    (out / "results.md").write_text(markdown_table(summary, metric))
    plot(summary, out / "results.png", metric)
    return rows


def markdown_table(summary: list[dict], metric: str = "weighted_f1") -> str:
    metrics = [m for m in summary[0] if m not in ("rate", "seeds", "best") and not m.endswith("_std")]
    header = "| mask rate p | seeds | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for e in summary:
        cells = [f"{e[m]:.4f} ± {e[m + '_std']:.4f}" if m in e else "" for m in metrics]
        mark = " **(best)**" if e.get("best") else ""
        lines.append(f"| {e['rate']:.2f}{mark} | {e['seeds']} | " + " | ".join(cells) + " |")
    return (f"Dev metrics per masking rate (mean ± sample std over seeds); best rate by {metric} marked.\n\n"
            + "\n".join(lines) + "\n")


def plot(summary: list[dict], path: Path, metric: str = "weighted_f1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = [e["rate"] for e in summary]
    means = [e.get(metric, float("nan")) for e in summary]
    stds = [e.get(f"{metric}_std", 0.0) for e in summary]
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=120)
    ax.errorbar(rates, means, yerr=stds, marker="o", capsize=4)
    for e in summary:
        if e.get("best"):
            ax.scatter([e["rate"]], [e[metric]], s=140, facecolors="none", edgecolors="red", label="best on dev")
    ax.set_xlabel("masking rate p")
    ax.set_ylabel(f"dev {metric.replace('_', ' ')}")
    ax.set_title(f"{metric.replace('_', ' ')} vs masking rate (n = {max(e['seeds'] for e in summary)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
