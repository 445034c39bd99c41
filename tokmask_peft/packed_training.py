"""The training loop of a pack (``sweep.pack``): one recipe's rates for one seed, trained side by side.

The loop is :mod:`~tokmask_peft.training`'s, with one model, loader, optimizer and scheduler shared by
the pack, and per slot what a lone run has: its masker and rate schedule, its loss (their sum is
backpropagated: slots share no trainable tensor, so each adapter's gradient is its own loss's), its
gradient clipping, its evaluations, patience and best weights, its run directory. A slot that stops
early leaves the packed batch (no more forward passes, no gradient, so no optimizer update).

A pack resumes like a run: its checkpoint (in its own directory, beside the runs) holds every slot's
tensors, the optimizer, scheduler, RNG states, each slot's masker, counters, history and best weights.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import Recipe
from .console import kept_in
from .losses import classification_loss
from .masking import attach_masking, clean_view, symmetric_kl
from .modeling import parameter_counts
from .packing import Pack, PackedMasker, replicate
from .runs import LOG_FILE, run_fingerprint
from .setup import Setup
from .storage import hold
from .training import (Checkpoints, EarlyStopping, Run, TrainState, _checkpoint_only_trainable, _drop_log_after,
                       _evaluation_due, build_loop, check_setup,
                       clear_stale_results, close, evaluate_and_keep, final_scores, masker_for, optimizer_updates,
                       restore_best, start, write_results)

__all__ = ["train_pack", "check_packable"]


def check_packable(recipe: Recipe) -> None:
    """What a pack cannot do, said before anything is built."""
    why = {recipe.model.method == "full": "method: full has no shared frozen base to pack over",
           recipe.train.compile: "train.compile is not supported with packing yet",
           bool(recipe.train.report_to): "train.report_to (trackers) is not supported with packing yet"}
    if True in why:
        raise ValueError(f"sweep.pack={recipe.sweep.pack}: {why[True]}; set sweep.pack=0")


class NoCheckpoints(Checkpoints):
    """A packed run keeps no checkpoint of its own (the pack's holds it); any stale one from an earlier,
    unpacked attempt in its directory is removed when the run finishes."""

    exists = False

    def save(self, best_weights: dict | None) -> None:
        pass


@dataclasses.dataclass
class Slot:
    """One packed run: a :class:`~tokmask_peft.training.Run` over the shared model, and its own counters."""

    run: Run
    state: TrainState = dataclasses.field(default_factory=TrainState)
    stopping: EarlyStopping | None = None

    @property
    def name(self) -> str:
        return self.run.slot


def train_pack(recipes: list[Recipe], outs: list[Path], setup: Setup, checkpoint_dir: Path) -> list[dict]:
    """Train ``recipes`` (one recipe at several masking rates, one seed) as one pack, each into its ``out``.

    ``checkpoint_dir`` holds the pack's resumable state while it trains (the caller removes it once
    every run is in place).

    Returns:
        Each run's ``metrics.json`` contents, in the order of ``recipes``.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold(checkpoint_dir, "pack"))
        for out in outs:
            stack.enter_context(hold(out, "run"))
            stack.enter_context(kept_in(out))
        return _train_pack(recipes, outs, setup, checkpoint_dir)


def _train_pack(recipes: list[Recipe], outs: list[Path], setup: Setup, checkpoint_dir: Path) -> list[dict]:
    first = recipes[0]
    check_packable(first)
    if len({r.train.seed for r in recipes}) != 1 or any(r.with_overrides([f"masking.rate={first.masking.rate}"])
                                                        != first for r in recipes):
        raise ValueError("a pack holds one recipe at several masking rates of one seed")
    for recipe, out in zip(recipes, outs):
        clear_stale_results(out)
        check_setup(setup, recipe)
    started = time.perf_counter()
    lead = start(first, setup, outs[0])
    if lead.accelerator.num_processes > 1:
        raise ValueError(f"sweep.pack runs in one process; this one has {lead.accelerator.num_processes}: "
                         "set sweep.pack=0 for distributed runs")
    fingerprint = {**run_fingerprint(first), "pack": {"rates": [r.masking.rate for r in recipes]}}
    lead.checkpoints = Checkpoints(lead.accelerator, checkpoint_dir, fingerprint)
    lead.checkpoints.refuse_other_run()
    packs: list[Pack] = []
    try:
        slots = build_pack(lead, recipes, outs, packs)
        shared = resume_or_begin_pack(lead, slots, started)
        fit_pack(lead, packs[0], slots, shared)
        return finish_pack(lead, packs[0], slots)
    finally:
        for pack in packs:
            pack.remove()
        close(lead)


