"""One explicit Accelerate loop for every method and task, and for one run or several side by side.

A lone run is the case K = 1 of K runs trained side by side (``sweep.side_by_side``: one recipe at K
masking rates of one seed, K adapters in one PEFT model over one frozen base, see
:mod:`~tokmask_peft.adapter_slots`). The loop owns what the runs share (accelerator, model, loaders,
optimizer, scheduler, the loop counters, the checkpoint); each :class:`Slot` owns what one run has
(recipe, directory, masker and rate schedule, trainable tensors, early stopping, results). The phases:

    start   accelerator; refuse another run's checkpoint; what the distributed setup supports
    build   model (from the Setup), one slot per run, masking hook, loaders, class weights, optimizer, scheduler
    fit     optimizer updates in time order; after each: log, evaluate?, checkpoint?, stop?
    finish  each run's best weights back, evaluation sets scored, its metrics.json written
    close   hooks removed, the kept base released (also when a run fails)

Evaluation and early stopping live in :mod:`~tokmask_peft.evaluation`, the resumable checkpoint in
:mod:`~tokmask_peft.checkpoints`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.integrations.neftune import activate_neftune, deactivate_neftune

from . import tracking
from .adapter_slots import AdapterSlots, SlotMasker, replicate
from .checkpoints import Checkpoints, TrainState, drop_log_after, only_trainable_in_checkpoints, remove_checkpoint
from .config import Recipe
from .console import TokmaskWarning, kept_in
from .data import LengthGroupedBatches, padding_collator
from .evaluation import EarlyStopping, eval_loader, evaluate
from .losses import loss_weights, task_loss
from .metrics import classification_metrics
from .problems import decide, tune_thresholds
from .masking import RateSchedule, TokenMasker, attach_masking, clean_view, symmetric_kl
from .memory import peak_memory_mb, reset_peak_memory
from .model_card import CARD, card, training_command
from .modeling import compile_blocks, parameter_counts
from .recipe_setup import Setup
from .robustness import condition_name, shifted_set
from .runs import (DEV_SET, LOG_FILE, METRICS_FILE, PREDICTIONS_FILE, SCRATCH_DIR, TOKMASK_CONFIG, is_complete,
                   run_config, run_fingerprint, save_predictions, weight_record, with_meaning)
from .storage import atomic_write_text, hold, move_files_in, read_json, write_json

__all__ = ["train", "train_side_by_side", "check_side_by_side"]
LONE = "default"
"""A lone run's adapter: PEFT's own."""


@dataclasses.dataclass
class Slot:
    """One run of the loop: its recipe, directory, adapter, masker, trainable tensors and dev record."""

    recipe: Recipe
    out: Path
    name: str
    """Its PEFT adapter (``default`` for a lone run): the one its tensors and saved files belong to."""
    masker: TokenMasker
    schedule: RateSchedule
    stopping: EarlyStopping
    trainable: list
    """The tensors its optimizer step updates and its gradient clipping covers."""
    params: dict | None
    """Its trainable tensors by name, where other slots share the model; None: all the model's."""
    counts: dict
    """Trainable and total parameters, as a lone run of it has."""
    side_by_side: dict | None = None
    """Trained side by side: the group's size, this slot's place and the group's rates (``metrics.json``)."""

    def log(self, loop: "Loop", record: dict) -> None:
        """A line of ``log.jsonl``, and the same figures to the trackers (``train.report_to``)."""
        if loop.accelerator.is_main_process:
            with (self.out / LOG_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.recipe.train.report_to and (values := tracking.scalars(record)):
            loop.accelerator.log(values[0], step=values[1])

    def trainable_state(self, loop: "Loop") -> dict:
        params = self.params if self.params is not None else {
            n: p for n, p in loop.unwrapped.named_parameters() if p.requires_grad}
        return {n: p.detach().cpu().clone() for n, p in params.items()}


@dataclasses.dataclass
class Loop:
    """What the runs of one loop share; :func:`build` fills in the parts after ``checkpoints``."""

    recipe: Recipe
    """The first run's recipe: the others differ from it in the masking rate alone."""
    setup: Setup
    accelerator: Accelerator
    checkpoints: Checkpoints
    state: TrainState
    slots: list[Slot] = dataclasses.field(default_factory=list)
    model: Any = None
    adapters: AdapterSlots | None = None
    """Runs side by side: the PEFT model's adapter slots; None for a lone run."""
    masker: Any = None
    """What the masking hook calls: the lone run's masker, or a :class:`SlotMasker` over the slots'."""
    hook: Any = None
    neftune: Any = None
    """transformers' NEFTune hook on the input embeddings (``train.neftune_alpha`` > 0)."""
    sampler: LengthGroupedBatches | None = None
    train_loader: Any = None
    dev_loader: Any = None
    class_weights: torch.Tensor | None = None
    optimizer: Any = None
    scheduler: Any = None
    updates: int = 0
    """Optimizer updates this process makes before the loop ends."""

    @property
    def unwrapped(self):
        return self.accelerator.unwrap_model(self.model)

    @property
    def fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def run_only(self, slots: list[Slot]) -> None:
        """The next forward passes run these slots' adapters, in this order (a lone run: its own)."""
        if self.adapters is not None:
            self.adapters.active = [slot.name for slot in slots]

    def only(self, slot: Slot):
        """Inside the block, forward passes (and saving) see ``slot``'s adapter alone."""
        return self.adapters.only(slot.name) if self.adapters is not None else contextlib.nullcontext()

    def score(self, features: list[dict], keep: bool = False, slots: int = 1):
        """Every running slot's scores on an evaluation set other than the prepared dev loader's."""
        loader = eval_loader(features, self.setup.tokenizer, self.recipe.model.task, self.recipe.train.eval_batch_size)
        return self.evaluate(self.accelerator.prepare(loader), keep, slots)

    def evaluate(self, loader, keep: bool = False, slots: int = 1):
        return evaluate(self.model, loader, self.accelerator, self.recipe.model.task, self.class_weights,
                        self.recipe.train.focal_gamma, keep, slots, self.recipe.model.problem_type)


# ---- entry points --------------------------------------------------------------------------------


def train(recipe: Recipe, setup: Setup | None = None, output_dir: str | Path | None = None) -> dict:
    """Train one run of ``recipe``; write adapter (or full model), tokenizer and side files.

    Args:
        recipe: the validated recipe; ``train.output_dir`` is where files go unless ``output_dir``.
        setup: shared tokenizer/data/base from :meth:`Setup.from_recipe` (built here if ``None``).
        output_dir: overrides ``recipe.train.output_dir`` (sweeps point each run elsewhere).

    Returns:
        The contents of ``metrics.json``.
    """
    out = Path(output_dir or recipe.train.output_dir)
    # One writer per run directory: the main process holds it (a DDP job's other ranks follow it).
    # RANK (torchrun, accelerate launch) and not PartialState: that would set Accelerate's shared state
    # up before train's own Accelerator(cpu=...) does.
    if not _is_main_rank():
        return run_loop([recipe], [out], setup)[0]
    with hold(out, "run"), kept_in(out):  # third-party notices of the run go to its third_party.log
        return run_loop([recipe], [out], setup)[0]


def train_side_by_side(recipes: list[Recipe], outs: list[Path], setup: Setup, checkpoint_dir: Path) -> list[dict]:
    """Train ``recipes`` (one recipe at several masking rates, one seed) side by side, each into its ``out``.

    ``checkpoint_dir`` holds the group's resumable state while it trains.

    Returns:
        Each run's ``metrics.json`` contents, in the order of ``recipes``.
    """
    with contextlib.ExitStack() as stack:
        stack.enter_context(hold(checkpoint_dir, "side-by-side group"))
        for out in outs:
            stack.enter_context(hold(out, "run"))
            stack.enter_context(kept_in(out))
        return run_loop(recipes, outs, setup, checkpoint_dir)


def check_side_by_side(recipe: Recipe) -> None:
    """What runs side by side cannot do, said before anything is built."""
    why = {recipe.model.method == "full": "method: full has no shared frozen base to train adapters over",
           recipe.train.compile: "train.compile is not supported side by side yet",
           bool(recipe.train.report_to): "train.report_to (trackers) is not supported side by side yet"}
    if True in why:
        raise ValueError(f"sweep.side_by_side={recipe.sweep.side_by_side}: {why[True]}; set sweep.side_by_side=0")


def run_loop(recipes: list[Recipe], outs: list[Path], setup: Setup | None,
             checkpoint_dir: Path | None = None) -> list[dict]:
    """The loop over ``len(recipes)`` runs (one: a lone run, checkpointed in its own directory)."""
    first = recipes[0]
    fingerprint = run_fingerprint(first)
    if len(recipes) > 1:
        check_side_by_side(first)
        if len({r.train.seed for r in recipes}) != 1 or any(
                r.with_overrides([f"masking.rate={first.masking.rate}"]) != first for r in recipes):
            raise ValueError("runs side by side are one recipe at several masking rates of one seed")
        fingerprint["side_by_side"] = {"rates": [r.masking.rate for r in recipes]}
    for out in outs:
        clear_stale_results(out)
    setup = setup or Setup.from_recipe(first)
    for recipe in recipes:
        check_setup(setup, recipe)
    loop = start(first, setup, checkpoint_dir or outs[0], fingerprint, len(recipes))
    try:
        build(loop, recipes, outs)
        resume_or_begin(loop)
        fit(loop)
        return finish(loop)
    finally:
        close(loop)


def clear_stale_results(out: Path) -> None:
    """Refuse a finished run; forget a results file without a whole run behind it (cut short, damaged,
    weights gone), which is trained again."""
    if is_complete(out):
        raise FileExistsError(f"{out} already holds a finished run ({METRICS_FILE}); choose another output_dir")
    if (out / METRICS_FILE).exists() and _is_main_rank():
        warnings.warn(f"{out / METRICS_FILE} is there but the run is not whole (a file is damaged, cut short or "
                      "missing); training it again", TokmaskWarning, stacklevel=4)
        (out / METRICS_FILE).unlink()


def check_setup(setup: Setup, recipe: Recipe) -> None:
    if setup.recipe.model != recipe.model or setup.recipe.data != recipe.data:
        raise ValueError("setup was built for a different model or data section than this recipe")


# ---- start, build ----------------------------------------------------------------------------


def start(recipe: Recipe, setup: Setup, folder: Path, fingerprint: dict, runs: int) -> Loop:
    """The accelerator, and every refusal that must come before a model is built (a sweep's kept
    base would otherwise keep the refused run's adapter)."""
    started = time.perf_counter()
    tc = recipe.train
    _allow_precision(tc.mixed_precision)
    # cpu=True when there is no accelerator: Accelerate then recognises torchrun's env as MULTI_CPU.
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision,
                              cpu=not torch.accelerator.is_available(),
                              dataloader_config=DataLoaderConfiguration(non_blocking=True),
                              **tracking.accelerator_options(recipe, folder))
    if runs > 1 and accelerator.num_processes > 1:
        raise ValueError(f"runs side by side train in one process; this one has {accelerator.num_processes}: "
                         "set sweep.side_by_side=0 for distributed runs")
    checkpoints = Checkpoints(accelerator, folder, fingerprint)
    checkpoints.refuse_other_run()
    if tc.compile and not _plain_or_ddp(accelerator):
        raise ValueError(f"train.compile is supported on one device or with DDP, not "
                         f"{accelerator.distributed_type}: set train.compile=false")
    reset_peak_memory(accelerator.device)
    tracking.start(accelerator, recipe, folder)
    return Loop(recipe, setup, accelerator, checkpoints, TrainState(since=started))


