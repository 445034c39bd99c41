"""The run directory: what a run writes, how it is named, when it counts as finished, how it is read.

    OUT/mask_0.10/seed_0/{adapter_config.json, adapter_model.safetensors, tokenizer files,
                          tokmask_config.json, metrics.json, log.jsonl, predictions.npz}

Sweeps, the Ray executor, inference and comparison read runs through this module alone; it
imports no Accelerate, so reading a run never pulls in the training stack.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import re
import shutil
import warnings
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np

from .config import TEST_SET
from .console import TokmaskWarning
from .storage import LOCK_FILE, OWNER_FILE, atomic_write_bytes, file_digest, read_json

WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors")

TOKMASK_CONFIG = "tokmask_config.json"
ADAPTER_CONFIG = "adapter_config.json"
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.npz"
DEV_SET = "dev"
LOG_FILE = "log.jsonl"
CHECKPOINT_DIR = "checkpoint"
SCRATCH_DIR = ".saving"
"""Where a run's weights are written whole before they are moved into the run directory."""
CHECKPOINT_COPIES = (CHECKPOINT_DIR, CHECKPOINT_DIR + ".new", CHECKPOINT_DIR + ".old")
"""The checkpoint, the one being written, and the one being replaced (``checkpoints.Checkpoints.save``)."""
LEFT_BY_TRAINING = (*CHECKPOINT_COPIES, SCRATCH_DIR, LOCK_FILE, OWNER_FILE)
"""What a run in progress holds (and a kill may leave), never part of a finished run."""
PARTIAL_SUFFIX = ".partial"
RUN_NAME = re.compile(r"mask_\d+\.\d\d/seed_\d+")
VERSIONED = ("tokmask-peft", "torch", "transformers", "peft", "accelerate", "bitsandbytes")
# What a resume or a reuse need not match: where, how fast and how often a run is written.
UNFINGERPRINTED_TRAIN_KEYS = ("output_dir", "num_workers", "log_every", "compile", "robustness",
                              "robustness_conditions", "report_to",
                              "run_name", "checkpoint_every")


def package_versions() -> dict[str, str | None]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


# ---- names ----------------------------------------------------------------------------------


def adapter_name(rate: float) -> str:
    """``mask_0.10`` for rate 0.1: the name of a rate's directory and of its adapter."""
    return f"mask_{rate:.2f}"


def run_dir(out: str | Path, rate: float, seed: int) -> Path:
    """``OUT/mask_0.10/seed_0``: the rate with two decimals names the adapter too."""
    return Path(out) / adapter_name(rate) / f"seed_{seed}"


def run_dirs(out: str | Path, seed: int | None = None, warn: bool = True) -> list[Path]:
    """The finished runs of a sweep directory (weights or not: a light copy reports too), sorted by path;
    one seed's only if ``seed`` is given.

    Only ``mask_R/seed_N`` directories whose config says rate R and seed N count. Anything else under
    ``mask_*`` (a ``.partial`` still training, a ``seed_0.bak`` copy, a run without ``metrics.json``, a
    run filed under another rate or seed) is left out, and named in a warning unless ``warn`` is off.
    Runs of another recipe would change the table and its verdicts: they are refused, naming the keys.
    """
    found: dict[Path, dict] = {}
    left_out = []
    for path in sorted(p for p in Path(out).glob("mask_*/*") if p.is_dir()):
        why, config = not_a_run(path)
        if why:
            left_out.append(f"{path} ({why})")
        elif seed is None or path.name == f"seed_{seed}":
            found[path] = config
    if left_out and warn:
        warnings.warn(f"left out of {out}: " + "; ".join(left_out), TokmaskWarning, stacklevel=2)
    check_one_recipe(found)
    return list(found)


