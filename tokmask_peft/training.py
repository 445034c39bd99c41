"""One explicit Accelerate loop for every method and task, in named phases:

    start   accelerator; refuse another run's checkpoint; what the distributed setup supports
    build   model (from the Setup), masking hook, loaders, class weights, optimizer, scheduler
    fit     optimizer updates in time order; after each: log, evaluate?, checkpoint?, stop?
    finish  best weights back, extra evaluation sets scored, metrics.json written
    close   hook removed, the kept base released (also when a run fails)

Evaluation with patience and best-weights keeping is one unit (:class:`EarlyStopping` and
:func:`evaluate_and_keep`); the resumable checkpoint another (:class:`Checkpoints`).
"""
from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup
from transformers.integrations.neftune import activate_neftune, deactivate_neftune

from . import tracking
from .config import Recipe
from .console import TokmaskWarning, kept_in
from .data import LengthGroupedBatches, padding_collator
from .losses import class_weights, classification_loss, label_counts
from .masking import TokenMasker, attach_masking, consistency_term
from .metrics import classification_metrics
from .model_card import CARD, card, training_command
from .modeling import compile_blocks, parameter_counts
from .packing import replicate
from .robustness import CORRUPTIONS
from .runs import (CHECKPOINT_DIR, DEV_SET, LOG_FILE, METRICS_FILE, PREDICTIONS_FILE, TOKMASK_CONFIG, fingerprint_diff,
                   is_complete, run_config, run_fingerprint, weight_record, write_json)
from .setup import Setup
from .storage import atomic_write_text, hold, move_files_in, read_json
from .verdicts import Predictions, save_predictions

__all__ = ["train", "Setup", "evaluate", "run_fingerprint"]
SCRATCH_DIR = ".saving"
"""Where a run's weights are written whole before they are moved into the run directory."""


@dataclasses.dataclass
class TrainState:
    """Loop counters, checkpointed with the model so a resumed run continues where it stopped.

    ``epoch`` counts finished passes over the training data.
    """

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    best: dict | None = None
    bad_evals: int = 0
    history: list = dataclasses.field(default_factory=list)
    stopped_early: bool = False
    elapsed_s: float = 0.0
    """Wall seconds the run had taken by the checkpoint it resumed from (0 for a fresh run)."""
    since: float = dataclasses.field(default_factory=time.perf_counter)
    """When this call began; not checkpointed."""

    def wall_s(self) -> float:
        """The run's wall time so far, the calls a resume continues included."""
        return self.elapsed_s + time.perf_counter() - self.since

    def state_dict(self) -> dict:
        state = dataclasses.asdict(self)
        del state["since"]
        state["elapsed_s"] = self.wall_s()  # read by Accelerate's save_state: the time at the checkpoint
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


