"""Does masking help? Paired comparisons of each rate with p = 0, with intervals that count both
sources of noise, and a verdict a user can act on.

Run (p, seed s) and run (0, s) share data order and initialisation, so they are compared in pairs.
The interval is a two-level bootstrap: each replicate resamples the seeds (training noise), then
the evaluation examples (the finite dev set), and the same example indices serve every run, so the
rates are compared on the same resampled set. Seeds and examples are crossed factors, not nested:
one example resample per replicate serves all seeds, because every seed was scored on the same
examples. Token tasks resample sentences, with all of their words. The point estimate is the
mean paired difference on the full set; the interval is the replicates' 2.5 and 97.5 percentiles.

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
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


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
    """Δ = metric(rate) − metric(p = 0) over the seeds both have, with the two-level bootstrap interval
    (regression: the example pairs are resampled and the correlation recomputed on each resample).
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

    delta = statistics.fmean(float(values(full, runs[s])[0] - values(full, baseline[s])[0]) for s in seeds)
    rng = np.random.default_rng(seed)
    differences = np.empty((replicates, len(seeds)))
    for start in range(0, replicates, 250):  # chunks keep (replicates x rows) small for token tasks
        chunk = example_weights(examples, min(250, replicates - start), rng)[:, first.example]
        for j, s in enumerate(seeds):
            differences[start:start + len(chunk), j] = values(chunk, runs[s]) - values(chunk, baseline[s])
    picks = rng.integers(len(seeds), size=(replicates, len(seeds)))  # the seed level, resampled too
    replicate_deltas = np.take_along_axis(differences, picks, axis=1).mean(1)
    low, high = np.percentile(replicate_deltas, [2.5, 97.5])
    level = "seeds and examples" if len(seeds) > 1 else "examples only (1 seed)"
    return Verdict(rate, delta, float(low), float(high), len(seeds), level, METRICS[metric].higher_is_better)


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
    half = T_975.get(len(d) - 1, 1.96) * statistics.stdev(d) / math.sqrt(len(d))
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
