"""The metrics, in one registry: what each is called, which way is better, which problem types it
scores, and how it is computed.

One implementation serves a run's scores and the verdict bootstrap: a metric is computed from rows
under weights (how often each row is drawn, one row of weights per resample), so a single pass computes
it for thousands of resamples and a run's own score is the case of all weights 1. Classification
metrics work on label indicators ((rows, labels) 0/1; a single-label class is a one-hot row), so one
F1 serves single- and multi-label; regression metrics on the gold and predicted scores.
Offline by design: ``evaluate.load('f1')`` fetches a script from the hub. The F1s follow scikit-learn
(``zero_division=0``), the correlations scipy's (tested against both).
"""
from __future__ import annotations

import dataclasses
from functools import cached_property
from typing import Callable, Sequence

import numpy as np

from .data import IGNORE_INDEX

__all__ = ["METRICS", "DEFAULT_METRIC", "DEFAULT_METRICS", "PREDICTION_METRICS", "PROBLEM_TYPES", "Metric",
           "check_metric", "classification_metrics", "compute_metrics", "is_better", "metric_values",
           "problem_metrics"]

PROBLEM_TYPES = ("single_label", "multi_label", "regression")
CLASSIFICATION = ("single_label", "multi_label")


class Rows:
    """Gold and predicted rows under each replicate's weights: the sums every metric is made of."""

    def __init__(self, weights: np.ndarray, gold: np.ndarray, pred: np.ndarray, problem: str,
                 probs: np.ndarray | None = None):
        self.weights, self.gold, self.pred, self.problem, self.probs = weights, gold, pred, problem, probs

    @cached_property
    def support(self):  # (replicates, labels): weighted count of gold positives per label
        return self.weights @ self.gold

    @cached_property
    def predicted(self):
        return self.weights @ self.pred

    @cached_property
    def hits(self):
        return self.weights @ (self.gold * self.pred)

    def mean(self, per_row: np.ndarray) -> np.ndarray:
        return (self.weights @ per_row) / self.weights.sum(1)


def _f1(support, predicted, hits):
    denominator = support + predicted
    return np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0), denominator > 0


def _weighted_f1(r: Rows):
    return (_f1(r.support, r.predicted, r.hits)[0] * r.support).sum(1) / np.maximum(r.support.sum(1), 1e-12)


def _macro_f1(r: Rows):
    f1, present = _f1(r.support, r.predicted, r.hits)
    if r.problem == "multi_label":  # scikit-learn averages over every label of an indicator matrix
        return f1.mean(1)
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)  # classes in gold or predictions


def _micro_f1(r: Rows):
    denominator = r.support.sum(1) + r.predicted.sum(1)
    return np.divide(2 * r.hits.sum(1), denominator, out=np.zeros_like(denominator), where=denominator > 0)


def _samples_f1(r: Rows):
    both = r.gold.sum(1) + r.pred.sum(1)
    per_row = np.divide(2 * (r.gold * r.pred).sum(1), both, out=np.zeros(len(both)), where=both > 0)
    return r.mean(per_row)


def _accuracy(r: Rows):  # single-label: accuracy; multi-label: every label right (subset accuracy)
    return r.mean((r.gold == r.pred).all(1).astype(np.float64))


ECE_BINS = 15


def _ece(r: Rows):
    """Expected calibration error (15 equal-width bins of the top probability): the weighted mean gap
    between each bin's accuracy and its mean confidence."""
    if r.probs is None:
        raise ValueError("ece needs the predicted probabilities (runs saved without them cannot recompute it)")
    confidence = r.probs.max(1)
    bins = np.eye(ECE_BINS)[np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)]  # (rows, bins)
    correct = (r.gold == r.pred).all(1).astype(np.float64)
    gap = r.weights @ (bins * correct[:, None]) - r.weights @ (bins * confidence[:, None])
    return np.abs(gap).sum(1) / r.weights.sum(1)