class EarlyStopping:
    """The best dev record and its weights, and patience: evaluations without improvement."""

    def __init__(self, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.weights: dict | None = None

    def update(self, state: TrainState, record: dict, weights: Callable[[], dict]) -> bool:
        """Count ``record``; True (and its weights kept) when it is the best so far."""
        if is_better(self.metric, record[self.metric], state.best and state.best[self.metric]):
            state.best, state.bad_evals = record, 0
            self.weights = weights()
            return True
        state.bad_evals += 1
        return False

    def should_stop(self, state: TrainState) -> bool:
        return bool(self.patience) and state.bad_evals >= self.patience


class Checkpoints:
    """A run's resumable state in ``OUT/checkpoint``: Accelerate's ``save_state`` (trainable tensors,
    optimizer, scheduler, RNG states, the masker's generator, loop counters), the best weights so far,
    and the fingerprint of the recipe a resume must match."""

    def __init__(self, accelerator: Accelerator, out: Path, fingerprint: dict):
        self.accelerator, self.path, self.fingerprint = accelerator, out / CHECKPOINT_DIR, fingerprint

    @property
    def exists(self) -> bool:
        return (self.path / "recipe.json").exists()

    def _sibling(self, suffix: str) -> Path:
        return self.path.with_name(self.path.name + suffix)

    def refuse_other_run(self) -> None:
        old = self._sibling(".old")
        if not self.exists and (old / "recipe.json").exists() and self.accelerator.is_main_process:
            old.rename(self.path)  # killed between the two renames of save(): the previous one is whole
        self.accelerator.wait_for_everyone()
        if self.exists:
            diff = fingerprint_diff(json.loads((self.path / "recipe.json").read_text()), self.fingerprint)
            if diff:
                raise ValueError(f"{self.path} belongs to a different run (differs in {diff}); "
                                 "use another output_dir or delete the checkpoint")

    def save(self, best_weights: dict | None) -> None:
        """Written whole beside the current one (``recipe.json`` last), then swapped in by renames."""
        new, old = self._sibling(".new"), self._sibling(".old")
        main = self.accelerator.is_main_process
        if main:
            shutil.rmtree(new, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(new))
        self.accelerator.wait_for_everyone()  # every rank's RNG file is in before the swap
        if main:
            if best_weights is not None:
                torch.save(best_weights, new / "best_trainable.pt")
            write_json(new / "recipe.json", self.fingerprint)
            shutil.rmtree(old, ignore_errors=True)
            if self.path.exists():
                self.path.rename(old)
            new.rename(self.path)
            shutil.rmtree(old, ignore_errors=True)
        self.accelerator.wait_for_everyone()

    def load(self) -> dict | None:
        """Restore every registered object; returns the best weights saved with them, if any."""
        self.accelerator.load_state(str(self.path), strict=False)
        best = self.path / "best_trainable.pt"
        return torch.load(best) if best.exists() else None

    def remove(self) -> None:
        if self.accelerator.is_main_process:
            for path in (self.path, self._sibling(".new"), self._sibling(".old")):
                shutil.rmtree(path, ignore_errors=True)


@dataclasses.dataclass
class Run:
    """Everything one run is made of; :func:`build` fills in the parts after ``model``."""

    recipe: Recipe
    setup: Setup
    out: Path
    accelerator: Accelerator
    checkpoints: Checkpoints
    model: Any = None
    hook: Any = None
    neftune: Any = None
    """transformers' NEFTune hook on the input embeddings (``train.neftune_alpha`` > 0)."""
    masker: TokenMasker | None = None
    schedule: Any = None
    sampler: LengthGroupedBatches | None = None
    train_loader: Any = None
    dev_loader: Any = None
    class_weights: torch.Tensor | None = None
    trainable: list = dataclasses.field(default_factory=list)
    optimizer: Any = None
    scheduler: Any = None
    counts: dict = dataclasses.field(default_factory=dict)
    updates: int = 0
    """Optimizer updates this process makes before the run ends."""
    slot: str | None = None
    """In a pack (``sweep.pack``): the PEFT adapter this run is; only its tensors are kept and saved."""
    own: dict | None = None
    """In a pack: this run's trainable tensors by name (the other slots' share the model)."""
    pack: dict | None = None
    """In a pack: its size, this run's slot and the pack's rates, recorded in ``metrics.json``."""

    @property
    def fsdp(self) -> bool:
        return self.accelerator.distributed_type == DistributedType.FSDP

    def log(self, record: dict) -> None:
        """A line of ``log.jsonl``, and the same figures to the trackers (``train.report_to``)."""
        if self.accelerator.is_main_process:
            with (self.out / LOG_FILE).open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.recipe.train.report_to and (values := tracking.scalars(record)):
            self.accelerator.log(values[0], step=values[1])

    def trainable_state(self) -> dict:
        unwrapped = self.accelerator.unwrap_model(self.model)
        params = self.own if self.own is not None else {
            n: p for n, p in unwrapped.named_parameters() if p.requires_grad}
        return {n: p.detach().cpu().clone() for n, p in params.items()}

    def evaluate(self, loader, keep: bool = False, slots: int = 1) -> list[tuple[dict[str, float], Predictions | None]]:
        """Scores of the model as it is, one per slot (a pack's running slots; else one)."""
        tc = self.recipe.train
        return evaluate_slots(self.model, loader, self.accelerator, self.recipe.model.task, self.class_weights,
                              tc.focal_gamma, keep, slots)

    def score(self, features: list[dict], keep: bool = False, slots: int = 1) -> list[tuple[dict, Predictions | None]]:
        """Evaluate on an evaluation set other than the prepared dev loader's."""
        loader = eval_loader(features, self.setup.tokenizer, self.recipe.model.task, self.recipe.train.eval_batch_size)
        return self.evaluate(self.accelerator.prepare(loader), keep, slots)


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
        return _train(recipe, setup, out)
    with hold(out, "run"), kept_in(out):  # third-party notices of the run go to its third_party.log
        return _train(recipe, setup, out)


def _train(recipe: Recipe, setup: Setup | None, out: Path) -> dict:
    clear_stale_results(out)
    setup = setup or Setup.from_recipe(recipe)
    check_setup(setup, recipe)
    started = time.perf_counter()
    run = start(recipe, setup, out)
    try:
        build(run)
        state, stopping = TrainState(since=started), EarlyStopping(recipe.train.metric, recipe.train.patience)
        resume_or_begin(run, state, stopping)
        fit(run, state, stopping)
        return finish(run, state, stopping)
    finally:
        close(run)


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


def start(recipe: Recipe, setup: Setup, out: Path) -> Run:
    """The accelerator, and every refusal that must come before a model is built (a sweep's kept
    base would otherwise keep the refused run's adapter)."""
    tc = recipe.train
    _allow_precision(tc.mixed_precision)
    # cpu=True when there is no accelerator: Accelerate then recognises torchrun's env as MULTI_CPU.
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision,
                              cpu=not torch.accelerator.is_available(),
                              dataloader_config=DataLoaderConfiguration(non_blocking=True),
                              **tracking.accelerator_options(recipe, out))
    checkpoints = Checkpoints(accelerator, out, run_fingerprint(recipe))
    checkpoints.refuse_other_run()
    if tc.compile and not _plain_or_ddp(accelerator):
        raise ValueError(f"train.compile is supported on one device or with DDP, not "
                         f"{accelerator.distributed_type}: set train.compile=false")
    _reset_peak_memory(accelerator.device)
    tracking.start(accelerator, recipe, out)
    return Run(recipe, setup, out, accelerator, checkpoints)


