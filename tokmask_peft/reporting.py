"""A sweep's report, rebuilt from its run directories alone: ``results.csv`` (one row per run),
``results.md`` (mean ± sample std per rate, then each rate's paired verdict against p = 0 and a
recommendation) and ``results.png`` (metric against rate). :func:`update_cards` is the one place a
report writes into run directories: each run's model card gains its rate's verdict.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import statistics
from pathlib import Path
from typing import Iterable

from .metrics import DEFAULT_METRIC, DEFAULT_METRICS, METRICS, PREDICTION_METRICS
from .model_card import CARD, write_card
from .robustness import (
    CORRUPTIONS,
    ROBUSTNESS_METRICS,
    condition_title,
    parse_robustness_column,
    robustness_column,
    shifted_set,
)
from .runs import (
    DEV_SET,
    METRICS_FILE,
    PREDICTIONS_FILE,
    fingerprint_diff,
    incomplete_because,
    held_out_names,
    load_predictions,
    read_metrics,
    read_run_config,
    run_dirs,
)
from .storage import atomic_write_bytes, atomic_write_text
from .verdicts import (
    Verdict,
    chosen_on_dev,
    paired_verdict,
    recommendation,
    recommended,
    recommended_for,
    seed_level_verdict,
    verdict_metric,
)

COMPARISON_FILE = "comparison.md"
"""What ``tokmask report A B`` and ``compare`` write: one table of several sweeps or methods."""


HELD_OUT_COLUMNS = {"single_label": ("weighted_f1", "macro_f1"),
                    "multi_label": ("micro_f1", "macro_f1", "samples_f1", "tuned_micro_f1", "tuned_macro_f1"),
                    "regression": ("pearson", "spearman", "mse")}
"""The metrics of each held-out set the results table shows, per problem type."""


def sweep_metric(out: str | Path, metric: str | None = None) -> str:
    """``metric``, or where None the one a sweep is judged on: its recipe's ``train.metric`` where saved
    predictions can recompute it, else its problem type's default."""
    if metric is not None:
        return verdict_metric(metric)
    runs = run_dirs(out, warn=False)
    if not runs:
        return DEFAULT_METRIC
    config = read_run_config(runs[0])
    chosen = config["recipe"]["train"].get("metric", DEFAULT_METRIC)
    return chosen if chosen in PREDICTION_METRICS else DEFAULT_METRICS[config.get("problem_type", "single_label")]


def run_row(path: Path, out: Path) -> dict:
    """One results-table row from a finished run's two files."""
    metrics, config = read_metrics(path), read_run_config(path)
    best = metrics["best"] or {}
    masking, problem = config["masking"], config.get("problem_type", "single_label")
    return {
        "rate": masking["rate"], "seed": config["seed"], "method": config["method"],
        # Runs written before the strategies existed were uniform token masking.
        "unit": masking.get("unit", "token"), "replace": masking.get("replace", "mask"),
        "consistency": masking.get("consistency", 0.0),
        "neftune_alpha": config["recipe"]["train"].get("neftune_alpha", 0.0),
        **{m: best.get(m) for m in METRICS}, "best_epoch": best.get("epoch"), "best_step": best.get("step"),
        "trainable_params": metrics["trainable_params"], "wall_time_s": round(metrics["wall_time_s"], 2),
        "peak_memory_mb": round(metrics["peak_memory_mb"], 1),
        **{f"{name}_{m}": values[m] for name, values in metrics.get("extra_eval", {}).items()
           for m in HELD_OUT_COLUMNS[problem] if m in values},
        **{robustness_column(kind, q, problem): values[ROBUSTNESS_METRICS[problem]]
           for kind, by_q in metrics.get("robustness", {}).items() for q, values in by_q.items()
           if ROBUSTNESS_METRICS[problem] in values},
        "run": str(path.relative_to(out)),
    }


def collect(out: str | Path) -> list[dict]:
    """One row per finished run under ``out`` (``mask_*/seed_*``), sorted by rate then seed."""
    out = Path(out)
    return sorted((run_row(path, out) for path in run_dirs(out)), key=lambda r: (r["rate"], r["seed"]))