def build(loop: Loop, recipes: list[Recipe], outs: list[Path]) -> None:
    """Model (with one adapter per run), the slots, masking hook, loaders, class weights, optimizer and
    scheduler, prepared by Accelerate."""
    setup, accelerator, tc = loop.setup, loop.accelerator, loop.recipe.train

    def add_slots(model) -> None:  # before precision casting: the copies are cast with the first adapter
        loop.adapters = AdapterSlots(model, len(recipes))

    loop.model = setup.model_for(tc.seed, accelerator.device, tc.mixed_precision,
                                 cast_frozen=_plain_or_ddp(accelerator),  # FSDP flattens to one dtype
                                 before_precision=add_slots if len(recipes) > 1 else None)
    if tc.compile:
        # Dynamic shapes: one graph serves every batch length, instead of a recompile per length.
        compile_blocks(loop.model, dynamic=True)
    names = loop.adapters.names if loop.adapters is not None else [LONE]
    loop.slots = [make_slot(loop, i, name, recipe, out)
                  for i, (name, recipe, out) in enumerate(zip(names, recipes, outs))]
    loop.masker = (loop.slots[0].masker if loop.adapters is None else
                   SlotMasker(loop.adapters, {slot.name: slot.masker for slot in loop.slots}))
    loop.hook = attach_masking(loop.model, loop.masker)
    build_optimization(loop)  # the optimizer takes every slot's tensors: per-tensor state, separable per slot


