"""The metrics, in one registry: what each is called, which way is better, and how it is computed.

One implementation serves a run's scores and the verdict bootstrap: a metric is computed from
per-class counts of weighted rows, so a single pass computes it for thousands of resamples
(weights = how often each row is drawn) and a run's own score is the case of all weights 1.
Offline by design: ``evaluate.load('f1')`` fetches a script from the hub. Weighted and macro F1
follow scikit-learn's ``average='weighted'`` / ``'macro'`` with ``zero_division=0`` (tested against it).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

from .data import IGNORE_INDEX

__all__ = ["METRICS", "DEFAULT_METRIC", "PREDICTION_METRICS", "Metric", "check_metric", "classification_metrics",
           "compute_metrics", "is_better", "metric_values"]


@dataclasses.dataclass(frozen=True)
class Metric:
    higher_is_better: bool
    from_counts: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None
    """``(support, predicted, hits)`` per class, one row per replicate → the metric per replicate; None
    for a metric that predictions alone cannot give (the loss), which no verdict can bootstrap."""


def _f1(support, predicted, hits):
    denominator = support + predicted
    return np.divide(2 * hits, denominator, out=np.zeros_like(hits), where=denominator > 0), denominator > 0


def _weighted_f1(support, predicted, hits):
    return (_f1(support, predicted, hits)[0] * support).sum(1) / support.sum(1)


def _macro_f1(support, predicted, hits):
    f1, present = _f1(support, predicted, hits)  # classes in gold or predictions, as scikit-learn counts them
    return (f1 * present).sum(1) / np.maximum(present.sum(1), 1)


def _accuracy(support, predicted, hits):
    return hits.sum(1) / support.sum(1)


METRICS: dict[str, Metric] = {
    "weighted_f1": Metric(True, _weighted_f1),  # the paper's metric
    "macro_f1": Metric(True, _macro_f1),
    "accuracy": Metric(True, _accuracy),
    "loss": Metric(False),
}
DEFAULT_METRIC = "weighted_f1"
"""What selects the best epoch and rate, and what verdicts judge, unless a recipe or command says otherwise."""
PREDICTION_METRICS = tuple(name for name, m in METRICS.items() if m.from_counts is not None)
"""The metrics predictions give, so a verdict can bootstrap them."""


def check_metric(name: str, field: str, from_predictions: bool = False) -> str:
    """``name`` if the registry knows it (and, with ``from_predictions``, predictions can recompute it);
    else a ValueError naming ``field``."""
    known = PREDICTION_METRICS if from_predictions else tuple(METRICS)
    if name not in known:
        why = " (a verdict recomputes it from saved predictions)" if from_predictions and name in METRICS else ""
        raise ValueError(f"{field} must be one of {list(known)}{why}, got {name!r}")
    return name


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new > old if METRICS[metric].higher_is_better else new < old


def metric_values(weights: np.ndarray, gold: np.ndarray, pred: np.ndarray, classes: int,
                  metric: str = DEFAULT_METRIC) -> np.ndarray:
    """``metric`` for each row of ``weights`` ((replicates, rows) counts of how often each row is drawn)."""
    from_counts = METRICS[check_metric(metric, "metric", from_predictions=True)].from_counts
    weights = np.atleast_2d(weights).astype(np.float64)
    onehot_gold, onehot_pred = np.eye(classes)[gold], np.eye(classes)[pred]
    return from_counts(weights @ onehot_gold, weights @ onehot_pred, weights @ (onehot_gold * onehot_pred))


def classification_metrics(predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    """Every metric predictions give, over labelled positions (``-100`` is skipped).

    >>> classification_metrics([0, 1, 1, -100], [0, 1, 0, -100])["accuracy"]
    0.6666666666666666
    """
    pred = np.asarray(predictions).reshape(-1)
    ref = np.asarray(references).reshape(-1)
    keep = ref != IGNORE_INDEX
    pred, ref = pred[keep], ref[keep]
    if ref.size == 0:
        raise ValueError("no labelled positions to score")
    classes = int(max(pred.max(), ref.max())) + 1
    ones = np.ones((1, ref.size))
    return {name: float(metric_values(ones, ref, pred, classes, name)[0]) for name in PREDICTION_METRICS}


def compute_metrics(eval_prediction) -> dict[str, float]:
    """Drop-in ``compute_metrics`` for the HF ``Trainer`` (sequence or token classification)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return classification_metrics(np.argmax(logits, axis=-1), labels)