def summarise(rows: Iterable[dict], metric: str = DEFAULT_METRIC) -> list[dict]:
    """Mean and sample standard deviation per rate, and which rate is best on ``metric``."""
    by_rate: dict[float, list[dict]] = {}
    for row in rows:
        by_rate.setdefault(row["rate"], []).append(row)
    suffixes = ("_f1", "_pearson", "_spearman", "_mse")
    columns = list(METRICS) + sorted({k for r in rows for k in r if k.endswith(suffixes)} - set(METRICS))
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
        pick = max if METRICS[metric].higher_is_better else min
        best = pick(summary, key=lambda e: e.get(metric, float("nan")))
        for entry in summary:
            entry["best"] = entry is best
    return summary


def report(out: str | Path, metric: str | None = None) -> list[dict]:
    """Rebuild ``results.csv``, ``results.md`` and ``results.png`` from the run directories; ``metric``
    marks the best rate and is the verdicts' (one that saved predictions can recompute)."""
    out = Path(out)
    metric = sweep_metric(out, metric)
    rows = collect(out)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {out} (expected mask_*/seed_*/{METRICS_FILE})")
    fields = list(dict.fromkeys(k for row in rows for k in row))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=fields)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(out / "results.csv", table.getvalue())
    summary = summarise(rows, metric)
    files = PredictionFiles()
    atomic_write_text(out / "results.md", strategy_line(rows) + markdown_table(summary, metric)
                      + verdict_section(out, rows, metric, files))
    panels = verdict_panels(out, rows, metric, files)
    plot_deltas(panels, out / "results.png", metric) if panels else plot(summary, out / "results.png", metric)
    if robustness_curves(rows)[1]:
        plot_robustness(rows, out / "results_robustness.png")
    return rows


def single_run_report(run: str | Path) -> str:
    """``tokmask report`` on a ``tokmask train`` output: that run's scores, as markdown. Nothing is judged
    (a verdict compares rates, which takes a sweep) and nothing is written into the finished run."""
    run = Path(run)
    if (why := incomplete_because(run)) is not None:
        raise ValueError(f"{run} is a single run but not a finished one: {why}")
    row = run_row(run, run)
    lines = [f"| {key} | {value:.4f} |" if isinstance(value, float) and key != "rate" else f"| {key} | {value} |"
             for key, value in row.items() if value is not None and key != "run"]
    return (f"{run}: one run (masking rate {row['rate']:g}, seed {row['seed']}), dev scores at its best "
            "checkpoint. A verdict compares rates: run `tokmask sweep` for one.\n\n| field | value |\n|---|---|\n"
            + "\n".join(lines) + "\n")


def update_cards(out: Path, rows: list[dict], metric: str | None = None) -> None:
    """Each run's model card (where the run wrote one) gains its rate's verdict against p = 0."""
    metric = sweep_metric(out, metric)
    if not any(r["rate"] == 0.0 for r in rows) or not any((out / r["run"] / CARD).is_file() for r in rows):
        return
    dev = {v.rate: v for v in set_verdicts(out, rows, DEV_SET, metric)}
    for row in rows:
        run, verdict = out / row["run"], dev.get(row["rate"])
        if (run / CARD).is_file() and verdict is not None:
            text = (f"dev {metric.replace('_', ' ')}, p = {verdict.rate:g} vs p = 0: {verdict.describe()}: "
                    f"{verdict.word}. {recommendation(list(dev.values()))}")
            write_card(run, verdict=text)


def strategy_line(rows: list[dict]) -> str:
    """How the sweep masked, from its runs (one strategy per sweep; several are listed if mixed)."""
    kinds = sorted({(r["unit"], r["replace"], r["consistency"], r.get("neftune_alpha", 0.0)) for r in rows})
    text = "; ".join(f"unit {u}, replace {r}, consistency λ = {c:g}" + (f", NEFTune α = {a:g}" if a else "")
                     for u, r, c, a in kinds)
    return f"Masking: {text}.\n\n"


def markdown_table(summary: list[dict], metric: str = DEFAULT_METRIC) -> str:
    metrics = [m for m in summary[0] if m not in ("rate", "seeds", "best") and not m.endswith("_std")]
    header = "| mask rate p | seeds | " + " | ".join(metrics) + " |"
    lines = [header, "|" + "---|" * (len(metrics) + 2)]
    for e in summary:
        # One seed has no spread to show: a bare value, not "± 0.0000".
        cells = [(f"{e[m]:.4f} ± {e[m + '_std']:.4f}" if e["seeds"] > 1 else f"{e[m]:.4f}") if m in e else ""
                 for m in metrics]
        mark = " **(best)**" if e.get("best") else ""
        lines.append(f"| {e['rate']:.2f}{mark} | {e['seeds']} | " + " | ".join(cells) + " |")
    return (f"Dev metrics per masking rate (mean ± sample std over seeds); the highest mean by {metric} is "
            "marked best, and whether it beats p = 0 beyond noise is the verdict below.\n\n"
            + "\n".join(lines) + "\n")