def not_a_run(path: Path) -> tuple[str | None, dict | None]:
    """(why ``path`` under a sweep directory is not a finished run it counts, or None; its config if read)."""
    match = RUN_NAME.fullmatch(f"{path.parent.name}/{path.name}")
    if path.name.endswith(PARTIAL_SUFFIX):
        return "not finished", None
    if not match:
        return "not named mask_R/seed_N", None
    if not has_results(path):
        return (f"no {METRICS_FILE}" if (path / TOKMASK_CONFIG).is_file() else f"no {TOKMASK_CONFIG}"), None
    config = read_run_config(path)
    if (adapter_name(config["masking"]["rate"]), f"seed_{config['seed']}") != (path.parent.name, path.name):
        return (f"its config says rate {config['masking']['rate']:g}, seed {config['seed']}: filed under "
                "another run's name"), config
    return None, config


def check_one_recipe(configs: dict[Path, dict]) -> None:
    """Refuse runs (path → run config) that differ in more than masking rate and seed: one table, one recipe."""
    if not configs:
        return
    (first_run, first), *others = ((run, recipe_identity(c.get("recipe", {}))) for run, c in configs.items())
    for run, identity in others:
        diff = fingerprint_diff(first, identity, shared_keys_only=True)
        if diff:
            raise ValueError(f"{run} was trained with another recipe than {first_run} (differs in {diff}): one "
                             "sweep directory holds one recipe's runs; move it out, or report it as its own sweep")


def recipe_identity(recipe: dict) -> dict:
    """A saved recipe less what may differ between the runs of one sweep: rate, seed, and what
    :func:`run_fingerprint` leaves out."""
    d = run_fingerprint_of(recipe)
    d["masking"] = {k: v for k, v in d.get("masking", {}).items() if k != "rate"}
    d["train"] = {k: v for k, v in d.get("train", {}).items() if k != "seed"}
    return d


def partial_dir(final: Path) -> Path:
    """Where a run trains until it is complete (``seed_0.partial``), so a crash never looks finished."""
    return final.with_name(final.name + PARTIAL_SUFFIX)


def promote(partial: Path, final: Path) -> None:
    """Rename a complete ``.partial`` run to its final name (replacing a stale one), without what a kill
    may have left in it: a checkpoint, the weights' scratch folder, temporary files, the writer's lock."""
    tidy(partial)
    if final.exists():
        shutil.rmtree(final)
    partial.rename(final)