def build(run: Run) -> None:
    """Model, masking hook, loaders, class weights, optimizer and scheduler, prepared by Accelerate."""
    recipe, setup, accelerator, tc = run.recipe, run.setup, run.accelerator, run.recipe.train
    run.model = setup.model_for(tc.seed, accelerator.device, tc.mixed_precision,
                                cast_frozen=_plain_or_ddp(accelerator))  # FSDP flattens to one dtype
    if tc.compile:
        # Dynamic shapes: one graph serves every batch length, instead of a recompile per length.
        compile_blocks(run.model, dynamic=True)
    run.counts = parameter_counts(run.model)
    run.schedule = recipe.masking.to_schedule()
    run.masker = masker_for(run, recipe)
    run.hook = attach_masking(run.model, run.masker)
    build_loop(run)


def masker_for(run: Run, recipe: Recipe) -> TokenMasker:
    """``recipe``'s masker. Each process masks with its own stream; the hook masks only while model.training."""
    return TokenMasker.for_tokenizer(run.setup.tokenizer, run.setup.mask_token,
                                     rate=recipe.masking.to_schedule().rate_at(0, 1),
                                     seed=recipe.train.seed * 1009 + run.accelerator.process_index,
                                     **recipe.masking.strategy())


def build_loop(run: Run) -> None:
    """NEFTune, loaders, class weights, optimizer and scheduler around ``run.model``, prepared by Accelerate."""
    recipe, setup, accelerator, tc = run.recipe, run.setup, run.accelerator, run.recipe.train
    if tc.neftune_alpha:  # after the masking hook: noise lands on the masked sequence's embeddings
        run.neftune = activate_neftune(run.model, tc.neftune_alpha)
    run.sampler = LengthGroupedBatches([len(f["input_ids"]) for f in setup.train_features], tc.batch_size,
                                       tc.seed, tc.group_by_length)
    # Loaders get their own generator: a new iterator would otherwise draw from the global RNG,
    # which dropout also uses, and a resumed run would drift from an uninterrupted one.
    # Pinned batches copy to a GPU without waiting for the work already queued there.
    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(setup.train_features, batch_sampler=run.sampler, num_workers=tc.num_workers,
                              collate_fn=padding_collator(setup.tokenizer, recipe.model.task,
                                                          word_ids=recipe.masking.unit != "token"), pin_memory=pin,
                              generator=torch.Generator().manual_seed(tc.seed))
    dev_loader = eval_loader(setup.dev_features, setup.tokenizer, recipe.model.task, tc.eval_batch_size, pin)
    run.class_weights = class_weights(label_counts(setup.train_features, len(setup.labels)), tc.class_weights)
    run.trainable = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = _adamw(run.trainable, tc, accelerator.device)
    total = tc.total_updates(len(run.sampler), accelerator.num_processes)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_updates(total), total)
    run.model, run.optimizer, run.train_loader, run.dev_loader, run.scheduler = accelerator.prepare(
        run.model, optimizer, train_loader, dev_loader, scheduler)
    run.updates = tc.local_updates(len(run.sampler), accelerator.num_processes)


