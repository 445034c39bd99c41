"""Inference: load the base once, attach rate adapters by name, switch, predict, merge.

Three parts: loading (a run, a sweep, picking the rate best on dev) is :meth:`Classifier.from_run`
and :meth:`Classifier.from_sweep`; holding adapters is :class:`~tokmask_peft.adapters.AdapterSet`
(``None`` for a fully fine-tuned model); predicting (tokenise, batch, test-time masking,
logits → labels) is the functions at the end. ``tokmask_config.json`` beside each adapter says
which base, task, labels and mask token it was trained with; a mismatch is refused rather than
silently producing a random head.
"""
from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Sequence

import torch

from .adapters import AdapterSet
from .config import ModelConfig
from .console import TokmaskWarning
from .data import Example, encode, padding_collator, was_truncated
from .masking import MaskToken, TokenMasker
from .modeling import base_identity, classifier_on_body, classifier_tokenizer, load_base
from .problems import decide, scores
from .metrics import METRICS
from .reporting import collect, summarise, sweep_metric
from .runs import (METRICS_FILE, TOKMASK_CONFIG, adapter_name, read_run_config, run_dirs, verify_weights, weight_record,
                   with_meaning)
from .storage import write_json

# What adapters on one base must share; task and labels may differ (each task adapter brings its head).
BASE_KEYS = ("base_model", "gguf_file", "method", "quant_bits", "mask_token")


def model_config_of(run_config: dict) -> ModelConfig:
    """The base to load: the recipe's model section, at the config's top-level ``base_model`` (the key
    a user edits to move a run to where its base now lives)."""
    return ModelConfig(**{**run_config["recipe"]["model"], "name": run_config["base_model"],
                          "gguf_file": run_config.get("gguf_file")})


def check_compatible(reference: dict, other: dict, where: str) -> None:
    """Refuse an adapter trained on another base (or tokenizer, or quantisation), naming both."""
    for key in BASE_KEYS:
        if reference.get(key) != other.get(key):
            raise ValueError(f"adapter {where} was trained with {key}={other.get(key)!r}, but this predictor's "
                             f"base has {key}={reference.get(key)!r}; load it on a matching base")
    mine, theirs = reference.get("base_identity"), other.get("base_identity")
    if mine and theirs and mine != theirs:
        raise ValueError(f"adapter {where} was trained on other weights of {other['base_model']} (base identity "
                         f"{theirs}) than this predictor's base (identity {mine}); load it on its own base")


def check_base(run_dir: Path, config: dict, cfg: ModelConfig) -> None:
    """Refuse a base whose weights are not those the run was trained on (cheap: ~1 MiB read)."""
    recorded = config.get("base_identity")
    if not recorded:
        return  # trained before identities were recorded, or on a base with no local files
    current = base_identity(cfg)
    if current is not None and current != recorded:
        raise ValueError(f"{run_dir} was trained on a base whose weights have identity {recorded}, but "
                         f"{cfg.name} now holds other weights (identity {current}): an adapter on the wrong "
                         "base predicts wrongly without a word. Point base_model in "
                         f"{run_dir / TOKMASK_CONFIG} at the base it was trained on")


def check_finished(run_dir: Path, config: dict) -> None:
    if "merged_from" not in config and not (run_dir / METRICS_FILE).is_file():
        warnings.warn(f"{run_dir} has no {METRICS_FILE}: its training did not finish, and these are the best "
                      "weights it had saved when it stopped", TokmaskWarning, stacklevel=3)


def default_name(config: dict) -> str:
    return adapter_name(config["masking"]["rate"])


