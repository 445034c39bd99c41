"""One explicit Accelerate loop for every method and task: mask (training only) → forward →
loss → accumulate/clip/step → evaluate → keep the best → checkpoint. Resumable.
"""
from __future__ import annotations

import dataclasses
import json
import math
import random
import resource
import shutil
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, DataLoaderConfiguration, DistributedType
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_linear_schedule_with_warmup

from .config import Recipe, resolve_path
from .data import LengthGroupedBatches, encode, label_names, check_labels, padding_collator, read_examples
from .losses import class_weights, classification_loss, label_counts
from .masking import MaskToken, TokenMasker, attach_masking
from .metrics import classification_metrics
from .modeling import (add_adapter, build_model, cast_frozen_linears, compile_blocks, parameter_counts,
                       prepare_tokenizer, upcast_trainable)

TOKMASK_CONFIG = "tokmask_config.json"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoint"
VERSIONED = ("tokmask-peft", "torch", "transformers", "peft", "accelerate", "bitsandbytes")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- what every run of one recipe shares --------------------------------------------------


@dataclasses.dataclass
class Setup:
    """Tokenizer, mask token, labels and tokenised splits: built once, shared by a sweep's runs.

    For LoRA/QLoRA it also keeps the frozen base model, so a sweep creates a fresh adapter per
    run instead of reloading (and, for QLoRA, re-quantising) the base.
    """

    recipe: Recipe
    tokenizer: Any
    mask_token: MaskToken
    labels: list[str]
    train_features: list[dict]
    dev_features: list[dict]
    extra_features: dict[str, list[dict]]
    base: Any = None
    frozen_dtype: torch.dtype | None = None  # set once train() stores the kept base's frozen linears in bf16/fp16

    @classmethod
    def from_recipe(cls, recipe: Recipe) -> "Setup":
        d, task = recipe.data, recipe.model.task
        tokenizer, mask_token = prepare_tokenizer(recipe.model)

        def read(path, split):
            return read_examples(resolve_path(path), d.format, task, d.text_column, d.label_column, d.fold_tags,
                                 split)

        train = read(d.train, "train")
        # Fixed shuffles (seed 0): every rate and seed of a sweep sees the same split and subset.
        if d.dev_fraction:
            train = random.Random(0).sample(train, len(train))
            n_dev = max(1, int(len(train) * d.dev_fraction))
            dev, train = train[:n_dev], train[n_dev:]
        else:
            dev = read(d.dev, "validation")
        dev = dev[: d.max_eval_examples or None]
        if d.max_train_examples and d.max_train_examples < len(train):
            train = random.Random(0).sample(train, d.max_train_examples)
        labels = label_names(train)
        if len(labels) < 2:
            raise ValueError(f"{d.train}: training data has {len(labels)} label(s) {labels}; need at least 2")
        extra = {name: read(path, "validation")[: d.max_eval_examples or None] for name, path in d.extra_eval.items()}
        for examples in (dev, *extra.values()):
            check_labels(examples, labels)
        label2id = {label: i for i, label in enumerate(labels)}

        def enc(examples):
            return encode(examples, tokenizer, task, label2id, d.max_length)

        return cls(recipe, tokenizer, mask_token, labels, enc(train), enc(dev),
                   {name: enc(ex) for name, ex in extra.items()})

    def model_for(self, seed: int, device: torch.device | None = None):
        """A model ready to train for ``seed``: a fresh full model, or a fresh adapter on the kept base."""
        cfg = self.recipe.model
        if cfg.method == "full":
            return build_model(cfg, self.labels, self.tokenizer, self.mask_token, seed, device)
        if self.base is None:
            model = build_model(cfg, self.labels, self.tokenizer, self.mask_token, seed, device)
            self.base = model.get_base_model()
            return model
        return add_adapter(self.base, cfg, self.mask_token, seed)

    def release(self, model) -> None:
        """Strip the adapter so the kept base is as loaded (``get_peft_model`` mutated it); layers that
        ``train.compile`` compiled stay compiled, for the next run."""
        if self.recipe.model.method != "full" and self.base is not None:
            model.unload()