def make_slot(loop: Loop, i: int, name: str, recipe: Recipe, out: Path) -> Slot:
    """Run ``i`` of the loop, on adapter ``name``. Each process masks with its own stream; the hook
    masks only while model.training."""
    tc = recipe.train
    masker = TokenMasker.for_tokenizer(loop.setup.tokenizer, loop.setup.mask_token,
                                       rate=recipe.masking.to_schedule().rate_at(0, 1),
                                       seed=tc.seed * 1009 + loop.accelerator.process_index,
                                       **recipe.masking.strategy())
    stopping = EarlyStopping(tc.metric, tc.patience)
    if loop.adapters is None:
        trainable = [p for p in loop.model.parameters() if p.requires_grad]
        return Slot(recipe, out, name, masker, recipe.masking.to_schedule(), stopping, trainable, None,
                    parameter_counts(loop.model))
    params = loop.adapters.params[name]
    size, k = sum(p.numel() for p in params.values()), len(loop.adapters.names)
    counts = {"trainable_params": size,
              "total_params": parameter_counts(loop.model)["total_params"] - (k - 1) * size}  # as a lone run
    return Slot(recipe, out, name, masker, recipe.masking.to_schedule(), stopping, list(params.values()), params,
                counts, {"size": k, "slot": i})


def build_optimization(loop: Loop) -> None:
    """NEFTune, loaders, class weights, optimizer and scheduler around ``loop.model``, prepared by Accelerate."""
    recipe, setup, accelerator, tc = loop.recipe, loop.setup, loop.accelerator, loop.recipe.train
    if tc.neftune_alpha:  # after the masking hook: noise lands on the masked sequence's embeddings
        loop.neftune = activate_neftune(loop.model, tc.neftune_alpha)
    loop.sampler = LengthGroupedBatches([len(f["input_ids"]) for f in setup.train_features], tc.batch_size,
                                        tc.seed, tc.group_by_length)
    # Loaders get their own generator: a new iterator would otherwise draw from the global RNG,
    # which dropout also uses, and a resumed run would drift from an uninterrupted one.
    # Pinned batches copy to a GPU without waiting for the work already queued there.
    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(setup.train_features, batch_sampler=loop.sampler, num_workers=tc.num_workers,
                              collate_fn=padding_collator(setup.tokenizer, recipe.model.task,
                                                          word_ids=recipe.masking.needs_word_ids), pin_memory=pin,
                              generator=torch.Generator().manual_seed(tc.seed))
    dev_loader = eval_loader(setup.dev_features, setup.tokenizer, recipe.model.task, tc.eval_batch_size, pin)
    loop.class_weights = loss_weights(setup.train_features, len(setup.labels), tc.class_weights,
                                      recipe.model.problem_type)
    optimizer = _adamw([p for slot in loop.slots for p in slot.trainable], tc, accelerator.device)
    total = tc.total_updates(len(loop.sampler), accelerator.num_processes)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_updates(total), total)
    loop.model, loop.optimizer, loop.train_loader, loop.dev_loader, loop.scheduler = accelerator.prepare(
        loop.model, optimizer, train_loader, dev_loader, scheduler)
    loop.updates = tc.local_updates(len(loop.sampler), accelerator.num_processes)