def plot(summary: list[dict], path: Path, metric: str = DEFAULT_METRIC) -> None:
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
    save_figure(fig, path)


def verdict_panels(out: Path, rows: list[dict], metric: str, files: PredictionFiles) -> dict[str, list[Verdict]]:
    """Every set's verdicts (clean dev, each held-out set, each shifted copy), for the plot; empty without p = 0."""
    if not any(r["rate"] == 0.0 for r in rows):
        return {}
    recipe = read_run_config(out / rows[0]["run"])["recipe"]
    shifted = sorted({name for r in rows for name in read_metrics(out / r["run"]).get("shifted", {})})
    panels = {name: set_verdicts(out, rows, name, metric, files=files)
              for name in [DEV_SET, *held_out_names(recipe), *shifted]}
    return {name: verdicts for name, verdicts in panels.items() if verdicts}


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "no evidence": "tab:gray"}


def plot_deltas(panels: dict[str, list[Verdict]], path: Path, metric: str) -> None:
    """What the tables say, drawn: Δ vs p = 0 with its 95 % interval per evaluation set (clean and shifted)
    and rate, coloured by verdict, around a zero line (raw means on a tight axis make noise look like a rise)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = sorted({v.rate for verdicts in panels.values() for v in verdicts})
    fig, ax = plt.subplots(figsize=(max(5.0, 0.9 * len(panels) * max(1, len(rates)) ** 0.5 + 2), 3.8), dpi=120)
    width = 0.8 / max(1, len(rates))
    for i, (name, verdicts) in enumerate(panels.items()):
        for v in verdicts:
            x = i + (rates.index(v.rate) - (len(rates) - 1) / 2) * width
            err = None if v.low is None else [[v.delta - v.low], [v.high - v.delta]]
            ax.errorbar([x], [v.delta], yerr=err, fmt="o", capsize=3, color=VERDICT_COLOURS[v.word])
            ax.annotate(f"{v.rate:g}", (x, v.delta), textcoords="offset points", xytext=(4, 2), fontsize=6)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(panels)), [n.replace(":", "\n") for n in panels], fontsize=7)
    ax.set_ylabel(f"Δ {metric.replace('_', ' ')} vs p = 0")
    handles = [plt.Line2D([], [], marker="o", linestyle="", color=c, label=w) for w, c in VERDICT_COLOURS.items()]
    ax.legend(handles=handles, loc="best", fontsize=7)
    ax.set_title("each rate against p = 0, 95 % interval (labels: the rate)", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: Path) -> None:
    """A PNG written whole or not at all, like every other file a report writes."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


# ---- does masking help? ------------------------------------------------------------------------------


class PredictionFiles(dict):
    """Each run's ``predictions.npz``, read once per report whatever the number of evaluation sets; and
    each set's verdicts, bootstrapped once per report (the table and the plot share them)."""

    def __init__(self):
        super().__init__()
        self.verdicts: dict[tuple, list[Verdict]] = {}

    def get_set(self, run: Path, name: str):
        if run not in self:
            path = run / PREDICTIONS_FILE
            self[run] = load_predictions(path) if path.is_file() else {}
        return self[run].get(name)


def set_verdicts(out: Path, rows: list[dict], name: str, metric: str,
                 baseline: tuple[Path, list[dict]] | None = None,
                 files: PredictionFiles | None = None) -> list[Verdict]:
    """Each rate against p = 0 on evaluation set ``name``: from saved predictions where every run of
    the pair has them (seeds and examples), else from the runs' best metrics (seeds only).
    ``baseline``: another sweep's directory and rows whose p = 0 runs to compare against."""
    files = PredictionFiles() if files is None else files
    key = (str(out), name, metric, str(baseline[0]) if baseline else None, len(rows))
    if key not in files.verdicts:
        files.verdicts[key] = _set_verdicts(out, rows, name, metric, baseline, files)
    return files.verdicts[key]


