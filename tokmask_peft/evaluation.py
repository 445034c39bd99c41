"""Scoring a model on an evaluation set, and early stopping on those scores.

:func:`evaluate` scores every adapter a forward pass runs side by side (one, for a lone run): each
batch is replicated once per adapter (see :mod:`~tokmask_peft.adapter_slots`) and slice k scores adapter k.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from .adapter_slots import replicate
from .data import padding_collator
from .losses import task_loss
from .metrics import classification_metrics, is_better
from .problems import decide
from .problems import scores as problem_scores
from .runs import Predictions

__all__ = ["EarlyStopping", "evaluate", "eval_loader"]


@dataclasses.dataclass
class EarlyStopping:
    """A run's dev record (checkpointed with the loop): the best evaluation, the evaluations since it
    (patience), the history, and whether it stopped. ``weights``, the best trainable tensors, are
    checkpointed beside it."""

    metric: str
    patience: int
    best: dict | None = None
    bad_evals: int = 0
    history: list = dataclasses.field(default_factory=list)
    stopped: bool = False
    steps: int = 0
    """Optimizer updates the run had made at its last evaluation or update (where it stopped)."""
    weights: dict | None = None

    def update(self, record: dict, weights: Callable[[], dict]) -> bool:
        """Count ``record``; True (and its weights kept) when it is the best so far."""
        self.history.append(record)
        if is_better(self.metric, record[self.metric], self.best and self.best[self.metric]):
            self.best, self.bad_evals = record, 0
            self.weights = weights()
            return True
        self.bad_evals += 1
        return False

    def should_stop(self) -> bool:
        return bool(self.patience) and self.bad_evals >= self.patience

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("best", "bad_evals", "history", "stopped", "steps")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def evaluate(model, loader, accelerator: Accelerator, task: str, weights=None, focal_gamma=0.0,
             keep: bool = False, slots: int = 1, problem: str = "single_label",
             thresholds=None) -> list[tuple[dict[str, float], Predictions | None]]:
    """Per adapter run side by side (``slots``; one for a lone run): metrics over all processes
    (``gather_for_metrics`` drops the duplicated tail) and, with ``keep``, every scored unit's prediction
    (a text, or a labelled word) with its example index and scores (probabilities, or the predicted value).
    Multi-label decisions use ``thresholds`` (one per label; 0.5 when None)."""
    model.eval()
    scores = [Scores(accelerator.device, problem) for _ in range(slots)]
    # Eager even where train.compile compiled the blocks: a second, no-grad graph would cost another
    # compile for a pass that is a small part of a run (and bitsandbytes' 4-bit ops fail in one on CPU).
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for batch in loader:
            labels, example = batch.pop("labels"), batch.pop("example")
            for score, logits in zip(scores, model(**replicate(batch, slots)).logits.chunk(slots)):
                score.add(logits, labels, example, task, accelerator, weights, focal_gamma)
    model.train()
    return [score.result(accelerator, keep, thresholds) for score in scores]


class Scores:
    """One adapter's predictions and loss over an evaluation pass, gathered from every process."""

    def __init__(self, device: torch.device, problem: str = "single_label"):
        self.problem = problem
        self.rows: dict[str, list] = {"example": [], "gold": [], "probs": []}
        self.loss_sum, self.loss_count = torch.zeros((), device=device), torch.zeros((), device=device)

    def add(self, logits, labels, example, task, accelerator, weights, focal_gamma) -> None:
        single = self.problem == "single_label"
        n = (labels != -100).sum() if single else torch.tensor(labels.shape[0], device=labels.device)
        self.loss_sum += task_loss(self.problem, logits, labels, weights, focal_gamma) * n
        self.loss_count += n
        probs = problem_scores(self.problem, logits)
        if task == "token":
            example = example[:, None].expand_as(labels)
            probs, labels, example = (accelerator.pad_across_processes(t, dim=1, pad_index=-100)
                                      for t in (probs, labels, example))
        probs, labels, example = accelerator.gather_for_metrics((probs, labels, example))
        if single:  # one row per labelled unit: a text, or a word's first piece
            scored = labels.reshape(-1) != -100
            probs, labels, example = probs.reshape(-1, probs.shape[-1])[scored], labels.reshape(-1)[scored], \
                example.reshape(-1)[scored]
        self.rows["probs"].append(probs.cpu())
        self.rows["gold"].append(labels.cpu())
        self.rows["example"].append(example.cpu())

    def result(self, accelerator, keep: bool, thresholds=None) -> tuple[dict[str, float], Predictions | None]:
        loss_sum, loss_count = accelerator.reduce(self.loss_sum), accelerator.reduce(self.loss_count)
        probs, gold = torch.cat(self.rows["probs"]), torch.cat(self.rows["gold"])
        if self.problem == "multi_label":
            gold = gold.to(torch.int8)
        pred = decide(self.problem, probs, thresholds)
        classes = probs.shape[-1] if self.problem == "single_label" else None
        metrics = {**classification_metrics(pred.numpy(), gold.numpy(), self.problem, classes,
                                            probs.numpy() if self.problem == "single_label" else None),
                   "loss": float(loss_sum / loss_count)}
        if not keep:
            return metrics, None
        return metrics, Predictions(torch.cat(self.rows["example"]).numpy(), gold.numpy(), pred.numpy(), probs.numpy())


def eval_loader(features, tokenizer, task, batch_size, pin_memory=False) -> DataLoader:
    """Batches sorted by length (less padding; order does not matter to the metrics), each carrying
    its examples' indices (``example``) so predictions can be saved per example."""
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    collate = padding_collator(tokenizer, task)

    def with_index(chunk: list[tuple[int, dict]]) -> dict:
        batch = collate([feature for _, feature in chunk])
        batch["example"] = torch.tensor([i for i, _ in chunk])
        return batch

    return DataLoader(list(enumerate(features)), batch_sampler=batches, collate_fn=with_index,
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))