def _adamw(trainable: list, tc, device: torch.device) -> torch.optim.AdamW:
    """AdamW without decay on biases and norms; fused (the HF Trainer's default too): one kernel over
    all tensors instead of a loop; a LoRA model has hundreds of small tensors (6.7 -> 2.3 ms per step on CPU)."""
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                             fused=device.type in ("cpu", "cuda", "xpu"))


def resume_or_begin(loop: Loop) -> None:
    """Register what the checkpoint holds and restore it, or start each run's directory empty."""
    for obj in (loop.masker, loop.state, *(slot.stopping for slot in loop.slots)):
        loop.accelerator.register_for_checkpointing(obj)
    only_trainable_in_checkpoints(loop.accelerator)
    best = loop.checkpoints.load() if loop.checkpoints.exists else None
    for slot in loop.slots:
        if best is not None:
            slot.stopping.weights = best.get(slot.name)
        if not loop.accelerator.is_main_process:
            continue
        slot.out.mkdir(parents=True, exist_ok=True)
        if best is None:
            (slot.out / LOG_FILE).unlink(missing_ok=True)
        else:
            drop_log_after(slot.out / LOG_FILE, loop.state.step)
    if best is not None:
        s = loop.state
        loop.accelerator.print(f"resumed {loop.checkpoints.folder} at step {s.step} (epoch {s.epoch}, "
                               f"batch {s.batches_done})")