def _set_verdicts(out: Path, rows: list[dict], name: str, metric: str, baseline, files: PredictionFiles
                  ) -> list[Verdict]:
    base_out, base_rows = baseline or (out, rows)
    by_rate: dict[float, dict[int, dict]] = {}
    for row in rows:
        by_rate.setdefault(row["rate"], {})[row["seed"]] = row
    base = {r["seed"]: r for r in base_rows if r["rate"] == 0.0}
    base_config = read_run_config(base_out / next(iter(base.values()))["run"])
    classes, problem = len(base_config["labels"]), base_config.get("problem_type", "single_label")
    def predictions(root: Path, row: dict):
        return files.get_set(root / row["run"], name)

    verdicts = []
    for rate, runs in sorted(by_rate.items()):
        if rate == 0.0 and Path(base_out) == Path(out):  # p = 0 of another recipe (R-Drop, NEFTune) is judged
            continue
        seeds = sorted(set(runs) & set(base))
        kept = {s: (predictions(out, runs[s]), predictions(base_out, base[s])) for s in seeds}
        if seeds and all(a is not None and b is not None for a, b in kept.values()):
            verdicts.append(paired_verdict(rate, {s: a for s, (a, _) in kept.items()},
                                           {s: b for s, (_, b) in kept.items()}, classes, metric, problem=problem))
            continue
        key = metric if name == DEV_SET else f"{name}_{metric}"
        if seeds and all(runs[s].get(key) is not None and base[s].get(key) is not None for s in seeds):
            verdicts.append(seed_level_verdict(rate, {s: runs[s][key] for s in seeds},
                                               {s: base[s][key] for s in seeds}, METRICS[metric].higher_is_better))
    return verdicts


def verdict_section(out: Path, rows: list[dict], metric: str | None = None,
                    files: PredictionFiles | None = None) -> str:
    """The verdict per rate on dev, the recommendation (for ``sweep.objective``), the chosen rate judged on
    each held-out (``extra_eval``) set, where selection on dev cannot flatter it, and every rate under
    each shift."""
    if not any(r["rate"] == 0.0 for r in rows):
        return "\nNo p = 0 runs in this sweep: no paired verdict (add rate 0 to the grid).\n"
    metric = sweep_metric(out, metric)
    files = PredictionFiles() if files is None else files
    dev = set_verdicts(out, rows, DEV_SET, metric, files=files)
    if not dev:
        return "\nOnly p = 0 in this sweep: nothing to compare.\n"
    lines = ["", f"Does masking help? Each rate against p = 0 on dev, paired by seed ({metric.replace('_', ' ')}; "
             "t interval over seeds and a bootstrap over dev examples where predictions were saved).", "",
             "| mask rate p | Δ vs p = 0 | 95 % interval | verdict | the interval covers |", "|---|---|---|---|---|"]
    for v in dev:
        lines.append(f"| {v.rate:.2f} | {v.delta:+.4f} | {v.interval or 'none'} | {v.word} | {v.level}, "
                     f"{v.seeds} seed(s) |")
    # A sweep's runs share one recipe (sweeps refuse to mix them): one config names its held-out sets.
    recipe = read_run_config(out / rows[0]["run"])["recipe"]
    objective = recipe.get("sweep", {}).get("objective", "clean")
    if objective == "clean":
        lines += ["", recommendation(dev)]
        chosen = chosen_on_dev(dev)
        for name in held_out_names(recipe):
            held = [v for v in set_verdicts(out, rows, name, metric, files=files) if v.rate == chosen.rate]
            if held:
                lines.append(f"Held out ({name}): p = {chosen.rate:g}, the rate with the largest Δ on dev, "
                             f"{held[0].describe()}: {held[0].word}.")
    else:
        lines += ["", *objective_lines(out, rows, metric, objective, dev, held_out_names(recipe), files)]
    return "\n".join(lines) + "\n" + shift_section(out, rows, metric, files)