def _adamw(trainable: list, tc, device: torch.device) -> torch.optim.AdamW:
    """AdamW without decay on biases and norms; fused (the HF Trainer's default too): one kernel over
    all tensors instead of a loop; a LoRA model has hundreds of small tensors (6.7 -> 2.3 ms per step on CPU)."""
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                             fused=device.type in ("cpu", "cuda", "xpu"))


def resume_or_begin(run: Run, state: TrainState, stopping: EarlyStopping) -> None:
    """Register what a checkpoint holds; restore it, or start an empty run directory."""
    for obj in (run.masker, state):
        run.accelerator.register_for_checkpointing(obj)
    _checkpoint_only_trainable(run.accelerator)
    if run.checkpoints.exists:
        stopping.weights = run.checkpoints.load()
        run.accelerator.print(f"resumed {run.out} at step {state.step} (epoch {state.epoch}, "
                              f"batch {state.batches_done})")
        if run.accelerator.is_main_process:
            _drop_log_after(run.out / LOG_FILE, state.step)
    elif run.accelerator.is_main_process:
        run.out.mkdir(parents=True, exist_ok=True)
        (run.out / LOG_FILE).unlink(missing_ok=True)


def _drop_log_after(path: Path, step: int) -> None:
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


# ---- fit ----------------------------------------------------------------------------------------


def fit(run: Run, state: TrainState, stopping: EarlyStopping) -> None:
    """Optimizer updates in time order; after each one: log, evaluate?, checkpoint?, stop?"""
    tc = run.recipe.train
    if state.stopped_early or state.step >= run.updates:
        return  # resumed from a run that had finished training
    run.model.train()  # from_pretrained leaves modules in eval mode: dropout (and masking) would stay off
    # disable=None: tqdm draws only on a terminal, so logs of batch jobs stay readable.
    progress = tqdm(total=run.updates, initial=state.step, desc=run.out.name, dynamic_ncols=True,
                    disable=None if run.accelerator.is_local_main_process else True)
    with progress:
        for loss, epoch_ended in optimizer_updates(run, state):
            progress.update(1)
            lr = run.scheduler.get_last_lr()[0]
            # loss.item() waits for the device: only when something shows or logs it, so on a GPU
            # the host can queue the next step while this one runs.
            if not progress.disable:
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", p=f"{run.masker.rate:.2f}")
            if state.step % tc.log_every == 0:
                run.log({"step": state.step, "epoch": state.epoch, "loss": loss.item(), "lr": lr,
                         "mask_rate": run.masker.rate})
            last = state.step >= run.updates or state.epoch >= tc.epochs
            if _evaluation_due(tc, state.step, epoch_ended, last) and evaluate_and_keep(run, state, stopping):
                state.stopped_early = True
                return
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                run.checkpoints.save(stopping.weights)
            if last:
                return


def _evaluation_due(tc, step: int, epoch_ended: bool, last: bool) -> bool:
    """Every ``eval_every`` updates, else at each epoch's end; always after the last update."""
    return last or (step % tc.eval_every == 0 if tc.eval_every else epoch_ended)