# ---- fit ----------------------------------------------------------------------------------------


def fit(loop: Loop) -> None:
    """Optimizer updates in time order; after each one: log, evaluate?, checkpoint?, stop?"""
    tc, state = loop.recipe.train, loop.state
    running = [slot for slot in loop.slots if not slot.stopping.stopped]
    if not running or state.step >= loop.updates:
        return  # resumed from a loop that had finished training
    loop.run_only(running)
    loop.model.train()  # from_pretrained leaves modules in eval mode: dropout (and masking) would stay off
    # disable=None: tqdm draws only on a terminal, so logs of batch jobs stay readable.
    name = loop.slots[0].out.name if len(loop.slots) == 1 else f"{len(loop.slots)} side by side"
    progress = tqdm(total=loop.updates, initial=state.step, desc=name, dynamic_ncols=True,
                    disable=None if loop.accelerator.is_local_main_process else True)
    with progress:
        for losses, epoch_ended in optimizer_updates(loop, running):
            progress.update(1)
            log_update(loop, running, losses, progress)
            last = state.step >= loop.updates or state.epoch >= tc.epochs
            if _evaluation_due(tc, state.step, epoch_ended, last):
                evaluate_running(loop, running)
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                save_checkpoint(loop)
            if last or not running:
                return


def log_update(loop: Loop, running: list[Slot], losses: list[torch.Tensor], progress) -> None:
    """The progress bar, and every ``log_every`` updates each running slot's line in its ``log.jsonl``."""
    state, lr = loop.state, loop.scheduler.get_last_lr()[0]
    # loss.item() waits for the device: only when something shows or logs it, so on a GPU
    # the host can queue the next step while this one runs.
    if not progress.disable:
        progress.set_postfix(loss="/".join(f"{loss.item():.4f}" for loss in losses), lr=f"{lr:.2e}",
                             p="/".join(f"{slot.masker.rate:.2f}" for slot in running))
    for slot, loss in zip(running, losses):
        slot.stopping.steps = state.step
        if state.step % loop.recipe.train.log_every == 0:
            slot.log(loop, {"step": state.step, "epoch": state.epoch, "loss": loss.item(), "lr": lr,
                            "mask_rate": slot.masker.rate})


def _evaluation_due(tc, step: int, epoch_ended: bool, last: bool) -> bool:
    """Every ``eval_every`` updates, else at each epoch's end; always after the last update."""
    return last or (step % tc.eval_every == 0 if tc.eval_every else epoch_ended)