def objective_lines(out: Path, rows: list[dict], metric: str, objective: str, dev: list[Verdict],
                    held_out: list[str], files: PredictionFiles) -> list[str]:
    """``sweep.objective`` a shift: the rate picked on dev under it (never one whose clean dev verdict is
    worse), then its Δ under the shift and on clean data on each held-out set, where the pick cannot flatter."""
    if objective in held_out:  # another corpus: no dev copy to pick on, so the clean dev pick is judged there
        chosen = recommended(dev) or chosen_on_dev(dev)
        held = [v for v in set_verdicts(out, rows, objective, metric, files=files) if v.rate == chosen.rate]
        return [recommendation(dev), *[f"Objective {objective} (no dev copy to pick on): p = {chosen.rate:g}, the "
                                       f"rate picked on clean dev, {v.describe()}: {v.word}." for v in held]]
    shifted = set_verdicts(out, rows, shifted_set(DEV_SET, objective), metric, files=files)
    best, refused = recommended_for(shifted, dev)
    note = f" (p = {', '.join(f'{r:g}' for r in refused)} refused: worse on clean dev)" if refused else ""
    if best is None:
        seeds = max((v.seeds for v in shifted), default=0)
        return [f"Recommendation for the objective {objective}: no rate beats p = 0 beyond noise on dev under "
                f"{objective}{note} ({seeds} seeds); use p = 0 or add seeds."]
    lines = [f"Recommendation for the objective {objective}: use p = {best.rate:g}: on dev under {objective} "
             f"{best.describe()}{note}."]
    for name in held_out:
        for label, set_name in ((objective, shifted_set(name, objective)), ("clean", name)):
            held = [v for v in set_verdicts(out, rows, set_name, metric, files=files) if v.rate == best.rate]
            if held:
                lines.append(f"Held out ({name}, {label}): p = {best.rate:g} {held[0].describe()}: {held[0].word}.")
    return lines


def shift_section(out: Path, rows: list[dict], metric: str, files: PredictionFiles) -> str:
    """Every shifted copy the runs were scored on (``train.robustness``): each rate against p = 0 there,
    with the same paired bootstrap and verdict word as the clean metric."""
    names = sorted({name for r in rows for name in read_metrics(out / r["run"]).get("shifted", {})},
                   key=lambda n: (n.split(":")[1], n.split(":")[0] != DEV_SET, n))
    table = [(name, v) for name in names for v in set_verdicts(out, rows, name, metric, files=files)]
    if not table:
        return ""
    lines = ["", f"Under shifts: each rate against p = 0 on shifted copies ({metric.replace('_', ' ')}; dev copies "
             "saw the rate picked, held-out ones did not).", "",
             "| condition | set | mask rate p | Δ vs p = 0 | 95 % interval | verdict |", "|---|---|---|---|---|---|"]
    for name, v in table:
        evaluation_set, condition = name.split(":", 1)
        lines.append(f"| {condition_title(condition)} | {evaluation_set} | {v.rate:.2f} | {v.delta:+.4f} | "
                     f"{v.interval or 'none'} | {v.word} |")
    return "\n".join(lines) + "\n"


# ---- robustness ------------------------------------------------------------------------------------


def robustness_curves(rows: list[dict]) -> tuple[str, dict[str, dict[float, list[tuple[float, float]]]]]:
    """The robustness columns' metric, and corruption -> training rate -> [(q, mean metric over seeds)], q = 0
    being the clean dev score."""
    columns = {column: parsed for column in dict.fromkeys(k for r in rows for k in r)
               if (parsed := parse_robustness_column(column))}
    if not columns:
        return "", {}
    metric = next(iter(columns.values()))[2]
    curves: dict[str, dict[float, list[tuple[float, float]]]] = {}
    for kind in CORRUPTIONS:
        graded = sorted((q, column) for column, (shift, q, _) in columns.items() if shift == kind)
        for rate in sorted({r["rate"] for r in rows}):
            group = [r for r in rows if r["rate"] == rate]
            points = [(0.0, statistics.fmean(r[metric] for r in group))]
            for q, column in graded:
                values = [r[column] for r in group if r.get(column) is not None]
                if values and q > 0:
                    points.append((q, statistics.fmean(values)))
            if len(points) > 1:
                curves.setdefault(kind, {})[rate] = points
    return metric, curves