def _mse(r: Rows):
    return r.mean((r.gold - r.pred) ** 2)


def _pearson(r: Rows, gold=None, pred=None):
    """Weighted Pearson correlation; ``gold``/``pred`` may be per replicate ((replicates, rows): ranks)."""
    gold = r.gold if gold is None else gold
    pred = r.pred if pred is None else pred
    w = r.weights / r.weights.sum(1, keepdims=True)
    mean_gold, mean_pred = (w * gold).sum(1, keepdims=True), (w * pred).sum(1, keepdims=True)
    cov = (w * (gold - mean_gold) * (pred - mean_pred)).sum(1)
    scale = np.sqrt((w * (gold - mean_gold) ** 2).sum(1) * (w * (pred - mean_pred) ** 2).sum(1))
    return np.divide(cov, scale, out=np.zeros_like(cov), where=scale > 1e-12)


def _midranks(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(replicates, rows): each row's rank within its replicate's resample, ties averaged (scipy's
    ``rankdata``), where row i appears ``weights[:, i]`` times. One sort serves every replicate."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    new_value = np.r_[True, ordered[1:] != ordered[:-1]]
    counts = np.add.reduceat(weights[:, order], np.flatnonzero(new_value), axis=1)  # (replicates, distinct values)
    midrank = np.cumsum(counts, 1) - counts + (counts + 1) / 2
    group = np.empty(len(values), dtype=np.int64)
    group[order] = np.cumsum(new_value) - 1
    return midrank[:, group]


def _spearman(r: Rows):
    return _pearson(r, _midranks(r.gold, r.weights), _midranks(r.pred, r.weights))


@dataclasses.dataclass(frozen=True)
class Metric:
    higher_is_better: bool
    compute: Callable[[Rows], np.ndarray] | None = None
    """Rows under weights → the metric per replicate; None for a metric predictions alone cannot give
    (the loss), which no verdict can bootstrap."""
    problems: tuple[str, ...] = CLASSIFICATION


METRICS: dict[str, Metric] = {
    "weighted_f1": Metric(True, _weighted_f1),  # the paper's metric
    "macro_f1": Metric(True, _macro_f1),
    "micro_f1": Metric(True, _micro_f1, ("multi_label",)),  # single-label: equals accuracy
    "samples_f1": Metric(True, _samples_f1, ("multi_label",)),
    "accuracy": Metric(True, _accuracy),
    "ece": Metric(False, _ece, ("single_label",)),  # calibration: lower is better
    "pearson": Metric(True, _pearson, ("regression",)),
    "spearman": Metric(True, _spearman, ("regression",)),
    "mse": Metric(False, _mse, ("regression",)),
    "loss": Metric(False, None, PROBLEM_TYPES),
}
DEFAULT_METRICS = {"single_label": "weighted_f1", "multi_label": "micro_f1", "regression": "pearson"}
"""What selects the best epoch and rate, and what verdicts judge, per problem type, unless a recipe or
command says otherwise."""
DEFAULT_METRIC = DEFAULT_METRICS["single_label"]
PREDICTION_METRICS = tuple(name for name, m in METRICS.items() if m.compute is not None)
"""The metrics predictions give, so a verdict can bootstrap them."""


NEEDS_PROBABILITIES = ("ece",)


def problem_metrics(problem: str) -> tuple[str, ...]:
    """The metrics predictions give for ``problem``, the ones a run reports."""
    return tuple(name for name in PREDICTION_METRICS if problem in METRICS[name].problems)


def check_metric(name: str, field: str, from_predictions: bool = False, problem: str | None = None) -> str:
    """``name`` if the registry knows it (with ``from_predictions``: predictions can recompute it; with
    ``problem``: it scores that problem type); else a ValueError naming ``field``."""
    known = PREDICTION_METRICS if from_predictions else tuple(METRICS)
    if name not in known:
        why = " (a verdict recomputes it from saved predictions)" if from_predictions and name in METRICS else ""
        raise ValueError(f"{field} must be one of {list(known)}{why}, got {name!r}")
    if problem is not None and problem not in METRICS[name].problems:
        fits = [m for m in known if problem in METRICS[m].problems]
        raise ValueError(f"{field}: {name} does not score {problem} problems; use one of {fits}")
    return name


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if METRICS[metric].higher_is_better else new < old


def metric_values(weights: np.ndarray, gold: np.ndarray, pred: np.ndarray, classes: int,
                  metric: str = DEFAULT_METRIC, problem: str = "single_label",
                  probs: np.ndarray | None = None) -> np.ndarray:
    """``metric`` for each row of ``weights`` ((replicates, rows) counts of how often each row is drawn).
    ``gold``/``pred``: class ids (single-label), 0/1 rows (multi-label) or scores (regression);
    ``probs``: the class probabilities (``ece`` needs them)."""
    compute = METRICS[check_metric(metric, "metric", from_predictions=True, problem=problem)].compute
    weights = np.atleast_2d(weights).astype(np.float64)
    if problem == "single_label":
        gold, pred = np.eye(classes)[gold], np.eye(classes)[pred]
    probs = None if probs is None else np.asarray(probs, np.float64)
    return compute(Rows(weights, np.asarray(gold, np.float64), np.asarray(pred, np.float64), problem, probs))


def classification_metrics(predictions: Sequence, references: Sequence, problem: str = "single_label",
                           classes: int | None = None, probs: np.ndarray | None = None) -> dict[str, float]:
    """Every metric predictions give for ``problem`` (``ece`` where ``probs`` are given); single-label
    skips ``-100`` (unlabelled positions).

    >>> classification_metrics([0, 1, 1, -100], [0, 1, 0, -100])["accuracy"]
    0.6666666666666666
    """
    pred, ref = np.asarray(predictions), np.asarray(references)
    if problem == "single_label":
        pred, ref = pred.reshape(-1), ref.reshape(-1)
        keep = ref != IGNORE_INDEX
        pred, ref = pred[keep], ref[keep]
        probs = None if probs is None else np.asarray(probs).reshape(-1, np.asarray(probs).shape[-1])[keep]
    if len(ref) == 0:
        raise ValueError("no labelled positions to score")
    if problem == "single_label":
        classes = max(classes or 0, int(max(pred.max(), ref.max())) + 1)
    ones = np.ones((1, len(ref)))
    return {name: float(metric_values(ones, ref, pred, classes or 0, name, problem, probs)[0])
            for name in problem_metrics(problem) if probs is not None or name not in NEEDS_PROBABILITIES}


def compute_metrics(eval_prediction, problem_type: str | None = None) -> dict[str, float]:
    """Drop-in ``compute_metrics`` for the HF ``Trainer``: single-label sequence or token classification,
    multi-label (a label is on where its sigmoid is at least 0.5) or regression. Without ``problem_type``
    (bind one with ``functools.partial``) it follows the rule transformers' models apply when
    ``config.problem_type`` is unset: one output is a regression, float labels shaped like the logits are
    multi-label, anything else single-label."""
    logits, labels = eval_prediction.predictions, np.asarray(eval_prediction.label_ids)
    logits = np.asarray(logits[0] if isinstance(logits, tuple) else logits)
    problem = problem_type or ("regression" if logits.shape[-1] == 1 else "multi_label" if (
        np.issubdtype(labels.dtype, np.floating) and labels.shape == logits.shape) else "single_label")
    if problem == "regression":
        return classification_metrics(logits.reshape(len(logits), -1)[:, 0], labels.reshape(-1), problem)
    if problem == "multi_label":
        return classification_metrics((logits >= 0).astype(np.int8), labels.astype(np.int8), problem)
    if problem != "single_label":
        raise ValueError(f"problem_type {problem!r}: expected one of {', '.join(PROBLEM_TYPES)}")
    return classification_metrics(np.argmax(logits, axis=-1), labels)
