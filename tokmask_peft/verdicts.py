"""Does masking help? Paired comparisons of each rate with p = 0, with intervals that count both
sources of noise, and a verdict a user can act on.

Run (p, seed s) and run (0, s) share data order and initialisation, so they are compared in pairs.
The point estimate is the mean paired difference over the seeds on the full set. Its interval counts
both sources of noise: the evaluation examples (a bootstrap: each replicate resamples the examples, the
same indices for every run, so the rates meet on the same resampled set; token tasks resample
sentences, with all of their words) and training (the spread of the seeds' paired differences). The
two variances add (the same examples serve every seed: crossed, not nested) and the interval is
Δ ± t·SE with Welch–Satterthwaite degrees of freedom, so a few seeds get a t quantile's width, not a
normal one. A percentile bootstrap over 3–5 seeds reads their spread as if it were known: three seeds
whose differences share a sign nearly always gave an interval clear of zero, and called our loop "worse"
than the HF Trainer's where the two are the same computation (``benchmarks/loop_equivalence.py``).

Runs saved before predictions existed have only their best dev metrics: their interval is the
seed level alone (a t interval on the paired differences), and the report says so. One seed with
predictions gives an interval of the dev-set noise alone; one seed without gives none.
"""
from __future__ import annotations

import dataclasses
import math
import statistics

import numpy as np

from .metrics import DEFAULT_METRIC, METRICS, check_metric, metric_values
from .runs import Predictions

BOOTSTRAP_SAMPLES = 2000
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
         20: 2.086, 21: 2.080, 22: 2.074, 23: 2.069, 24: 2.064, 25: 2.060, 26: 2.056, 27: 2.052, 28: 2.048,
         29: 2.045, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}
"""Student t 97.5 % quantiles by degrees of freedom (beyond 120: the normal's 1.96)."""


def t_975(df: float) -> float:
    """The 97.5 % t quantile at ``df`` or, between table rows, at the fewer degrees of freedom (wider)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be at least 1, got {df}")
    return 1.96 if df > 120 else T_975[max(k for k in T_975 if k <= df)]


def verdict_metric(metric: str) -> str:
    """``metric``, if a verdict can recompute it from saved predictions; else an error naming it."""
    return check_metric(metric, "the verdict's metric", from_predictions=True)


@dataclasses.dataclass
class Verdict:
    rate: float
    delta: float
    low: float | None
    high: float | None
    seeds: int
    level: str
    """What the interval covers: 'seeds and examples', 'examples only (1 seed)', 'seeds only (no saved
    predictions)', or 'none (1 seed, no saved predictions)'."""
    higher_is_better: bool = True
    """The metric's direction: for mse a negative Δ is the better one."""

    @property
    def word(self) -> str:
        if self.low is None:
            return "no evidence"
        up, down = ("better", "worse") if self.higher_is_better else ("worse", "better")
        return up if self.low > 0 else down if self.high < 0 else "no evidence"

    @property
    def gain(self) -> float:
        """Δ signed so that larger is better, whichever way the metric runs."""
        return self.delta if self.higher_is_better else -self.delta

    @property
    def interval(self) -> str | None:
        """``[low, high]`` as printed, or None where there is no interval."""
        return None if self.low is None else f"[{self.low:+.4f}, {self.high:+.4f}]"

    def describe(self) -> str:
        return f"Δ = {self.delta:+.4f}, 95 % CI {self.interval or 'no interval'} ({self.level}; {self.seeds} seed(s))"


# ---- paired comparison ------------------------------------------------------------------------------


def example_weights(examples: int, replicates: int, rng: np.random.Generator) -> np.ndarray:
    """How often each example is drawn in each replicate (multinomial: a resample with replacement)."""
    return rng.multinomial(examples, np.full(examples, 1.0 / examples), size=replicates)