def plot_robustness(rows: list[dict], path: Path) -> None:
    """The robustness metric (weighted F1, micro F1, Pearson) against corruption severity q, one line per
    training rate, one panel per corruption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric, curves = robustness_curves(rows)
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.5), dpi=120, squeeze=False, sharey=True)
    for ax, (kind, by_rate) in zip(axes[0], curves.items()):
        for rate, points in by_rate.items():
            ax.plot(*zip(*points), marker="o", label=f"trained at p = {rate:g}")
        ax.set_title(CORRUPTIONS[kind].title)
        ax.set_xlabel("corruption severity q")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"dev {metric.replace('_', ' ')}")
    axes[0][-1].legend(loc="best", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


# ---- several sweeps on one footing --------------------------------------------------------------------

def shared_footing(recipe: dict) -> dict:
    """What sweeps compared on one footing must share: base model, task and data."""
    return {"model": {k: recipe["model"].get(k) for k in ("name", "gguf_file", "task")}, "data": recipe["data"]}


@dataclasses.dataclass
class Pick:
    """One sweep's rate picked on dev, judged against the shared p = 0 on dev and on each held-out set."""

    out: Path
    strategy: str
    judged: list[tuple[str, Verdict]]
    """(evaluation set, verdict), dev first; empty where the sweep holds only the shared p = 0 runs."""

    def on(self, name: str) -> Verdict | None:
        return next((v for set_name, v in self.judged if set_name == name), None)


def compare_picks(outs: list[str | Path], metric: str | None = None) -> list[Pick]:
    """Across sweeps of one base model and data (say ``unit: token`` vs ``word`` vs a consistency
    term): each sweep's rate picked on dev (recommended, else its largest Δ) against the p = 0 runs of
    the first sweep, so every strategy is judged against the same baseline; then the same pick judged
    on each held-out set, where the choice on dev cannot flatter it. A later sweep's own p = 0 runs
    (R-Drop, NEFTune: p = 0 of another recipe) are judged too."""
    outs = [Path(o) for o in outs]
    metric = sweep_metric(outs[0], metric)
    base_rows = collect(outs[0])
    if not any(r["rate"] == 0.0 for r in base_rows):
        raise ValueError(f"{outs[0]} has no p = 0 runs: the first sweep gives the shared baseline")
    base_recipe = read_run_config(outs[0] / base_rows[0]["run"])["recipe"]
    files, baseline = PredictionFiles(), (outs[0], base_rows)
    picks = []
    for out in outs:
        rows = _same_footing_rows(out, outs[0], base_recipe)
        dev = set_verdicts(out, rows, DEV_SET, metric, baseline=baseline, files=files)
        strategy = strategy_line(rows).strip().removeprefix("Masking: ").rstrip(".")
        pick = recommended(dev) or chosen_on_dev(dev)
        judged = [] if pick is None else [(DEV_SET, pick)] + [
            (name, v) for name in held_out_names(base_recipe)
            for v in set_verdicts(out, rows, name, metric, baseline=baseline, files=files) if v.rate == pick.rate]
        picks.append(Pick(out, strategy, judged))
    return picks


def compare_sweeps(outs: list[str | Path], metric: str | None = None) -> str:
    """``compare_picks`` as the markdown table ``tokmask report A B ...`` writes to ``COMPARISON_FILE``."""
    metric = sweep_metric(outs[0], metric)
    picks = compare_picks(outs, metric)
    held_out = list(dict.fromkeys(name for p in picks for name, _ in p.judged if name != DEV_SET))
    lines = [f"Sweeps against the p = 0 runs of {picks[0].out} ({metric.replace('_', ' ')}); each sweep's rate "
             "picked on dev (recommended, else its largest Δ)" + (f", then judged on {', '.join(held_out)}"
                                                                  if held_out else "") + ".", "",
             "| sweep | strategy | rate | set | Δ vs shared p = 0 | 95 % interval | verdict | the interval covers |",
             "|---|---|---|---|---|---|---|---|"]
    for p in picks:
        if not p.judged:
            lines.append(f"| {p.out} | {p.strategy} | – | – | – | – | only the shared p = 0 | – |")
        for name, v in p.judged:
            lines.append(f"| {p.out} | {p.strategy} | {v.rate:.2f} | {name} | {v.delta:+.4f} | {v.interval or 'none'} | "
                         f"{v.word} | {v.level}, {v.seeds} seed(s) |")
    return "\n".join(lines) + "\n"


def _same_footing_rows(out: Path, first: Path, base_recipe: dict) -> list[dict]:
    """A sweep's rows, refused unless it shares base model, task and data with the first sweep."""
    rows = collect(out)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {out}")
    # A key one side lacks is a field added since that sweep ran (its default was the old behaviour).
    differ = fingerprint_diff(shared_footing(base_recipe),
                              shared_footing(read_run_config(out / rows[0]["run"])["recipe"]), shared_keys_only=True)
    if differ:
        raise ValueError(f"{out} differs from {first} in {differ}: sweeps compared on one footing must "
                         "share base model and data")
    return rows