def build_pack(lead: Run, recipes: list[Recipe], outs: list[Path], packs: list[Pack]) -> list[Slot]:
    """The shared model with one adapter per recipe, the packed masker, loaders and optimizer (``lead``),
    and a :class:`Slot` per recipe; the :class:`Pack` is appended to ``packs`` as soon as it exists."""
    setup, accelerator, tc = lead.setup, lead.accelerator, lead.recipe.train
    lead.model = setup.model_for(tc.seed, accelerator.device, tc.mixed_precision,
                                 before_precision=lambda model: packs.append(Pack(model, len(recipes))))
    pack = packs[0]
    lead.masker = PackedMasker(pack, {name: masker_for(lead, r) for name, r in zip(pack.names, recipes)})
    lead.hook = attach_masking(lead.model, lead.masker)
    build_loop(lead)  # the optimizer takes every slot's tensors: per-tensor state, separable per slot
    total = parameter_counts(lead.model)["total_params"]
    slots = []
    for i, (name, recipe, out) in enumerate(zip(pack.names, recipes, outs)):
        own = pack.params[name]
        size = sum(p.numel() for p in own.values())
        counts = {"trainable_params": size, "total_params": total - (len(recipes) - 1) * size}  # as a lone run
        run = Run(recipe, setup, out, accelerator, NoCheckpoints(accelerator, out, {}), model=lead.model,
                  masker=lead.masker.maskers[name], schedule=recipe.masking.to_schedule(),
                  dev_loader=lead.dev_loader, class_weights=lead.class_weights, trainable=list(own.values()),
                  counts=counts, updates=lead.updates, slot=name, own=own,
                  pack={"size": len(recipes), "slot": i, "rates": [r.masking.rate for r in recipes]})
        slots.append(Slot(run, stopping=EarlyStopping(tc.metric, tc.patience)))
    return slots


def resume_or_begin_pack(lead: Run, slots: list[Slot], started: float) -> TrainState:
    """Register what the pack's checkpoint holds and restore it, or start each slot's directory empty;
    returns the pack's loop counters (each slot keeps its own evaluation record)."""
    shared = TrainState(since=started)
    for slot in slots:
        slot.state.since = started  # each slot's wall time counts the pack's setup, as a lone run's does
    for obj in (lead.masker, shared, *(slot.state for slot in slots)):
        lead.accelerator.register_for_checkpointing(obj)
    _checkpoint_only_trainable(lead.accelerator)
    best = lead.checkpoints.load() if lead.checkpoints.exists else None
    for slot in slots:
        slot.run.out.mkdir(parents=True, exist_ok=True)
        if best is None:
            (slot.run.out / LOG_FILE).unlink(missing_ok=True)
        else:
            slot.stopping.weights = best.get(slot.name)
            _drop_log_after(slot.run.out / LOG_FILE, shared.step)
    if best is not None:
        lead.accelerator.print(f"resumed the pack of {len(slots)} at step {shared.step} (epoch {shared.epoch})")
    return shared


def save_pack_checkpoint(lead: Run, slots: list[Slot]) -> None:
    lead.checkpoints.save({slot.name: slot.stopping.weights for slot in slots if slot.stopping.weights is not None})