def optimizer_updates(run: Run, state: TrainState, step: Callable | None = None) -> Iterator[tuple[Any, bool]]:
    """Train batch by batch from where ``state`` says; yield ``(loss, epoch_ended)`` after each
    optimizer update. The counters in ``state`` advance here and nowhere else.

    ``step(run, batch, step_number)`` trains on one batch (default :func:`train_step`) and returns the loss."""
    step = step or train_step
    while state.epoch < run.recipe.train.epochs:
        run.sampler.set_epoch(state.epoch)
        run.train_loader.set_epoch(state.epoch)
        loader = run.train_loader
        if state.batches_done:
            loader = run.accelerator.skip_first_batches(run.train_loader, state.batches_done)
        for batch in loader:
            loss = step(run, batch, state.step)
            state.batches_done += 1
            if not run.accelerator.sync_gradients:
                continue
            state.step += 1
            # Accelerate syncs (updates) on the last batch of a pass whatever the accumulation count.
            epoch_ended = run.accelerator.gradient_state.end_of_dataloader
            if epoch_ended:
                state.epoch, state.batches_done = state.epoch + 1, 0
            yield loss, epoch_ended


def train_step(run: Run, batch: dict, step: int) -> torch.Tensor:
    """Forward (masked by the hook), loss (+ the consistency term), backward; clip and step when the
    accumulation is full."""
    tc, masking, accelerator = run.recipe.train, run.recipe.masking, run.accelerator
    with accelerator.accumulate(run.model):
        run.masker.rate = run.schedule.rate_at(step, run.updates)
        labels = batch.pop("labels")
        logits = run.model(**batch).logits
        loss = classification_loss(logits, labels, run.class_weights, tc.focal_gamma)
        if masking.consistency:
            loss = loss + masking.consistency * consistency_term(run.model, batch, logits, run.masker, labels,
                                                                 masking.consistency_stop_grad)
        accelerator.backward(loss)
        if accelerator.sync_gradients and tc.max_grad_norm:
            # The trainable list, not model.parameters(): walking a PEFT model's module tree
            # cost ~16 ms per step on a 24-layer decoder. FSDP wants all its (flat) parameters.
            accelerator.clip_grad_norm_(run.model.parameters() if run.fsdp else run.trainable, tc.max_grad_norm)
        run.optimizer.step()
        run.scheduler.step()
        run.optimizer.zero_grad()
    return loss