class Classifier:
    """One base model, any number of adapters (rates of a sweep, or tasks with their own heads and
    labels); predict with the active one.

    A fully fine-tuned model is a Classifier without an adapter set (``adapter_set is None``).

    Usage::

        clf = Classifier.from_sweep("runs/sa", seed=0)   # every mask_*/seed_0 adapter; the best on dev active
        clf.use(0.1)                                      # or clf.use("mask_0.10")
        clf.predict(["que buena pelicula", "so boring"])
        clf.add_adapter("runs/lid/mask_0.10/seed_0", name="lid")   # another task, same base copy
        clf.use("lid"); clf.predict([["que", "buena", "movie"]])
    """

    def __init__(self, model, tokenizer, run_config: dict, device: torch.device, name: str,
                 adapter_set: AdapterSet | None = None):
        self._model, self.tokenizer, self.config, self.device = model, tokenizer, run_config, device
        self.name = name  # the first (or only) model's name: mask_0.10
        self.adapter_set = adapter_set
        self.best: str | None = None  # from_sweep: the adapter of the rate best on dev

    @property
    def model(self):
        """The model that runs the active adapter (task adapters each have their own head model)."""
        return self.adapter_set.model if self.adapter_set else self._model

    @property
    def task(self) -> str:
        return self.active_config["task"]

    @property
    def labels(self) -> list[str]:
        return self.active_config["labels"]

    @property
    def problem(self) -> str:
        """single_label, multi_label or regression (runs saved before problem types: single_label)."""
        return self.active_config.get("problem_type", "single_label")

    # ---- loading --------------------------------------------------------------------------------

    @classmethod
    def from_run(cls, run_dir: str | Path, name: str | None = None, device: str | torch.device | None = None):
        """Load the base named in ``run_dir``'s config and attach its adapter (or its full model)."""
        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        verify_weights(run_dir, config)
        check_finished(run_dir, config)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = classifier_tokenizer(run_dir)  # holds an added <mask> token, if any
        name = name or default_name(config)
        adapter_set = None
        if config["method"] == "full":
            from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

            auto = AutoModelForTokenClassification if config["task"] == "token" else AutoModelForSequenceClassification
            model = auto.from_pretrained(run_dir)
        else:
            cfg = model_config_of(config)
            check_base(run_dir, config, cfg)
            base = load_base(cfg, config["labels"], tokenizer, config["seed"], device)
            adapter_set = AdapterSet.load(base, run_dir, name, config)
            model = adapter_set.model
        if config["method"] != "qlora":
            model.to(device)
        model.eval()
        return cls(model, tokenizer, config, device, name, adapter_set)

    @classmethod
    def from_sweep(cls, sweep_dir: str | Path, seed: int = 0, device: str | torch.device | None = None,
                   metric: str | None = None, rate: float | None = None):
        """Load the base once and attach the seed-``seed`` adapter of every rate in a sweep; the
        active one is ``rate``, else the rate the sweep's table calls best on dev by ``metric``
        (mean over seeds). A sweep of fully fine-tuned models loads that one rate's model only."""
        runs = {default_name(read_run_config(p)): p for p in run_dirs(sweep_dir, seed)}
        if not runs:
            raise FileNotFoundError(f"no finished runs {sweep_dir}/mask_*/seed_{seed}")
        best = best_rate_name(sweep_dir, runs, metric)
        wanted = best if rate is None else adapter_name(rate)
        if wanted not in runs:
            raise KeyError(f"no finished run for rate {rate} under {sweep_dir} (seed {seed}); rates: {list(runs)}")
        if read_run_config(runs[wanted])["method"] == "full":
            clf = cls.from_run(runs[wanted], device=device)  # one whole model per rate: load only this one
        else:
            first, *others = runs.values()
            clf = cls.from_run(first, device=device)
            for run in others:
                clf.add_adapter(run)
            clf.use(wanted)
        clf.best = best
        return clf

    # ---- adapters -------------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return self.adapter_set.names if self.adapter_set else []

    @property
    def active(self) -> str | None:
        """The active adapter's name; for a fully fine-tuned model, its run's (``mask_0.10``)."""
        return self.adapter_set.active if self.adapter_set else self.name

    @property
    def active_config(self) -> dict:
        return self.adapter_set.configs[self.active] if self.adapter_set else self.config

    def add_adapter(self, run_dir: str | Path, name: str | None = None) -> str:
        """Attach another run's adapter to the same base copy; returns its name (default ``mask_0.10``).

        The run may be of another task or label set (a token tagger beside a sentiment adapter): it
        brings its own head, and the base is shared, not copied. It must have been trained on this
        base, tokenizer and quantisation."""
        if self.adapter_set is None:
            raise ValueError("this classifier holds a fully fine-tuned model: it has no base to share")
        config = read_run_config(run_dir)
        check_compatible(self.config, config, str(run_dir))
        verify_weights(Path(run_dir), config)
        name = name or default_name(config)
        self.adapter_set.add(run_dir, name, config, lambda: classifier_on_body(
            self.adapter_set.model, model_config_of(config), config["labels"], self.tokenizer, config["seed"]))
        return name

    def use(self, name_or_rate: str | float) -> None:
        """Make an adapter active, by name or by masking rate (0.1 → ``mask_0.10``)."""
        name = adapter_name(name_or_rate) if isinstance(name_or_rate, (int, float)) else name_or_rate
        if self.adapter_set is None:
            raise KeyError(f"no adapter {name!r}: this classifier holds one fully fine-tuned model")
        self.adapter_set.use(name)

    # ---- prediction -----------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, texts: Sequence[str | list[str]], batch_size: int = 32, tta: int = 0,
               tta_rate: float | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Logits per text: (num_labels,) for sequence tasks, (num_words, num_labels) for token tasks.

        ``tta=K`` returns the logits of the mean score over K masked copies at ``tta_rate`` (default: the
        adapter's training rate), a test-time masking ensemble: log of the mean softmax, logit of the mean
        sigmoid (multi-label), the mean output (regression).
        """
        return [row for row, _ in self._scored(texts, batch_size, tta, tta_rate, seed)]

    def predict(self, texts: Sequence[str | list[str] | tuple[str, str] | Example], batch_size: int = 32,
                tta: int = 0, tta_rate: float | None = None) -> list[dict]:
        """Per text, what the adapter's problem type answers (see :func:`to_result`: a label with class
        probabilities; every label above its threshold with sigmoid scores; or a score), and
        ``truncated``: whether ``max_length`` cut the text short (token tasks give one label per input
        word; words past ``max_length`` get ``None``). A sentence pair is a ``(text, text)`` tuple. Texts
        may be the ``Example``s of any reader (``data.read_examples``, ``predict_files.read_rows``)."""
        config = self.active_config
        return [{**to_result(row, self.labels, self.task, self.problem, config.get("thresholds")), "truncated": cut}
                for row, cut in self._scored(texts, batch_size, tta, tta_rate)]

    def _scored(self, texts, batch_size: int, tta: int, tta_rate: float | None, seed: int = 0):
        """(logits, truncated) per text, in order."""
        yield from self.forward(*self.encoded(texts), batch_size, tta, tta_rate, seed)

    def encoded(self, texts, config: dict | None = None) -> tuple[list[Example], list[dict]]:
        """The inputs as examples and features, for the active adapter or the one ``config`` describes (a
        server tokenises a request for its adapter while another one's batch runs)."""
        config = config or self.active_config
        examples = check_pairs(as_examples(texts, config["task"]), config)
        return examples, encode(examples, self.tokenizer, config["task"], None, config["max_length"])

    @torch.no_grad()  # (a generator: torch keeps grad off at every resumption) predict and serve pass here
    def forward(self, examples: list[Example], features: list[dict], batch_size: int = 32, tta: int = 0,
                tta_rate: float | None = None, seed: int = 0):
        """(logits, truncated) per encoded input, in order, with the active adapter. Batches are cut from the
        inputs sorted by length, so little padding is computed (LinCE tweets, MiniLM: ~1.35x the texts/s).
        Without autograd, so unmerged LoRA layers take the fused forward (~1.09x at batch 32 on CPU)."""
        if batch_size < 1 or tta < 0:
            raise ValueError(f"batch_size must be >= 1 and tta >= 0, got {batch_size} and {tta}")
        masker = tta_masker(self.tokenizer, self.active_config, tta_rate, seed) if tta else None
        collate = padding_collator(self.tokenizer, self.task, word_ids=masker is not None and masker.unit != "token")
        order = sorted(range(len(features)), key=lambda i: len(features[i]["input_ids"]))
        out: list = [None] * len(features)
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            batch = {k: v.to(self.device) for k, v in collate([features[i] for i in chosen]).items()}
            logits = batch_logits(self.model, batch, masker, tta, self.problem)
            if not torch.isfinite(logits).all():
                bad = [i for i, row in zip(chosen, logits) if not torch.isfinite(row).all()]
                raise ValueError(f"{self.active} gave non-finite scores (NaN or inf) for inputs {bad[:10]}: its "
                                 "weights are damaged or overflow in this dtype")
            for row, i in zip(logits, chosen):
                feature, example = features[i], examples[i]
                row = row if self.task == "sequence" else word_logits(row, feature["word_ids"], len(example.text))
                out[i] = (row, was_truncated(feature, example))
        yield from out


def best_rate_name(sweep_dir: str | Path, runs: dict[str, Path], metric: str | None = None) -> str:
    """The adapter name of the rate the sweep's table calls best by ``metric`` (mean over seeds; default:
    the sweep's own selection metric)."""
    metric = metric or sweep_metric(sweep_dir)
    rows = [row for row in collect(sweep_dir) if adapter_name(row["rate"]) in runs]
    best = [entry for entry in summarise(rows, metric) if entry.get("best")] if metric in METRICS else []
    if not best or metric not in best[0]:
        raise ValueError(f"metric {metric!r} is not among the sweep's dev metrics")
    return adapter_name(best[0]["rate"])


# ---- prediction, as functions of a batch --------------------------------------------------------


def as_examples(texts: Sequence, task: str) -> list[Example]:
    """Token tasks take lists of words, or strings split on whitespace; sequence tasks a string or a
    ``(text, text)`` pair; Examples (any reader's) are used as they are."""
    out = []
    for i, t in enumerate(texts):
        if isinstance(t, Example):
            out.append(t)
        elif task == "sequence" and isinstance(t, (tuple, list)):
            if len(t) != 2 or not all(isinstance(x, str) for x in t):
                raise ValueError(f"input[{i}]: a sentence pair is two strings, got {t!r:.80}")
            out.append(Example(t[0], None, f"input[{i}]", t[1]))
        else:
            out.append(Example(t if task == "sequence" or isinstance(t, list) else t.split(), None, f"input[{i}]"))
    return out


def check_pairs(examples: list[Example], config: dict) -> list[Example]:
    """Refuse a single text for an adapter trained on sentence pairs, and a pair for one trained on texts."""
    paired = bool(config.get("text_pair"))
    wrong = next((ex for ex in examples if (ex.pair is not None) != paired), None)
    if wrong is not None:
        raise ValueError(f"{wrong.source}: this adapter was trained on sentence pairs: give each input as two texts"
                         if paired else
                         f"{wrong.source}: a sentence pair, but this adapter was trained on single texts")
    return examples


def tta_masker(tokenizer, config: dict, rate: float | None, seed: int) -> TokenMasker:
    """The masker of test-time masking: the adapter's own mask token, unit and replacement (runs saved
    before strategies existed: token masking), at its training rate by default."""
    masking = config["masking"]
    rate = masking["rate"] if rate is None else rate
    if masking.get("replace") == "delete" and config["task"] == "token":
        raise ValueError("test-time masking with replace 'delete' would shift a token task's words off their "
                         "outputs: use tta only with adapters that replace")
    strategy = {"unit": masking.get("unit", "token"), "replace": masking.get("replace", "mask"),
                "span_mean": masking.get("span_mean", 3.0)}
    return TokenMasker.for_tokenizer(tokenizer, MaskToken.from_dict(config["mask_token"]), rate, seed, **strategy)


def batch_logits(model, batch: dict, masker: TokenMasker | None, copies: int,
                 problem: str = "single_label") -> torch.Tensor:
    """Float logits on the CPU; with a masker, the logits whose scores are the mean over ``copies`` masked
    copies' scores (log of the mean softmax; the logit of the mean sigmoid; the mean regression output)."""
    word_ids = batch.pop("word_ids", None)  # word and span units draw by word; the model takes none
    if masker is None:
        return model(**batch).logits.float().cpu()
    mean = sum(scores(problem, model(**masker.apply({**batch, "word_ids": word_ids})).logits).cpu()
               for _ in range(copies)) / copies
    if problem == "multi_label":
        return torch.logit(mean, eps=1e-7)
    return mean[..., None] if problem == "regression" else mean.log()


def word_logits(row: torch.Tensor, word_ids: list, n_words: int) -> torch.Tensor:
    """Token logits (right-padded) → one row per word (its first sub-word); NaN rows for truncated words."""
    row = row[:len(word_ids)]
    out = torch.full((n_words, row.shape[-1]), float("nan"))
    seen = set()
    for position, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            out[w] = row[position]
    return out


def to_result(logits: torch.Tensor, labels: list[str], task: str, problem: str = "single_label",
              thresholds: Sequence[float] | None = None) -> dict:
    """``{"label", "probs"}`` (single-label); ``{"labels": [every label at or above its threshold], "scores":
    {label: sigmoid}}`` (multi-label); ``{"score"}`` (regression); ``{"labels": [one per word]}`` (token)."""
    if problem == "regression":
        return {"score": float(logits[0])}
    if problem == "multi_label":
        probs = scores(problem, logits)
        on = decide(problem, probs, thresholds)
        return {"labels": [lab for lab, flag in zip(labels, on) if flag],
                "scores": {lab: round(float(p), 6) for lab, p in zip(labels, probs)}}
    probs = logits.softmax(-1)
    if task == "sequence":
        return {"label": labels[int(probs.argmax())],
                "probs": {lab: round(float(p), 6) for lab, p in zip(labels, probs)}}
    return {"labels": [labels[int(p.argmax())] if not torch.isnan(p).any() else None for p in probs]}


# ---- export ---------------------------------------------------------------------------------------


def merge_run(run_dir: str | Path, output_dir: str | Path) -> Path:
    """Export ``run_dir``'s adapter merged into a full-precision base as a standalone model.

    QLoRA adapters are merged into the unquantised base (merging into 4-bit weights would
    round the update away). The result loads with plain ``AutoModelFor*.from_pretrained`` and
    with :meth:`Classifier.from_run`.
    """
    from peft import PeftModel

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config = read_run_config(run_dir)
    if config["method"] == "full":
        raise ValueError(f"{run_dir} is a fully fine-tuned model already: nothing to merge")
    if output_dir.resolve() == run_dir.resolve() or run_dir.resolve() in output_dir.resolve().parents:
        raise ValueError(f"merge output {output_dir} is the run {run_dir} or inside it: the merged model would "
                         "overwrite the adapter's files; choose a directory outside the run")
    verify_weights(run_dir, config)
    tokenizer = classifier_tokenizer(run_dir)
    cfg = dataclasses.replace(model_config_of(config), method="lora")
    check_base(run_dir, config, cfg)
    base = load_base(cfg, config["labels"], tokenizer, config["seed"])
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_json(output_dir / TOKMASK_CONFIG, with_meaning({**config, "method": "full", "merged_from": str(run_dir),
                                                          "weights": weight_record(output_dir)}))
    return output_dir