def optimizer_updates(loop: Loop, running: list[Slot]) -> Iterator[tuple[list[torch.Tensor], bool]]:
    """Train batch by batch from where ``loop.state`` says; yield ``(each running slot's loss,
    epoch_ended)`` after each optimizer update. The counters advance here and nowhere else."""
    state = loop.state
    while state.epoch < loop.recipe.train.epochs:
        loop.sampler.set_epoch(state.epoch)
        loop.train_loader.set_epoch(state.epoch)
        loader = loop.train_loader
        if state.batches_done:
            loader = loop.accelerator.skip_first_batches(loop.train_loader, state.batches_done)
        for batch in loader:
            losses = train_step(loop, running, batch)
            state.batches_done += 1
            if not loop.accelerator.sync_gradients:
                continue
            state.step += 1
            # Accelerate syncs (updates) on the last batch of a pass whatever the accumulation count.
            epoch_ended = loop.accelerator.gradient_state.end_of_dataloader
            if epoch_ended:
                state.epoch, state.batches_done = state.epoch + 1, 0
            yield losses, epoch_ended


def train_step(loop: Loop, running: list[Slot], batch: dict) -> list[torch.Tensor]:
    """One batch, replicated once per running slot (a lone run: as it is) and masked at each slot's rate;
    forward, per-slot losses (+ consistency terms), backward of their sum, per-slot clipping, one
    optimizer step when the accumulation is full. Slots share no trainable tensor, so each adapter's
    gradient is its own loss's."""
    tc, masking, accelerator, k = loop.recipe.train, loop.recipe.masking, loop.accelerator, len(running)
    with accelerator.accumulate(loop.model):
        for slot in running:
            slot.masker.rate = slot.schedule.rate_at(loop.state.step, loop.updates)
        labels = batch.pop("labels")
        inputs = replicate(batch, k)
        logits = loop.model(**inputs).logits
        if loop.recipe.model.task == "token" and masking.replace == "delete":  # (one slot: config refuses more)
            labels = running[0].masker.follow(labels, inputs["attention_mask"])
        logits = (logits,) if k == 1 else logits.chunk(k)
        problem = loop.recipe.model.problem_type
        losses = [task_loss(problem, x, labels, loop.class_weights, tc.focal_gamma) for x in logits]
        if masking.consistency:
            clean = clean_view(loop.model, inputs, loop.masker, masking.consistency_stop_grad).chunk(k)
            losses = [loss + masking.consistency * symmetric_kl(x, c, labels)
                      for loss, x, c in zip(losses, logits, clean)]
        accelerator.backward(losses[0] if k == 1 else torch.stack(losses).sum())
        if accelerator.sync_gradients and tc.max_grad_norm:
            clip_gradients(loop, running)
        loop.optimizer.step()
        loop.scheduler.step()
        loop.optimizer.zero_grad()
    return [loss.detach() for loss in losses]


def clip_gradients(loop: Loop, running: list[Slot]) -> None:
    """Each slot's gradient norm clipped on its own. The slot's list, not model.parameters(): walking a
    PEFT model's module tree cost ~16 ms per step on a 24-layer decoder. FSDP wants all its (flat) parameters."""
    max_norm = loop.recipe.train.max_grad_norm
    if loop.fsdp:
        loop.accelerator.clip_grad_norm_(loop.model.parameters(), max_norm)
        return
    loop.accelerator.unscale_gradients()  # once: fp16's scaler refuses a second unscale per step
    for slot in running:
        torch.nn.utils.clip_grad_norm_(slot.trainable, max_norm)