# ---- the loop ---------------------------------------------------------------------------------


@dataclasses.dataclass
class TrainState:
    """Loop counters, checkpointed with the model so a resumed run continues where it stopped."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    best: dict | None = None
    bad_evals: int = 0
    history: list = dataclasses.field(default_factory=list)
    stopped_early: bool = False

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)


def run_fingerprint(recipe: Recipe) -> dict:
    """What must match for a checkpoint to be resumed into (everything but where and how fast it is written)."""
    d = recipe.to_dict()
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("output_dir", "num_workers", "log_every", "compile")}
    d.pop("sweep", None)
    return d


def fingerprint_diff(saved: dict, fingerprint: dict, shared_keys_only: bool = False) -> list[str]:
    """``section.key`` names where a saved fingerprint (read from JSON) differs from ``fingerprint``;
    ``shared_keys_only`` skips keys one side lacks (a run saved before a recipe field existed)."""
    current = json.loads(json.dumps(fingerprint, default=str))
    pick = (lambda a, b: a & b) if shared_keys_only else (lambda a, b: a | b)
    return sorted(f"{s}.{k}" for s in pick(current.keys(), saved.keys())
                  for k in pick(current.get(s, {}).keys(), saved.get(s, {}).keys())
                  if saved.get(s, {}).get(k) != current.get(s, {}).get(k))


def refuse_other_recipe(run: Path, recipe: Recipe, advice: str) -> None:
    """A finished run in ``run`` is reused only if ``recipe`` trained it; else name the keys that differ."""
    if not (run / TOKMASK_CONFIG).is_file():
        return
    saved = json.loads((run / TOKMASK_CONFIG).read_text()).get("recipe", {})
    diff = fingerprint_diff(saved, run_fingerprint(recipe), shared_keys_only=True)
    if diff:
        raise ValueError(f"{run} was trained with another recipe (differs in {diff}); {advice}")


def is_better(metric: str, new: float, old: float | None) -> bool:
    if old is None:
        return True
    return new < old if metric == "loss" else new > old


def _peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "cpu_max_rss"


def evaluate(model, loader, accelerator: Accelerator, task: str, weights=None, focal_gamma=0.0) -> dict[str, float]:
    """Dev metrics over all processes (``gather_for_metrics`` drops the duplicated tail)."""
    model.eval()
    preds, refs = [], []
    loss_sum, loss_count = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device)
    # Eager even where train.compile compiled the blocks: a second, no-grad graph would cost another
    # compile for a pass that is a small part of a run (and bitsandbytes' 4-bit ops fail in one on CPU).
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        for batch in loader:
            labels = batch.pop("labels")
            logits = model(**batch).logits
            n = (labels != -100).sum()
            loss_sum += classification_loss(logits, labels, weights, focal_gamma) * n
            loss_count += n
            pred = logits.argmax(-1)
            if task == "token":
                pred = accelerator.pad_across_processes(pred, dim=1, pad_index=-100)
                labels = accelerator.pad_across_processes(labels, dim=1, pad_index=-100)
            pred, labels = accelerator.gather_for_metrics((pred, labels))
            preds.append(pred.reshape(-1).cpu())
            refs.append(labels.reshape(-1).cpu())
    loss_sum, loss_count = accelerator.reduce(loss_sum), accelerator.reduce(loss_count)
    model.train()
    return {**classification_metrics(torch.cat(preds), torch.cat(refs)), "loss": float(loss_sum / loss_count)}


def _eval_loader(features, tokenizer, task, batch_size, pin_memory=False):
    # Sorted by length: less padding; order does not matter for the metrics.
    order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    return DataLoader(features, batch_sampler=batches, collate_fn=padding_collator(tokenizer, task),
                      pin_memory=pin_memory, generator=torch.Generator().manual_seed(0))


def write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def train(recipe: Recipe, setup: Setup | None = None, output_dir: str | Path | None = None) -> dict:
    """Train one run of ``recipe``; write adapter (or full model), tokenizer and side files.

    Args:
        recipe: the validated recipe; ``train.output_dir`` is where files go unless ``output_dir``.
        setup: shared tokenizer/data/base from :meth:`Setup.from_recipe` (built here if ``None``).
        output_dir: overrides ``recipe.train.output_dir`` (sweeps point each run elsewhere).

    Returns:
        The contents of ``metrics.json``.
    """
    tc, task = recipe.train, recipe.model.task
    out = Path(output_dir or tc.output_dir)
    if (out / METRICS_FILE).exists():
        raise FileExistsError(f"{out} already holds a finished run ({METRICS_FILE}); choose another output_dir")
    setup = setup or Setup.from_recipe(recipe)
    if setup.recipe.model != recipe.model or setup.recipe.data != recipe.data:
        raise ValueError("setup was built for a different model or data section than this recipe")
    _allow_precision(tc.mixed_precision)
    # cpu=True when there is no accelerator: Accelerate then recognises torchrun's env as MULTI_CPU.
    accelerator = Accelerator(gradient_accumulation_steps=tc.grad_accum, mixed_precision=tc.mixed_precision,
                              cpu=not torch.accelerator.is_available(),
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))
    checkpoint = out / CHECKPOINT_DIR
    fingerprint = run_fingerprint(recipe)
    resuming = (checkpoint / "recipe.json").exists()
    if resuming:
        diff = fingerprint_diff(json.loads((checkpoint / "recipe.json").read_text()), fingerprint)
        if diff:
            raise ValueError(f"{checkpoint} belongs to a different run (differs in {diff}); "
                             "use another output_dir or delete the checkpoint")

    started = time.perf_counter()
    if accelerator.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(accelerator.device)
    compute_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision)
    if setup.frozen_dtype not in (None, compute_dtype):
        raise ValueError(f"this Setup's kept base holds {setup.frozen_dtype} weights from an earlier "
                         f"mixed-precision run; build a new Setup for mixed_precision={tc.mixed_precision!r}")
    plain_or_ddp = accelerator.distributed_type in (DistributedType.NO, DistributedType.MULTI_GPU,
                                                    DistributedType.MULTI_CPU)  # FSDP flattens to one dtype
    if tc.compile and not plain_or_ddp:  # before the model is built: a kept base would keep this run's adapter
        raise ValueError(f"train.compile is supported on one device or with DDP, not "
                         f"{accelerator.distributed_type}: set train.compile=false")
    model = setup.model_for(tc.seed, accelerator.device)
    if (compute_dtype is not None and recipe.model.method == "lora" and plain_or_ddp
            and cast_frozen_linears(model, compute_dtype)):
        setup.frozen_dtype = compute_dtype
    if compute_dtype is not None and recipe.model.method != "full":
        upcast_trainable(model)  # head (and any half-precision trainable) updated in fp32, run in autocast
    if tc.compile:
        # Dynamic shapes: one graph serves every batch length, instead of a recompile per length.
        compile_blocks(model, dynamic=True)
    counts = parameter_counts(model)
    schedule = recipe.masking.to_schedule()
    # Each process masks with its own stream; the hook masks only while model.training.
    masker = TokenMasker.for_tokenizer(setup.tokenizer, setup.mask_token, rate=schedule.rate_at(0, 1),
                                       seed=tc.seed * 1009 + accelerator.process_index)
    hook = attach_masking(model, masker)

    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in setup.train_features], tc.batch_size, tc.seed,
                                   tc.group_by_length)
    # Loaders get their own generator: a new iterator would otherwise draw from the global RNG,
    # which dropout also uses, and a resumed run would drift from an uninterrupted one.
    # Pinned batches copy to a GPU without waiting for the work already queued there.
    pin = accelerator.device.type == "cuda"
    train_loader = DataLoader(setup.train_features, batch_sampler=sampler, num_workers=tc.num_workers,
                              collate_fn=padding_collator(setup.tokenizer, task), pin_memory=pin,
                              generator=torch.Generator().manual_seed(tc.seed))
    dev_loader = _eval_loader(setup.dev_features, setup.tokenizer, task, tc.eval_batch_size, pin)
    weights = class_weights(label_counts(setup.train_features, len(setup.labels)), tc.class_weights)

    trainable = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in trainable if p.ndim >= 2]
    no_decay = [p for p in trainable if p.ndim < 2]
    # Fused (the HF Trainer's default too): one kernel over all tensors instead of a loop or a few
    # per tensor group; a LoRA model has hundreds of small tensors (6.7 -> 2.3 ms per step on CPU).
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=tc.lr,
                                  fused=accelerator.device.type in ("cpu", "cuda", "xpu"))
    # Counted on the unsharded loader: Accelerate steps the scheduler once per process per update.
    updates_per_epoch = math.ceil(len(sampler) / tc.grad_accum)
    total_updates = tc.epochs * updates_per_epoch
    if tc.max_steps:
        total_updates = min(total_updates, tc.max_steps * accelerator.num_processes)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_updates), total_updates)
    model, optimizer, train_loader, dev_loader, scheduler = accelerator.prepare(
        model, optimizer, train_loader, dev_loader, scheduler)
    local_updates = math.ceil(total_updates / accelerator.num_processes)
    fsdp = accelerator.distributed_type == DistributedType.FSDP

    state = TrainState()
    for obj in (masker, state):
        accelerator.register_for_checkpointing(obj)
    _checkpoint_only_trainable(accelerator)
    if resuming:
        accelerator.load_state(str(checkpoint), strict=False)
        accelerator.print(f"resumed {out} at step {state.step} (epoch {state.epoch}, batch {state.batches_done})")
    elif accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        if (out / "log.jsonl").exists():
            (out / "log.jsonl").unlink()

    def log(record: dict) -> None:
        if accelerator.is_main_process:
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    best_state = None

    def trainable_state() -> dict:
        unwrapped = accelerator.unwrap_model(model)
        return {n: p.detach().cpu().clone() for n, p in unwrapped.named_parameters() if p.requires_grad}

    def save_checkpoint() -> None:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(checkpoint))
        if accelerator.is_main_process:
            write_json(checkpoint / "recipe.json", fingerprint)
            if best_state is not None:
                torch.save(best_state, checkpoint / "best_trainable.pt")

    if resuming and (checkpoint / "best_trainable.pt").exists():
        best_state = torch.load(checkpoint / "best_trainable.pt")

    def run_eval() -> bool:
        """Evaluate, keep the best, checkpoint; True when early stopping says stop."""
        nonlocal best_state
        metrics = evaluate(model, dev_loader, accelerator, task, weights, tc.focal_gamma)
        record = {"step": state.step, "epoch": state.epoch, **metrics}
        state.history.append(record)
        log({"eval": record})
        accelerator.print(f"step {state.step} epoch {state.epoch}: " +
                          " ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if is_better(tc.metric, metrics[tc.metric], state.best and state.best[tc.metric]):
            state.best, state.bad_evals = record, 0
            best_state = trainable_state()
            save_run(accelerator, model, setup, recipe, out)
        else:
            state.bad_evals += 1
        if tc.checkpoint_every == 0:
            save_checkpoint()
        return bool(tc.patience) and state.bad_evals >= tc.patience

    model.train()
    # None: tqdm draws only on a terminal, so logs of batch jobs stay readable.
    progress = tqdm(total=local_updates, initial=state.step, disable=None if accelerator.is_local_main_process else True,
                    desc=out.name, dynamic_ncols=True)
    stop = state.stopped_early or state.step >= local_updates
    while not stop and state.epoch < tc.epochs:
        sampler.set_epoch(state.epoch)
        train_loader.set_epoch(state.epoch)
        loader = accelerator.skip_first_batches(train_loader, state.batches_done) if state.batches_done else train_loader
        for batch in loader:
            with accelerator.accumulate(model):
                masker.rate = schedule.rate_at(state.step, local_updates)
                labels = batch.pop("labels")
                loss = classification_loss(model(**batch).logits, labels, weights, tc.focal_gamma)
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm:
                    # The trainable list, not model.parameters(): walking a PEFT model's module tree
                    # cost ~16 ms per step on a 24-layer decoder. FSDP wants all its (flat) parameters.
                    accelerator.clip_grad_norm_(model.parameters() if fsdp else trainable, tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            state.batches_done += 1
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            lr = scheduler.get_last_lr()[0]
            progress.update(1)
            # loss.item() waits for the device: only when something shows or logs it, so on a GPU
            # the host can queue the next step while this one runs.
            if not progress.disable:
                progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", p=f"{masker.rate:.2f}")
            if state.step % tc.log_every == 0:
                log({"step": state.step, "epoch": state.epoch, "loss": loss.item(), "lr": lr, "mask_rate": masker.rate})
            if tc.eval_every and state.step % tc.eval_every == 0 and run_eval():
                stop = state.stopped_early = True
                break
            if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
                save_checkpoint()
            if state.step >= local_updates:
                stop = True
                break
        else:
            state.epoch, state.batches_done = state.epoch + 1, 0
            if not tc.eval_every and run_eval():
                stop = state.stopped_early = True
            continue
        if stop and not state.stopped_early and not (tc.eval_every and state.step % tc.eval_every == 0):
            run_eval()  # max_steps reached mid-epoch: score what we have
    progress.close()
    hook.remove()

    # Back to the best weights for the extra evaluation sets and for the caller.
    unwrapped = accelerator.unwrap_model(model)
    if best_state is not None:
        unwrapped.load_state_dict(best_state, strict=False)
    extra = {}
    for name, features in setup.extra_features.items():
        loader = accelerator.prepare(_eval_loader(features, setup.tokenizer, task, tc.eval_batch_size))
        extra[name] = evaluate(model, loader, accelerator, task, weights, tc.focal_gamma)
    peak_mb, peak_kind = _peak_memory_mb(accelerator.device)
    metrics = {
        "best": state.best, "history": state.history, "extra_eval": extra, **counts,
        "train_examples": len(setup.train_features), "dev_examples": len(setup.dev_features),
        "steps": state.step, "stopped_early": state.stopped_early,
        "wall_time_s": time.perf_counter() - started, "peak_memory_mb": peak_mb, "peak_memory_kind": peak_kind,
        "world_size": accelerator.num_processes,
    }
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(out / METRICS_FILE, metrics)
        shutil.rmtree(checkpoint, ignore_errors=True)
    setup.release(unwrapped)
    if accelerator.device.type != "cpu":
        # gc + emptied device cache so a sweep's next run starts clean; on a CPU there is no
        # cache to empty and the forced gc.collect() only cost ~0.3 s per run.
        accelerator.free_memory()
    return metrics


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


def tokmask_config(setup: Setup, recipe: Recipe) -> dict:
    """The side file saved beside every adapter: enough to rebuild the base and check compatibility."""
    m = recipe.model
    return {
        "format": 1, "base_model": m.name, "gguf_file": m.gguf_file, "tokenizer": m.tokenizer, "task": m.task,
        "method": m.method, "quant_bits": m.quant_bits if m.method == "qlora" else None, "dtype": m.dtype,
        "labels": setup.labels, "max_length": recipe.data.max_length, "mask_token": setup.mask_token.to_dict(),
        "masking": dataclasses.asdict(recipe.masking), "seed": recipe.train.seed,
        "versions": package_versions(), "recipe": recipe.to_dict(),
    }


def save_run(accelerator: Accelerator, model, setup: Setup, recipe: Recipe, out: Path) -> None:
    """Adapter (or full model) + tokenizer + tokmask_config.json, written by the main process only."""
    accelerator.wait_for_everyone()
    unwrapped = accelerator.unwrap_model(model)
    kwargs = {"save_embedding_layers": False} if recipe.model.method != "full" else {}
    unwrapped.save_pretrained(out, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
                              **kwargs)
    if accelerator.is_main_process:
        setup.tokenizer.save_pretrained(out)
        write_json(out / TOKMASK_CONFIG, tokmask_config(setup, recipe))
