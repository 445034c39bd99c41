"""Offline classification metrics (scikit-learn): ``evaluate.load('f1')`` needs the hub."""
from __future__ import annotations

from typing import Sequence

import numpy as np
from sklearn.metrics import accuracy_score, f1_score

from .data import IGNORE_INDEX


def classification_metrics(predictions: Sequence[int], references: Sequence[int]) -> dict[str, float]:
    """Weighted F1 (the paper's metric), macro F1 and accuracy over labelled positions.

    >>> classification_metrics([0, 1, 1, -100], [0, 1, 0, -100])["accuracy"]
    0.6666666666666666
    """
    pred = np.asarray(predictions).reshape(-1)
    ref = np.asarray(references).reshape(-1)
    keep = ref != IGNORE_INDEX
    pred, ref = pred[keep], ref[keep]
    if ref.size == 0:
        raise ValueError("no labelled positions to score")
    return {
        "weighted_f1": float(f1_score(ref, pred, average="weighted", zero_division=0)),
        "macro_f1": float(f1_score(ref, pred, average="macro", zero_division=0)),
        "accuracy": float(accuracy_score(ref, pred)),
    }


def compute_metrics(eval_prediction) -> dict[str, float]:
    """Drop-in ``compute_metrics`` for the HF ``Trainer`` (sequence or token classification)."""
    logits, labels = eval_prediction.predictions, eval_prediction.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    return classification_metrics(np.argmax(logits, axis=-1), labels)
