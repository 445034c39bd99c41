"""A training loop's resumable state, written whole and swapped in, so a kill at any moment leaves a
checkpoint that resumes to the same result as an uninterrupted run.

One checkpoint serves the whole loop, whatever the number of runs it trains side by side: Accelerate's
``save_state`` (trainable tensors, optimizer, scheduler, RNG states, every registered object: the
maskers' generators, the loop counters, each run's evaluation record), each run's best weights so far,
and the fingerprint of the recipe a resume must match.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator

from .runs import CHECKPOINT_COPIES, fingerprint_diff
from .storage import atomic_write_text, write_json

__all__ = ["TrainState", "Checkpoints", "only_trainable_in_checkpoints", "drop_log_after", "remove_checkpoint"]
BEST_WEIGHTS = "best_trainable.pt"
FORMAT = {"checkpoint": {"format": 2}}
"""Recorded with the fingerprint: format 2 holds the loop's counters and each run's record apart (one
loop for lone runs and runs side by side); a format-1 checkpoint cannot be restored into it."""


@dataclasses.dataclass
class TrainState:
    """The loop's counters, checkpointed so a resumed loop continues where it stopped.

    ``epoch`` counts finished passes over the training data.
    """

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    elapsed_s: float = 0.0
    """Wall seconds the loop had taken by the checkpoint it resumed from (0 for a fresh one)."""
    since: float = dataclasses.field(default_factory=time.perf_counter)
    """When this call began; not checkpointed."""

    def wall_s(self) -> float:
        """The loop's wall time so far, the calls a resume continues included."""
        return self.elapsed_s + time.perf_counter() - self.since

    def state_dict(self) -> dict:
        state = dataclasses.asdict(self)
        del state["since"]
        state["elapsed_s"] = self.wall_s()  # read by Accelerate's save_state: the time at the checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def remove_checkpoint(folder: Path) -> None:
    """Remove ``folder``'s checkpoint and any half-swapped copy of it."""
    for name in CHECKPOINT_COPIES:
        shutil.rmtree(folder / name, ignore_errors=True)


class Checkpoints:
    """The checkpoint in ``folder/checkpoint``: a run's directory, or a side-by-side group's own folder."""

    def __init__(self, accelerator: Accelerator, folder: Path, fingerprint: dict):
        self.accelerator, self.folder, self.fingerprint = accelerator, folder, {**fingerprint, **FORMAT}
        self.path, self._new, self._old = (folder / name for name in CHECKPOINT_COPIES)

    @property
    def exists(self) -> bool:
        return (self.path / "recipe.json").exists()

    def refuse_other_run(self) -> None:
        if not self.exists and (self._old / "recipe.json").exists() and self.accelerator.is_main_process:
            self._old.rename(self.path)  # killed between the two renames of save(): the previous one is whole
        self.accelerator.wait_for_everyone()
        if self.exists:
            diff = fingerprint_diff(json.loads((self.path / "recipe.json").read_text()), self.fingerprint)
            if diff == ["checkpoint.format"]:
                raise ValueError(f"{self.path} was written by an older tokmask_peft, in a format this one cannot "
                                 "resume; delete it to train the run from the start")
            if diff:
                raise ValueError(f"{self.path} belongs to a different run (differs in {diff}); "
                                 "use another output_dir or delete the checkpoint")

    def save(self, best_weights: dict[str, dict]) -> None:
        """Written whole beside the current one (``recipe.json`` last), then swapped in by renames.
        ``best_weights``: each run's best trainable tensors so far, by its adapter name."""
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(self._new, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        with self._writing():
            self.accelerator.save_state(str(self._new))
            self.accelerator.wait_for_everyone()  # every rank's RNG file is in before the swap
            if main:
                if best_weights:
                    torch.save(best_weights, self._new / BEST_WEIGHTS)
                write_json(self._new / "recipe.json", self.fingerprint)
        if main:
            shutil.rmtree(self._old, ignore_errors=True)
            if self.path.exists():
                self.path.rename(self._old)
            self._new.rename(self.path)
            shutil.rmtree(self._old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def _writing(self):
        """A failed write (a full disk: torch reports it as ``RuntimeError: [enforce fail at
        inline_container.cc] unexpected pos``, with a C++ trace) becomes one OSError naming the
        checkpoint and the free space; the half-written copy is removed, the previous one kept."""
        try:
            yield
        except (OSError, RuntimeError) as e:
            shutil.rmtree(self._new, ignore_errors=True)
            free = shutil.disk_usage(self.folder).free / 2**20
            cause = (str(e).strip().splitlines() or [""])[0]
            raise OSError(f"could not write the checkpoint {self._new} ({type(e).__name__}: {cause}); "
                          f"{free:.0f} MiB free on that disk. The previous checkpoint is kept: free some space "
                          "and rerun the same command to resume from it") from e

    def load(self) -> dict[str, dict]:
        """Restore every registered object; returns the best weights saved with them, by adapter name."""
        self.accelerator.load_state(str(self.path), strict=False)
        best = self.path / BEST_WEIGHTS
        return torch.load(best) if best.exists() else {}

    def remove(self) -> None:
        if self.accelerator.is_main_process:
            remove_checkpoint(self.folder)


def only_trainable_in_checkpoints(accelerator: Accelerator) -> None:
    """Checkpoints hold only trainable tensors: the frozen (maybe quantised) base is reloaded anyway."""

    def shrink(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if len(trainable) < sum(1 for _ in model.parameters()):
                weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    accelerator.register_save_state_pre_hook(shrink)


def drop_log_after(path: Path, step: int) -> None:
    """Forget log lines written after the checkpoint (the resumed run writes those steps again) and a
    last line a kill cut short."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", record.get("eval", {}).get("step", 0)) <= step:
            kept.append(line + "\n")
    atomic_write_text(path, "".join(kept))
