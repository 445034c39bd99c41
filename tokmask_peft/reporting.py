"""A sweep's report, rebuilt from its run directories alone: ``results.csv`` (one row per run),
``results.md`` (mean ± sample std per rate) and ``results.png`` (metric against rate).
"""
from __future__ import annotations

import csv
import statistics
from pathlib import Path
from typing import Iterable

from .runs import METRICS_FILE, REPORT_METRICS, collect


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
    (out / "results.md").write_text(strategy_line(rows) + markdown_table(summary, metric))
    plot(summary, out / "results.png", metric)
    return rows


def strategy_line(rows: list[dict]) -> str:
    """How the sweep masked, from its runs (one strategy per sweep; several are listed if mixed)."""
    kinds = sorted({(r["unit"], r["replace"], r["consistency"]) for r in rows})
    text = "; ".join(f"unit {u}, replace {r}, consistency λ = {c:g}" for u, r, c in kinds)
    return f"Masking: {text}.\n\n"


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
