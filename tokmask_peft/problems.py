"""What a problem type makes of a classifier's outputs: how many there are, the scores a user sees, the
decisions metrics count, and (multi-label) the per-label thresholds tuned on dev.

single_label: softmax over classes, the argmax decides. multi_label: a sigmoid per label, each label
above its threshold is on (0.5 until tuned). regression: one output, the score itself.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .metrics import PROBLEM_TYPES

__all__ = ["PROBLEM_TYPES", "HF_PROBLEM_TYPES", "SCORE_NAME", "output_names", "scores", "decide",
           "tune_thresholds"]

HF_PROBLEM_TYPES = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}
"""transformers' ``config.problem_type``: set on the model, so a plain ``AutoModelForSequenceClassification``
+ PEFT load computes the same loss."""
SCORE_NAME = "score"
"""The one output of a regression head (its ``labels`` in ``tokmask_config.json``)."""
THRESHOLD_GRID = np.round(np.arange(0.05, 0.951, 0.05), 2)


def output_names(problem: str, labels: Sequence[str]) -> list[str]:
    """The name of each output: the labels, or the single score of a regression."""
    return [SCORE_NAME] if problem == "regression" else list(labels)


def scores(problem: str, logits: torch.Tensor) -> torch.Tensor:
    """What a user reads: class probabilities, per-label probabilities, or the predicted score."""
    logits = logits.float()
    if problem == "multi_label":
        return logits.sigmoid()
    if problem == "regression":
        return logits[..., 0]
    return logits.softmax(-1)


def decide(problem: str, scored: torch.Tensor | np.ndarray, thresholds: Sequence[float] | None = None):
    """The prediction metrics count: a class id, a 0/1 row per label, or the score."""
    if problem == "multi_label":
        cut = 0.5 if thresholds is None else torch.as_tensor(thresholds, dtype=torch.float32)
        return (torch.as_tensor(scored) >= cut).to(torch.int8)
    if problem == "regression":
        return torch.as_tensor(scored)
    return torch.as_tensor(scored).argmax(-1)


def tune_thresholds(probs: np.ndarray, gold: np.ndarray) -> list[float]:
    """Per label, the threshold of :data:`THRESHOLD_GRID` with the best F1 on these (dev) rows; ties go to
    the one nearest 0.5, and a label never seen on dev keeps 0.5."""
    out = []
    for label in range(gold.shape[1]):
        g = gold[:, label].astype(bool)
        if not g.any():
            out.append(0.5)
            continue
        on = probs[:, label][None, :] >= THRESHOLD_GRID[:, None]  # (thresholds, rows)
        hits, predicted = (on & g).sum(1), on.sum(1)
        f1 = 2 * hits / (predicted + g.sum())
        best = np.flatnonzero(f1 == f1.max())
        out.append(float(THRESHOLD_GRID[best[np.argmin(abs(THRESHOLD_GRID[best] - 0.5))]]))
    return out