def paired_verdict(rate: float, runs: dict[int, Predictions], baseline: dict[int, Predictions], classes: int,
                   metric: str = DEFAULT_METRIC, replicates: int = BOOTSTRAP_SAMPLES, seed: int = 0,
                   problem: str = "single_label") -> Verdict:
    """Δ = metric(rate) − metric(p = 0) over the seeds both have, with an interval over seeds and examples
    (one seed: the bootstrap's percentiles; regression: the example pairs are resampled and the correlation
    recomputed on each resample).
    For a metric where lower is better (mse), Δ is still rate − p = 0, and "better" means Δ < 0."""
    seeds = sorted(set(runs) & set(baseline))
    if not seeds:
        raise ValueError(f"rate {rate}: no seed shared with p = 0")
    first = baseline[seeds[0]]
    examples = int(first.example.max()) + 1
    for s in seeds:
        for p in (runs[s], baseline[s]):
            if not np.array_equal(p.example, first.example) or not np.array_equal(p.gold, first.gold):
                raise ValueError(f"rate {rate}, seed {s}: scored on other examples than p = 0; "
                                 "paired comparison needs the same evaluation set")
    full = np.ones((1, len(first.gold)))
    def values(weights, p: Predictions):
        return metric_values(weights, p.gold, p.pred, classes, metric, problem, p.probs)

    per_seed = [float(values(full, runs[s])[0] - values(full, baseline[s])[0]) for s in seeds]
    delta = statistics.fmean(per_seed)
    rng = np.random.default_rng(seed)
    differences = np.empty((replicates, len(seeds)))
    for start in range(0, replicates, 250):  # chunks keep (replicates x rows) small for token tasks
        chunk = example_weights(examples, min(250, replicates - start), rng)[:, first.example]
        for j, s in enumerate(seeds):
            differences[start:start + len(chunk), j] = values(chunk, runs[s]) - values(chunk, baseline[s])
    replicate_deltas = differences.mean(1)  # the examples resampled, every seed kept
    if len(seeds) == 1:
        low, high = np.percentile(replicate_deltas, [2.5, 97.5])
        return Verdict(rate, delta, float(low), float(high), 1, "examples only (1 seed)",
                       METRICS[metric].higher_is_better)
    low, high = seeds_and_examples_interval(delta, per_seed, replicate_deltas)
    return Verdict(rate, delta, low, high, len(seeds), "seeds and examples", METRICS[metric].higher_is_better)


def seeds_and_examples_interval(delta: float, per_seed: list[float], replicate_deltas: np.ndarray) -> tuple:
    """Δ ± t·SE: SE² = the seeds' variance of the mean (s² / n) + the example bootstrap's variance; the
    t quantile's degrees of freedom by Welch–Satterthwaite (n − 1 where the seeds dominate, ∞ where the
    examples do)."""
    n = len(per_seed)
    seed_var = statistics.variance(per_seed) / n
    total = seed_var + float(np.var(replicate_deltas, ddof=1))
    df = math.inf if seed_var == 0 else (n - 1) * total ** 2 / seed_var ** 2
    half = t_975(df) * math.sqrt(total)
    return delta - half, delta + half


def seed_level_verdict(rate: float, values: dict[int, float], baseline: dict[int, float],
                       higher_is_better: bool = True) -> Verdict:
    """From best dev metrics alone (no saved predictions): a t interval on the paired differences."""
    seeds = sorted(set(values) & set(baseline))
    if not seeds:
        raise ValueError(f"rate {rate}: no seed shared with p = 0")
    d = [values[s] - baseline[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return Verdict(rate, mean, None, None, 1, "none (1 seed, no saved predictions)", higher_is_better)
    half = t_975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Verdict(rate, mean, mean - half, mean + half, len(d), "seeds only (no saved predictions)",
                   higher_is_better)


def recommended(verdicts: list[Verdict]) -> Verdict | None:
    """The rate to use: of those better than p = 0 beyond noise, the largest Δ; None if none is."""
    return max((v for v in verdicts if v.word == "better"), key=lambda v: v.gain, default=None)


def recommended_for(objective: list[Verdict], clean: list[Verdict]) -> tuple[Verdict | None, list[float]]:
    """The rate to use for an objective other than clean accuracy: of those better than p = 0 under it,
    the largest Δ, never one whose clean verdict is worse; and the rates refused for that."""
    worse = {v.rate for v in clean if v.word == "worse"}
    return recommended([v for v in objective if v.rate not in worse]), sorted(
        v.rate for v in objective if v.rate in worse)


def recommendation(verdicts: list[Verdict]) -> str:
    """The line a user acts on: the rate to use with its Δ and interval, or why p = 0 stays."""
    best = recommended(verdicts)
    if best:
        return f"Recommendation: use p = {best.rate:g}: {best.describe()}."
    seeds = max((v.seeds for v in verdicts), default=0)
    return f"Recommendation: no rate beats p = 0 beyond noise ({seeds} seeds); use p = 0 or add seeds."


def chosen_on_dev(verdicts: list[Verdict]) -> Verdict | None:
    """The rate a user would pick from the dev table: the largest Δ (its held-out verdict keeps it honest)."""
    return max(verdicts, key=lambda v: v.gain, default=None)