def fit_pack(lead: Run, pack: Pack, slots: list[Slot], shared: TrainState) -> None:
    """Optimizer updates in time order; after each: log, evaluate (and maybe stop) every running slot,
    checkpoint when due."""
    tc = lead.recipe.train
    running = [slot for slot in slots if not slot.state.stopped_early]
    pack.active = [slot.name for slot in running]
    if not running or shared.step >= lead.updates:
        return  # resumed from a pack that had finished training
    lead.model.train()
    progress = tqdm(total=lead.updates, initial=shared.step, desc=f"pack of {len(slots)}", dynamic_ncols=True,
                    disable=None)

    def step(run: Run, batch: dict, number: int) -> list[torch.Tensor]:
        return packed_step(run, running, batch, number)

    with progress:
        for losses, epoch_ended in optimizer_updates(lead, shared, step):
            progress.update(1)
            for slot, loss in zip(running, losses):
                slot.state.step, slot.state.epoch = shared.step, shared.epoch
                if shared.step % tc.log_every == 0:
                    slot.run.log({"step": shared.step, "epoch": shared.epoch, "loss": loss.item(),
                                  "lr": lead.scheduler.get_last_lr()[0], "mask_rate": slot.run.masker.rate})
            last = shared.step >= lead.updates or shared.epoch >= tc.epochs
            if _evaluation_due(tc, shared.step, epoch_ended, last):
                scores = lead.evaluate(lead.dev_loader, slots=len(running))  # one packed pass over dev
                for slot, (metrics, _) in zip(list(running), scores):
                    with pack.only(slot.name):  # a new best is saved: this slot's adapter
                        if evaluate_and_keep(slot.run, slot.state, slot.stopping, metrics):
                            slot.state.stopped_early = True
                            running.remove(slot)
                pack.active = [slot.name for slot in running]
                if tc.checkpoint_every == 0:
                    save_pack_checkpoint(lead, slots)
            if tc.checkpoint_every and shared.step % tc.checkpoint_every == 0:
                save_pack_checkpoint(lead, slots)
            if last or not running:
                return


def finish_pack(lead: Run, pack: Pack, slots: list[Slot]) -> list[dict]:
    """Every slot back to its best weights, the final evaluation sets scored for all slots in packed
    passes, then each slot's results written to its own directory."""
    for slot in slots:
        restore_best(slot.run, slot.stopping)
    pack.active = [slot.name for slot in slots]
    scores = final_scores(lead, slots=len(slots))
    return [write_results(slot.run, slot.state, scored, robustness)
            for slot, (scored, robustness) in zip(slots, scores)]


def packed_step(lead: Run, running: list[Slot], batch: dict, number: int) -> list[torch.Tensor]:
    """One batch, replicated once per running slot and masked at each slot's rate; forward, per-slot
    losses (+ consistency terms), backward of their sum, per-slot clipping, one optimizer step."""
    tc, masking, accelerator, k = lead.recipe.train, lead.recipe.masking, lead.accelerator, len(running)
    with accelerator.accumulate(lead.model):
        for slot in running:
            slot.run.masker.rate = slot.run.schedule.rate_at(number, lead.updates)
        labels = batch.pop("labels")
        inputs = replicate(batch, k)
        logits = lead.model(**inputs).logits.chunk(k)
        losses = [classification_loss(x, labels, lead.class_weights, tc.focal_gamma) for x in logits]
        if masking.consistency:
            clean = clean_view(lead.model, inputs, lead.masker, masking.consistency_stop_grad).chunk(k)
            losses = [loss + masking.consistency * symmetric_kl(x, c, labels)
                      for loss, x, c in zip(losses, logits, clean)]
        accelerator.backward(torch.stack(losses).sum())
        if accelerator.sync_gradients and tc.max_grad_norm:
            accelerator.unscale_gradients()  # once: fp16's scaler refuses a second unscale per step
            for slot in running:
                torch.nn.utils.clip_grad_norm_(slot.run.trainable, tc.max_grad_norm)
        lead.optimizer.step()
        lead.scheduler.step()
        lead.optimizer.zero_grad()
    return [loss.detach() for loss in losses]