def tidy(run: Path) -> None:
    """Remove from a finished run what only a run in progress needs."""
    for path in run.iterdir():
        if path.name in LEFT_BY_TRAINING or (path.name.startswith(".") and path.name.endswith(".tmp")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()


def has_results(path: Path) -> bool:
    """Both JSON files are there (reading them names the file if either is damaged)."""
    return (path / METRICS_FILE).is_file() and (path / TOKMASK_CONFIG).is_file()


def is_complete(path: Path) -> bool:
    """A finished run: both JSON files parse and every weight file it recorded is there, whole."""
    return incomplete_because(path) is None


def incomplete_because(path: Path) -> str | None:
    """Why the run in ``path`` is not finished (a file missing, damaged or cut short), or None if it is."""
    try:
        read_metrics(path)
        config = read_run_config(path)
    except (OSError, ValueError) as e:
        return str(e)
    problems = weight_problems(path, config, digests=False)
    return "; ".join(problems) if problems else None


# ---- the weights a run holds -------------------------------------------------------------------


def weight_record(path: Path) -> dict[str, dict]:
    """Size and SHA-256 of each weight file in ``path``, for ``tokmask_config.json``."""
    return {name: {"bytes": (path / name).stat().st_size, "sha256": file_digest(path / name)}
            for name in sorted(p.name for p in path.iterdir()) if _is_weight_file(name)}


def _is_weight_file(name: str) -> bool:
    return name.endswith((".safetensors", ".safetensors.index.json", ".onnx"))  # .onnx: a `tokmask export`


def weight_problems(run: Path, config: dict, digests: bool = True) -> list[str]:
    """What is wrong with a run's weight files: missing, truncated, or (``digests``) not the bytes
    written at training time. Runs saved before the record existed get the existence check only."""
    record = config.get("weights")
    if record is None:
        present = [name for name in WEIGHT_FILES if (run / name).is_file()]
        return [] if present else [f"{run / ' or '.join(WEIGHT_FILES)} is missing"]
    problems = []
    for name, expected in record.items():
        path = run / name
        if not path.is_file():
            problems.append(f"{path} is missing")
        elif path.stat().st_size != expected["bytes"]:
            problems.append(f"{path} holds {path.stat().st_size} bytes, {expected['bytes']} were written: "
                            "truncated or replaced")
        elif digests and file_digest(path) != expected["sha256"]:
            problems.append(f"{path} is corrupted: its SHA-256 differs from the one recorded at training")
    return problems


MEANING_KEYS = ("task", "labels", "mask_token", "method")
"""What gives a run's weights their meaning: label i is output i, the mask id a trained row. (The base's
path is not here: a base moved elsewhere is checked by its identity instead.)"""
LATER_MEANING_KEYS = ("problem_type", "thresholds")
"""Bound too where a config holds them (runs saved before they existed do not): deleting one changes the
digest as editing it does."""


def meaning_digest(config: dict) -> str:
    """SHA-256 of the :data:`MEANING_KEYS` of a run config, recorded beside them when the weights are saved."""
    record = {key: config.get(key) for key in MEANING_KEYS}
    record.update({key: config[key] for key in LATER_MEANING_KEYS if key in config})
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def with_meaning(config: dict) -> dict:
    """``config`` with the digest that binds its labels, task, mask token and method to its weights."""
    return {**config, "meaning_sha256": meaning_digest(config)}


def verify_weights(run: Path, config: dict) -> None:
    """Refuse a run whose weights are missing, truncated or corrupted, naming each file, or whose config
    no longer says what its weights mean (labels, task, mask token or method edited after training)."""
    recorded = config.get("meaning_sha256")
    if recorded is not None and recorded != meaning_digest(config):
        raise ValueError(f"{Path(run) / TOKMASK_CONFIG}: its {', '.join(MEANING_KEYS)} are not those the weights "
                         "were saved with (the file was edited?); restore the file or retrain the run")
    adapter_config = Path(run) / ADAPTER_CONFIG
    if config.get("method") != "full" and adapter_config.is_file():
        settings = read_json(adapter_config, "adapter config")  # PEFT's own error would not name the file
        if not isinstance(settings, dict) or "peft_type" not in settings:
            raise ValueError(f"{adapter_config}: not a PEFT adapter config (no peft_type); restore it or retrain")
    problems = weight_problems(Path(run), config)
    if problems:
        raise ValueError("; ".join(problems) + ". Retrain the run or restore the file from a copy")


# ---- what a run records -----------------------------------------------------------------------


def run_config(recipe, labels: list[str], mask_token) -> dict:
    """``tokmask_config.json``: enough to rebuild the base and check an adapter's compatibility."""
    m = recipe.model
    return {
        "format": 1, "base_model": m.name, "gguf_file": m.gguf_file, "tokenizer": m.tokenizer, "task": m.task,
        "problem_type": m.problem_type, "text_pair": bool(recipe.data.text_pair_column),
        "method": m.method, "quant_bits": m.quant_bits if m.method == "qlora" else None, "dtype": m.dtype,
        "labels": labels, "max_length": recipe.data.max_length, "mask_token": mask_token.to_dict(),
        "masking": dataclasses.asdict(recipe.masking), "seed": recipe.train.seed,
        "versions": package_versions(), "recipe": recipe.to_dict(),
    }


def read_run_config(run: str | Path) -> dict:
    path = Path(run) / TOKMASK_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run} is not a tokmask_peft run directory")
    return read_json(path, "run config")


def held_out_names(recipe: dict) -> list[str]:
    """The held-out sets a saved recipe scored at the end (``extra_eval`` and the carved ``test``)."""
    data = recipe["data"]
    return sorted(data.get("extra_eval", {})) + ([TEST_SET] if data.get("test_from_train") else [])


