"""The training loss per problem type: cross-entropy with optional class weights and focal term (the
paper's) for single-label, binary cross-entropy per label for multi-label, mean squared error for
regression.

Single-label works for both tasks: token-classification logits are flattened and ``-100`` labels ignored.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX


def class_weights(counts: Sequence[int], kind: str) -> torch.Tensor | None:
    """Per-class weights from label counts, renormalised to sum to K (the number of classes).

    ``paper``: w_c = sqrt(N / (K n_c)); ``inverse``: N / (K n_c); ``none``: ``None``.
    A class absent from training gets weight 0 rather than infinity.

    >>> class_weights([300, 100], "paper")
    tensor([0.7321, 1.2679])
    """
    if kind == "none":
        return None
    n = torch.tensor(counts, dtype=torch.float64)
    k, total = len(counts), n.sum()
    raw = torch.where(n > 0, total / (k * n.clamp(min=1)), torch.zeros_like(n))
    if kind == "paper":
        raw = raw.sqrt()
    elif kind != "inverse":
        raise ValueError(f"class weights must be none, paper or inverse, got {kind!r}")
    return (raw * k / raw.sum()).float()


def positive_weights(positives: Sequence[int], rows: int, kind: str) -> torch.Tensor | None:
    """Multi-label: BCE's ``pos_weight`` per label from how often it is on: negatives / positives
    (``inverse``) or its square root (``paper``); ``none``: None. A label never on gets 1.

    >>> positive_weights([10, 50], 100, "inverse")
    tensor([9., 1.])
    """
    if kind == "none":
        return None
    pos = torch.tensor(positives, dtype=torch.float64)
    ratio = torch.where(pos > 0, (rows - pos) / pos.clamp(min=1), torch.ones_like(pos))
    if kind == "paper":
        ratio = ratio.sqrt()
    elif kind != "inverse":
        raise ValueError(f"class weights must be none, paper or inverse, got {kind!r}")
    return ratio.float()


def loss_weights(features: Sequence[dict], num_labels: int, kind: str, problem: str) -> torch.Tensor | None:
    """``train.class_weights`` for ``problem`` from the training features' labels."""
    if problem == "multi_label":
        positives = torch.tensor([f["labels"] for f in features]).sum(0).tolist()
        return positive_weights(positives, len(features), kind)
    if problem == "regression":
        return None
    return class_weights(label_counts(features, num_labels), kind)


def task_loss(problem: str, logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
              focal_gamma: float = 0.0) -> torch.Tensor:
    """The loss for ``problem`` (``weights``: class weights, or BCE's positive weights for multi-label)."""
    if problem == "multi_label":
        return F.binary_cross_entropy_with_logits(logits.float(), labels.float(), pos_weight=None if weights is None
                                                  else weights.to(logits.device))
    if problem == "regression":
        return F.mse_loss(logits.float().reshape(-1), labels.float().reshape(-1))
    return classification_loss(logits, labels, weights, focal_gamma)


def label_counts(features: Sequence[dict], num_labels: int) -> list[int]:
    counter: Counter = Counter()
    for f in features:
        labels = f["labels"] if isinstance(f["labels"], list) else [f["labels"]]
        counter.update(label for label in labels if label != IGNORE_INDEX)
    return [counter.get(i, 0) for i in range(num_labels)]


def classification_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None,
                        focal_gamma: float = 0.0) -> torch.Tensor:
    """mean((1 - p_t)^gamma * w_y * CE) over labelled positions (gamma 0: weighted CE mean)."""
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    keep = labels != IGNORE_INDEX
    logits, labels = logits[keep], labels[keep]
    if labels.numel() == 0:
        return logits.sum() * 0.0
    log_pt = F.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)
    loss = -log_pt
    if weights is not None:
        loss = loss * weights.to(loss.device)[labels]
    if focal_gamma:
        loss = (1 - log_pt.exp()) ** focal_gamma * loss
    return loss.mean()