def evaluate_and_keep(run: Run, state: TrainState, stopping: EarlyStopping, metrics: dict | None = None) -> bool:
    """Score dev (unless a pack scored it: ``metrics``), log it, save the run when it is the best so far,
    checkpoint if asked at every evaluation; True when patience says stop."""
    metrics = metrics or run.evaluate(run.dev_loader)[0][0]
    record = {"step": state.step, "epoch": state.epoch, **metrics}
    state.history.append(record)
    run.log({"eval": record})
    run.accelerator.print(f"step {state.step} epoch {state.epoch}: " +
                          " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if stopping.update(state, record, run.trainable_state):
        save_run(run)
    if run.recipe.train.checkpoint_every == 0:
        run.checkpoints.save(stopping.weights)
    return stopping.should_stop(state)


def evaluate(model, loader, accelerator: Accelerator, task: str, weights=None, focal_gamma=0.0,
             keep: bool = False) -> tuple[dict[str, float], Predictions | None]:
    """Metrics over all processes (``gather_for_metrics`` drops the duplicated tail) and, with ``keep``,
    every scored unit's prediction (a text, or a labelled word) with its example index and probabilities."""
    return evaluate_slots(model, loader, accelerator, task, weights, focal_gamma, keep)[0]


def evaluate_slots(model, loader, accelerator: Accelerator, task: str, weights=None, focal_gamma=0.0,
                   keep: bool = False, slots: int = 1) -> list[tuple[dict[str, float], Predictions | None]]:
    """:func:`evaluate` for each of ``slots`` packed adapters, in one pass: each batch is replicated once
    per slot (see :mod:`~tokmask_peft.packing`) and slice k scores slot k."""
    model.eval()
    scores = [_Scores(accelerator.device) for _ in range(slots)]
    # Eager even where train.compile compiled the blocks: a second, no-grad graph would cost another
    # compile for a pass that is a small part of a run (and bitsandbytes' 4-bit ops fail in one on CPU).
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for batch in loader:
            labels, example = batch.pop("labels"), batch.pop("example")
            inputs = batch if slots == 1 else replicate(batch, slots)
            for score, logits in zip(scores, model(**inputs).logits.chunk(slots)):
                score.add(logits, labels, example, task, accelerator, weights, focal_gamma)
    model.train()
    return [score.result(accelerator, keep) for score in scores]


class _Scores:
    """One adapter's predictions and loss over an evaluation pass, gathered from every process."""

    def __init__(self, device: torch.device):
        self.rows: dict[str, list] = {"example": [], "gold": [], "probs": []}
        self.loss_sum, self.loss_count = torch.zeros((), device=device), torch.zeros((), device=device)

    def add(self, logits, labels, example, task, accelerator, weights, focal_gamma) -> None:
        n = (labels != -100).sum()
        self.loss_sum += classification_loss(logits, labels, weights, focal_gamma) * n
        self.loss_count += n
        probs = logits.float().softmax(-1)
        if task == "token":
            example = example[:, None].expand_as(labels)
            probs, labels, example = (accelerator.pad_across_processes(t, dim=1, pad_index=-100)
                                      for t in (probs, labels, example))
        probs, labels, example = accelerator.gather_for_metrics((probs, labels, example))
        scored = labels.reshape(-1) != -100
        self.rows["probs"].append(probs.reshape(-1, probs.shape[-1])[scored].cpu())
        self.rows["gold"].append(labels.reshape(-1)[scored].cpu())
        self.rows["example"].append(example.reshape(-1)[scored].cpu())

    def result(self, accelerator, keep: bool) -> tuple[dict[str, float], Predictions | None]:
        loss_sum, loss_count = accelerator.reduce(self.loss_sum), accelerator.reduce(self.loss_count)
        probs, gold = torch.cat(self.rows["probs"]), torch.cat(self.rows["gold"])
        pred = probs.argmax(-1)
        metrics = {**classification_metrics(pred, gold), "loss": float(loss_sum / loss_count)}
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


# ---- save, finish, close -------------------------------------------------------------------------


def save_run(run: Run) -> None:
    """Adapter (or full model) + tokenizer + tokmask_config.json, written by the main process only:
    saved whole into a scratch directory, moved in file by file, then the config that records the
    weights' sizes and digests (loading checks them)."""
    accelerator, setup, recipe = run.accelerator, run.setup, run.recipe
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(run.model)
    kwargs = {"save_embedding_layers": False} if recipe.model.method != "full" else {}
    scratch = run.out / SCRATCH_DIR
    if accelerator.is_main_process:
        shutil.rmtree(scratch, ignore_errors=True)
    accelerator.wait_for_everyone()
    if run.slot is not None:
        kwargs["selected_adapters"] = [run.slot]
    unwrapped.save_pretrained(scratch, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                              **kwargs)
    if accelerator.is_main_process:
        saved = scratch / run.slot if run.slot not in (None, "default") else scratch  # PEFT's folder per adapter
        setup.tokenizer.save_pretrained(saved)
        weights = weight_record(saved)
        move_files_in(saved, run.out)
        if saved != scratch:
            move_files_in(scratch, run.out)  # PEFT's README.md, written beside the adapter's folder
        write_json(run.out / TOKMASK_CONFIG, {**run_config(recipe, setup.labels, setup.mask_token),
                                              "base_identity": setup.base_identity, "weights": weights,
                                              "command": training_command()})
    accelerator.wait_for_everyone()


def finish(run: Run, state: TrainState, stopping: EarlyStopping) -> dict:
    """Back to the best weights; score dev and the extra evaluation sets with them, keeping every
    prediction (``predictions.npz``); write ``metrics.json``."""
    restore_best(run, stopping)
    return write_results(run, state, *final_scores(run)[0])


def restore_best(run: Run, stopping: EarlyStopping) -> None:
    if stopping.weights is not None:
        run.accelerator.unwrap_model(run.model).load_state_dict(stopping.weights, strict=False)


def final_scores(run: Run, slots: int = 1) -> list[tuple[dict, dict]]:
    """Per slot: ``(scored, robustness)``: dev and every extra set scored with predictions kept, and the
    corrupted dev copies' metrics (``train.robustness``)."""
    setup, tc = run.setup, run.recipe.train
    sets = {DEV_SET: setup.dev_features, **setup.extra_features}
    per_set = {name: run.score(features, keep=True, slots=slots) for name, features in sets.items()}
    corrupted = {(kind, q): run.score(setup.robustness_features(kind, q), slots=slots)
                 for kind in (CORRUPTIONS if tc.robustness else ()) for q in tc.robustness}
    return [({name: scores[i] for name, scores in per_set.items()},
             {kind: {str(q): corrupted[kind, q][i][0] for q in tc.robustness} for kind in dict.fromkeys(k for k, _ in corrupted)})
            for i in range(slots)]


def write_results(run: Run, state: TrainState, scored: dict, robustness: dict) -> dict:
    """``predictions.npz``, the model card and ``metrics.json`` (last: a run with it is complete)."""
    accelerator, setup = run.accelerator, run.setup
    extra = {name: metrics for name, (metrics, _) in scored.items() if name != DEV_SET}
    peak_mb, peak_kind = _peak_memory_mb(accelerator.device)
    metrics = {
        "best": state.best, "history": state.history, "extra_eval": extra, "robustness": robustness, **run.counts,
        "train_examples": len(setup.train_features), "dev_examples": len(setup.dev_features),
        "steps": state.step, "stopped_early": state.stopped_early,
        "wall_time_s": state.wall_s(), "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind,
        "world_size": accelerator.num_processes, **({"pack": run.pack} if run.pack else {}),
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_predictions(run.out / PREDICTIONS_FILE, {name: kept for name, (_, kept) in scored.items()})
        config = read_json(run.out / TOKMASK_CONFIG, "run config")  # PEFT's generic README.md → ours
        atomic_write_text(run.out / CARD, card(config, metrics, config.get("command", training_command())))
        write_json(run.out / METRICS_FILE, metrics)  # last: a run with metrics.json is complete
    run.checkpoints.remove()
    return metrics


def close(run: Run) -> None:
    """Detach the masking (and NEFTune) hook and give a sweep's kept base back, whether the run
    finished or failed."""
    if run.recipe.train.report_to:
        run.accelerator.end_training()  # each tracker closes its run (flushes event files)
    if run.hook is not None:
        run.hook.remove()
    if run.neftune is not None:
        deactivate_neftune(run.accelerator.unwrap_model(run.model), run.neftune)
    if run.model is not None:
        run.setup.release(run.accelerator.unwrap_model(run.model))
    if run.accelerator.device.type != "cpu":
        # gc + emptied device cache so a sweep's next run starts clean; on a CPU there is no
        # cache to empty and the forced gc.collect() only cost ~0.3 s per run.
        run.accelerator.free_memory()


def _is_main_rank() -> bool:
    return os.environ.get("RANK", "0") == "0"


def _plain_or_ddp(accelerator: Accelerator) -> bool:
    return accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU, DistributedType.MULTI_CPU)


PEAK_RSS_RESET = Path("/proc/self/clear_refs")  # Linux: writing 5 resets the process's peak resident set


def _reset_peak_memory(device: torch.device) -> None:
    """Each run's peak is its own: without a reset, runs after the first in a sweep's process would
    report the largest peak so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        PEAK_RSS_RESET.write_text("5")
    except OSError:
        pass  # not Linux: the process-wide maximum is what _peak_memory_mb reads


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    try:
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024, "cpu_peak_rss_of_run"
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss_of_process"


def _allow_precision(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide state and refuses a second Accelerator with another
    precision; a process that trains an fp32 and then a bf16 recipe resets it (the distributed
    part, PartialState, is kept)."""
    from accelerate.state import AcceleratorState

    current = AcceleratorState._shared_state.get("_mixed_precision")
    if current is not None and current != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def _checkpoint_only_trainable(accelerator: Accelerator) -> None:
    """Checkpoints hold only trainable tensors: the frozen (maybe quantised) base is reloaded anyway."""

    def shrink(models, weights, output_dir):
        for i, model in enumerate(models):
            trainable = {n for n, p in model.named_parameters() if p.requires_grad}
            if len(trainable) < sum(1 for _ in model.parameters()):
                weights[i] = {k: v for k, v in weights[i].items() if k in trainable}

    accelerator.register_save_state_pre_hook(shrink)