def read_metrics(run: str | Path) -> dict:
    return read_json(Path(run) / METRICS_FILE, "run's metrics file")


# ---- which recipe trained a run -------------------------------------------------------------


def run_fingerprint(recipe) -> dict:
    """What must match for a checkpoint to be resumed into (everything but where and how fast it is written)."""
    return run_fingerprint_of(recipe.to_dict())


def run_fingerprint_of(recipe: dict) -> dict:
    """:func:`run_fingerprint` of a recipe as a dict (as ``tokmask_config.json`` saves it)."""
    d = {k: dict(v) for k, v in recipe.items() if k != "sweep"}
    d["train"] = {k: v for k, v in d.get("train", {}).items() if k not in UNFINGERPRINTED_TRAIN_KEYS}
    return d


def fingerprint_diff(saved: dict, fingerprint: dict, shared_keys_only: bool = False) -> list[str]:
    """``section.key`` names where a saved fingerprint (read from JSON) differs from ``fingerprint``;
    ``shared_keys_only`` skips keys one side lacks (a run saved before a recipe field existed)."""
    current = json.loads(json.dumps(fingerprint, default=str))
    pick = (lambda a, b: a & b) if shared_keys_only else (lambda a, b: a | b)
    return sorted(f"{s}.{k}" for s in pick(current.keys(), saved.keys())
                  for k in pick(current.get(s, {}).keys(), saved.get(s, {}).keys())
                  if saved.get(s, {}).get(k) != current.get(s, {}).get(k))


def refuse_other_recipe(run: Path, recipe, advice: str) -> None:
    """A finished run in ``run`` is reused only if ``recipe`` trained it; else name the keys that differ."""
    if not (run / TOKMASK_CONFIG).is_file():
        return
    saved = read_run_config(run).get("recipe", {})
    diff = fingerprint_diff(saved, run_fingerprint(recipe), shared_keys_only=True)
    if diff:
        raise ValueError(f"{run} was trained with another recipe (differs in {diff}); {advice}")


# ---- predictions.npz: what a run predicted on each evaluation set ------------------------------------


@dataclasses.dataclass
class Predictions:
    """One run's predictions on one evaluation set: a row per scored unit (a text, or a labelled word)."""

    example: np.ndarray
    """Index of the example (text or sentence) each row belongs to."""
    gold: np.ndarray
    pred: np.ndarray
    probs: np.ndarray | None = None


def load_predictions(path: Path) -> dict[str, Predictions]:
    """``predictions.npz`` of one run: every evaluation set it was scored on, by name; a damaged or cut
    file is an error naming it."""
    try:
        with np.load(path) as data:
            names = sorted({key.split("/")[0] for key in data.files})
            return {name: Predictions(data[f"{name}/example"], data[f"{name}/gold"], data[f"{name}/pred"],
                                      data[f"{name}/probs"] if f"{name}/probs" in data.files else None)
                    for name in names}
    except (zipfile.BadZipFile, ValueError, KeyError, EOFError, OSError) as e:
        raise ValueError(f"{path} is damaged or cut short ({type(e).__name__}: {e}); retrain the run, or delete the "
                         "file to judge it from its best metrics alone") from None


def save_predictions(path: Path, sets: dict[str, Predictions]) -> None:
    """Write every set's predictions into one compressed ``.npz`` (probabilities as float16)."""
    arrays = {}
    for name, p in sets.items():
        if "/" in name:
            raise ValueError(f"evaluation set name {name!r} may not contain '/'")
        kind = np.float32 if np.issubdtype(p.gold.dtype, np.floating) else np.int16  # regression: scores
        arrays.update({f"{name}/example": p.example.astype(np.int32), f"{name}/gold": p.gold.astype(kind),
                       f"{name}/pred": p.pred.astype(kind)})
        if p.probs is not None:
            arrays[f"{name}/probs"] = p.probs.astype(np.float16)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    atomic_write_bytes(path, buffer.getvalue())