def evaluate_running(loop: Loop, running: list[Slot]) -> None:
    """Score dev for every running slot in one pass; each logs it and saves its run when it is its best
    so far; a slot whose patience ran out stops (leaves ``running``); checkpoint if asked at every evaluation."""
    state = loop.state
    scores = loop.evaluate(loop.dev_loader, slots=len(running))
    for slot, (metrics, _) in zip(list(running), scores):
        record = {"step": state.step, "epoch": state.epoch, **metrics}
        slot.log(loop, {"eval": record})
        prefix = f"{slot.out.name}: " if len(loop.slots) > 1 else ""
        loop.accelerator.print(f"{prefix}step {state.step} epoch {state.epoch}: " +
                               " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if slot.stopping.update(record, lambda: slot.trainable_state(loop)):
            with loop.only(slot):
                save_run(loop, slot)
        if slot.stopping.should_stop():
            slot.stopping.stopped = True
            running.remove(slot)
    loop.run_only(running)
    if loop.recipe.train.checkpoint_every == 0:
        save_checkpoint(loop)


def save_checkpoint(loop: Loop) -> None:
    loop.checkpoints.save({slot.name: slot.stopping.weights for slot in loop.slots
                           if slot.stopping.weights is not None})


# ---- save, finish, close -------------------------------------------------------------------------


def save_run(loop: Loop, slot: Slot) -> None:
    """Adapter (or full model) + tokenizer + tokmask_config.json, written by the main process only:
    saved whole into a scratch directory, moved in file by file, then the config that records the
    weights' sizes and digests (loading checks them)."""
    accelerator, setup, recipe = loop.accelerator, loop.setup, slot.recipe
    accelerator.wait_for_everyone()
    kwargs = {"save_embedding_layers": False} if recipe.model.method != "full" else {}
    if loop.adapters is not None:
        kwargs["selected_adapters"] = [slot.name]
    scratch = slot.out / SCRATCH_DIR
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    accelerator.wait_for_everyone()
    loop.unwrapped.save_pretrained(scratch, is_main_process=accelerator.is_main_process,
                                   save_function=accelerator.save, **kwargs)
    if accelerator.is_main_process:
        saved = scratch / slot.name if slot.name != LONE else scratch  # PEFT's folder per adapter
        setup.tokenizer.save_pretrained(saved)
        weights = weight_record(saved)
        move_files_in(saved, slot.out)
        if saved != scratch:
            move_files_in(scratch, slot.out)  # PEFT's README.md, written beside the adapter's folder
        write_json(slot.out / TOKMASK_CONFIG, with_meaning({**run_config(recipe, setup.labels, setup.mask_token),
                                                            "base_identity": setup.base_identity, "weights": weights,
                                                            "command": training_command()}))
    accelerator.wait_for_everyone()


def finish(loop: Loop) -> list[dict]:
    """Every run back to its best weights; dev and the extra evaluation sets scored for all runs in one
    pass each, keeping every prediction (``predictions.npz``); each run's ``metrics.json`` written."""
    for slot in loop.slots:
        if slot.stopping.weights is not None:
            loop.unwrapped.load_state_dict(slot.stopping.weights, strict=False)
    loop.run_only(loop.slots)
    results = [write_results(loop, slot, scored, robustness)
               for slot, (scored, robustness) in zip(loop.slots, final_scores(loop))]
    loop.checkpoints.remove()
    return results


def final_scores(loop: Loop) -> list[tuple[dict, dict]]:
    """Per slot: ``(scored, robustness)``: dev, every extra set and each one's shifted copies
    (``dev:mask@0.2``, ``test:entities_placeholder``) scored with predictions kept, and the graded shifts'
    dev metrics by shift and severity (the results table's robustness columns)."""
    setup, tc, k = loop.setup, loop.recipe.train, len(loop.slots)
    sets = {DEV_SET: setup.dev_features, **setup.extra_features}
    per_set = {name: loop.score(features, keep=True, slots=k) for name, features in sets.items()}
    shifts = loop.recipe.scored_shifts()
    for kind, q in shifts:
        for name in sets:
            if not setup.can_shift(name, kind):
                continue
            per_set[shifted_set(name, condition_name(kind, q))] = loop.score(
                setup.robustness_features(kind, q, name), keep=True, slots=k)
    graded = [(kind, q) for kind, q in shifts if q is not None]
    return [({name: scores[i] for name, scores in per_set.items()},
             {kind: {str(q): per_set[shifted_set(DEV_SET, condition_name(kind, q))][i][0]
                     for q in tc.robustness} for kind in dict.fromkeys(kind for kind, _ in graded)})
            for i in range(k)]


def with_tuned_thresholds(scored: dict) -> tuple[list[float], dict]:
    """Multi-label: per-label thresholds tuned on dev, and each set's metrics gaining ``tuned_*`` F1s at them
    (on dev they are fitted there, so optimistic; the held-out sets' are the honest figures)."""
    dev = scored[DEV_SET][1]
    thresholds = tune_thresholds(dev.probs, dev.gold)
    out = {}
    for name, (metrics, kept) in scored.items():
        tuned = classification_metrics(decide("multi_label", kept.probs, thresholds).numpy(), kept.gold, "multi_label")
        out[name] = ({**metrics, **{f"tuned_{m}": v for m, v in tuned.items() if m.endswith("_f1")}}, kept)
    return thresholds, out


def write_results(loop: Loop, slot: Slot, scored: dict, robustness: dict) -> dict:
    """``predictions.npz``, the model card and ``metrics.json`` (last: a run with it is complete)."""
    accelerator, setup, stopping = loop.accelerator, loop.setup, slot.stopping
    thresholds = None
    if loop.recipe.model.problem_type == "multi_label":
        thresholds, scored = with_tuned_thresholds(scored)
    extra = {name: metrics for name, (metrics, _) in scored.items() if name != DEV_SET and ":" not in name}
    shifted = {name: metrics for name, (metrics, _) in scored.items() if ":" in name}
    peak_mb, peak_kind = peak_memory_mb(accelerator.device)
    side_by_side = {"side_by_side": {**slot.side_by_side, "rates": [s.recipe.masking.rate for s in loop.slots]}
                    } if slot.side_by_side else {}
    metrics = {
        "best": stopping.best, "history": stopping.history, "extra_eval": extra, "robustness": robustness,
        "shifted": shifted,
        **slot.counts, "train_examples": len(setup.train_features), "dev_examples": len(setup.dev_features),
        "steps": stopping.steps, "stopped_early": stopping.stopped,
        "wall_time_s": loop.state.wall_s(), "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind,
        "world_size": accelerator.num_processes, **side_by_side,
        **({"dev_tuned": scored[DEV_SET][0]} if thresholds else {}),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_predictions(slot.out / PREDICTIONS_FILE, {name: kept for name, (_, kept) in scored.items()})
        config = read_json(slot.out / TOKMASK_CONFIG, "run config")  # PEFT's generic README.md → ours
        if thresholds:  # inference decides with them; bound to the weights like the labels
            config = with_meaning({**config, "thresholds": thresholds})
            write_json(slot.out / TOKMASK_CONFIG, config)
        atomic_write_text(slot.out / CARD, card(config, metrics, config.get("command", training_command())))
        write_json(slot.out / METRICS_FILE, metrics)  # last: a run with metrics.json is complete
        remove_checkpoint(slot.out)  # a lone run's own; a stale one from an earlier attempt of a slot
    return metrics


def close(loop: Loop) -> None:
    """Detach the masking (and NEFTune) hook and the adapter slots, and give a sweep's kept base back,
    whether the runs finished or failed."""
    if loop.recipe.train.report_to:
        loop.accelerator.end_training()  # each tracker closes its run (flushes event files)
    if loop.hook is not None:
        loop.hook.remove()
    if loop.adapters is not None:
        loop.adapters.remove()
    if loop.neftune is not None:
        deactivate_neftune(loop.unwrapped, loop.neftune)
    if loop.model is not None:
        loop.setup.release(loop.unwrapped)
    if loop.accelerator.device.type != "cpu":
        # gc + emptied device cache so a sweep's next run starts clean; on a CPU there is no
        # cache to empty and the forced gc.collect() only cost ~0.3 s per run.
        loop.accelerator.free_memory()


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _plain_or_ddp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


def _allow_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; a process that trains an fp32 and then a bf16 recipe resets it (the distributed
    part, PartialState, is kept)."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
