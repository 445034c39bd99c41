"""Inference: load the base once, attach rate adapters by name, switch, predict, merge.

Adapters are loaded through PEFT only (``PeftModel.from_pretrained`` / ``load_adapter`` /
``set_adapter``); ``tokmask_config.json`` beside each adapter says which base, task, labels and
mask token it was trained with, and a mismatch is refused rather than silently producing a
random head.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Sequence

import torch

from .config import ModelConfig
from .data import Example, encode, padding_collator
from .fused_lora import fuse_lora_inference
from .modeling import classifier_tokenizer, load_base
from .training import TOKMASK_CONFIG

COMPATIBILITY_KEYS = ("base_model", "gguf_file", "task", "labels", "method", "quant_bits")


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / TOKMASK_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {run_dir} is not a tokmask_peft run directory")
    return json.loads(path.read_text())


def adapter_name(rate: float) -> str:
    """``mask_0.10`` for rate 0.1: the name a sweep gives the run directory and the adapter."""
    return f"mask_{rate:.2f}"


def model_config_of(run_config: dict) -> ModelConfig:
    return ModelConfig(**run_config["recipe"]["model"])


def check_compatible(reference: dict, other: dict, where: str) -> None:
    for key in COMPATIBILITY_KEYS:
        if reference.get(key) != other.get(key):
            raise ValueError(f"adapter {where} was trained with {key}={other.get(key)!r}, but this predictor's "
                             f"base has {key}={reference.get(key)!r}; load it on a matching base")


class Classifier:
    """One base model, any number of rate adapters; predict with the active one.

    Usage::

        clf = Classifier.from_sweep("runs/sa", seed=0)   # every mask_*/seed_0 adapter; the best on dev active
        clf.use(0.1)                                      # or clf.use("mask_0.10")
        clf.predict(["que buena pelicula", "so boring"])
    """

    def __init__(self, model, tokenizer, run_config: dict, device: torch.device):
        self.model, self.tokenizer, self.config, self.device = model, tokenizer, run_config, device
        self.labels: list[str] = run_config["labels"]
        self.task: str = run_config["task"]
        self.collate = padding_collator(tokenizer, self.task)
        self._names: dict[str, str] = {}  # public adapter name -> PEFT adapter name
        self._configs: dict[str, dict] = {}  # public adapter name -> its tokmask_config.json
        self._switches: dict[str, list[tuple]] = {}  # PEFT adapter name -> recorded active-adapter state
        self.best: str | None = None  # from_sweep: the adapter of the rate best on dev
        self._whole_model: str | None = None  # a fully fine-tuned model's run name
        fuse_lora_inference(model)  # unmerged adapters predict at (near) merged speed

    @classmethod
    def from_run(cls, run_dir: str | Path, name: str | None = None, device: str | torch.device | None = None):
        """Load the base named in ``run_dir``'s config and attach its adapter (or its full model)."""
        from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

        run_dir = Path(run_dir)
        config = read_run_config(run_dir)
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        tokenizer = classifier_tokenizer(run_dir)  # holds an added <mask> token, if any
        if config["method"] == "full":
            auto = AutoModelForTokenClassification if config["task"] == "token" else AutoModelForSequenceClassification
            model = auto.from_pretrained(run_dir)
        else:
            from peft import PeftModel

            base = load_base(model_config_of(config), config["labels"], tokenizer, config["seed"], device)
            name = name or _default_name(config)
            model = PeftModel.from_pretrained(base, run_dir, adapter_name=peft_name(name))
        if config["method"] != "qlora":
            model.to(device)
        model.eval()
        clf = cls(model, tokenizer, config, device)
        if config["method"] != "full":
            clf._names[name] = peft_name(name)
            clf._configs[name] = config
            clf._record_switches()
        else:
            clf._whole_model = name or _default_name(config)
        return clf

    @classmethod
    def from_sweep(cls, sweep_dir: str | Path, seed: int = 0, device: str | torch.device | None = None,
                   metric: str = "weighted_f1", rate: float | None = None):
        """Load the base once and attach the seed-``seed`` adapter of every rate in a sweep; the
        active one is ``rate``, else the rate the sweep's table calls best on dev by ``metric``
        (mean over seeds). A sweep of fully fine-tuned models loads that one rate's model only."""
        from .sweeps import collect, summarise

        runs = {adapter_name(read_run_config(p)["masking"]["rate"]): p
                for p in sorted(Path(sweep_dir).glob(f"mask_*/seed_{seed}")) if (p / TOKMASK_CONFIG).is_file()}
        if not runs:
            raise FileNotFoundError(f"no finished runs {sweep_dir}/mask_*/seed_{seed}")
        rows = [row for row in collect(sweep_dir) if adapter_name(row["rate"]) in runs]
        best = [entry for entry in summarise(rows, metric) if entry.get("best")]
        if not best or metric not in best[0]:
            raise ValueError(f"metric {metric!r} is not among the sweep's dev metrics")
        best_name = adapter_name(best[0]["rate"])
        wanted = best_name if rate is None else adapter_name(rate)
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
        clf.best = best_name
        return clf

    # ---- adapters -----------------------------------------------------------------------------

    @property
    def adapters(self) -> list[str]:
        return list(self._names)

    @property
    def active(self) -> str | None:
        """The active adapter's name; for a fully fine-tuned model, its run's (``mask_0.10``)."""
        if not self._names:
            return self._whole_model
        current = getattr(self.model, "active_adapter", None)
        return next((public for public, internal in self._names.items() if internal == current), None)

    def add_adapter(self, run_dir: str | Path, name: str | None = None) -> str:
        """Attach another run's adapter to the same base; returns its name (default ``mask_0.10``)."""
        if not self.adapters:
            raise ValueError("this classifier holds a fully fine-tuned model: it has no base to share")
        config = read_run_config(run_dir)
        check_compatible(self.config, config, str(run_dir))
        name = name or _default_name(config)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; pass another name")
        self.model.load_adapter(str(run_dir), adapter_name=peft_name(name))
        fuse_lora_inference(self.model)  # the new adapter may wrap modules the first did not
        self._names[name] = peft_name(name)
        self._configs[name] = config
        self._record_switches()  # it may also have added modules: record every adapter afresh
        self.model.eval()
        return name

    def use(self, name_or_rate: str | float) -> None:
        """Make an adapter active, by name or by masking rate (0.1 → ``mask_0.10``)."""
        name = adapter_name(name_or_rate) if isinstance(name_or_rate, (int, float)) else name_or_rate
        if name not in self.adapters:
            raise KeyError(f"no adapter {name!r}; loaded: {self.adapters}")
        self._replay(self._names[name])  # recorded when the adapter was loaded

    def _replay(self, internal: str) -> None:
        for module, attr, value in self._switches[internal]:
            setattr(module, attr, copy.copy(value))

    def _record_switches(self) -> None:
        """Record, per adapter, the state PEFT's ``set_adapter`` leaves; ``use`` replays it.

        ``set_adapter`` walks the module tree and resets requires_grad on every adapter of every
        layer: ~21 ms on a 30-layer model with 6 adapters. In inference mode it leaves all of them
        frozen, so what differs between adapters is only each module's active-adapter attribute.
        Recording happens when adapters are loaded, so every switch is a replay (~0.3 ms).
        """
        active = getattr(self.model, "active_adapter", None)
        self._switches.clear()
        for internal in self._names.values():
            self.model.set_adapter(internal, inference_mode=True)
            self._switches[internal] = [(module, attr, copy.copy(vars(module)[attr]))
                                        for module in self.model.modules()
                                        for attr in ("_active_adapter", "active_adapter") if attr in vars(module)]
        if active in self._switches:
            self._replay(active)

    # ---- prediction ---------------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, texts: Sequence[str | list[str]], batch_size: int = 32, tta: int = 0,
               tta_rate: float | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Logits per text: (num_labels,) for sequence tasks, (num_words, num_labels) for token tasks.

        ``tta=K`` returns log of the mean softmax over K masked copies at ``tta_rate`` (default:
        the adapter's training rate): a test-time masking ensemble.
        """
        masker = self._tta_masker(tta_rate, seed) if tta else None
        examples = [Example(t if self.task == "sequence" or isinstance(t, list) else t.split(), None, f"input[{i}]")
                    for i, t in enumerate(texts)]
        features = encode(examples, self.tokenizer, self.task, None, self.config["max_length"])
        out: list[torch.Tensor] = []
        for start in range(0, len(features), batch_size):
            chunk = features[start:start + batch_size]
            batch = {k: v.to(self.device) for k, v in self.collate(chunk).items()}
            if masker is None:
                logits = self.model(**batch).logits.float().cpu()
            else:
                probs = sum(self.model(**{**batch, "input_ids": masker(batch["input_ids"], batch["attention_mask"])})
                            .logits.float().softmax(-1).cpu() for _ in range(tta))
                logits = (probs / tta).log()
            for row, feature, example in zip(logits, chunk, examples[start:start + batch_size]):
                out.append(row if self.task == "sequence"
                           else _word_logits(row, feature["word_ids"], len(example.text), self.tokenizer))
        return out

    def _tta_masker(self, rate: float | None, seed: int):
        from .masking import MaskToken, TokenMasker

        config = self.active_config
        rate = config["masking"]["rate"] if rate is None else rate
        return TokenMasker.for_tokenizer(self.tokenizer, MaskToken.from_dict(config["mask_token"]), rate, seed)

    @property
    def active_config(self) -> dict:
        return self._configs.get(self.active, self.config)

    def predict(self, texts: Sequence[str | list[str]], batch_size: int = 32, tta: int = 0,
                tta_rate: float | None = None) -> list[dict]:
        """Labels and probabilities; token tasks give one label per input word (words past
        ``max_length`` get ``None``)."""
        results = []
        for logits in self.logits(texts, batch_size, tta, tta_rate):
            probs = logits.softmax(-1)
            if self.task == "sequence":
                results.append({"label": self.labels[int(probs.argmax())],
                                "probs": {lab: round(float(p), 6) for lab, p in zip(self.labels, probs)}})
            else:
                results.append({"labels": [self.labels[int(p.argmax())] if not torch.isnan(p).any() else None
                                           for p in probs]})
        return results


def peft_name(name: str) -> str:
    """PEFT adapter names cannot hold dots (they become module names): ``mask_0.10`` → ``mask_0_10``."""
    return name.replace(".", "_")


def _default_name(config: dict) -> str:
    return adapter_name(config["masking"]["rate"])


def _word_logits(row: torch.Tensor, word_ids: list, n_words: int, tokenizer) -> torch.Tensor:
    """Token logits → one row per word (its first sub-word); NaN rows for truncated words."""
    row = row[row.shape[0] - len(word_ids):] if tokenizer.padding_side == "left" else row[:len(word_ids)]
    out = torch.full((n_words, row.shape[-1]), float("nan"))
    seen = set()
    for position, w in enumerate(word_ids):
        if w is not None and w not in seen:
            seen.add(w)
            out[w] = row[position]
    return out


def merge_run(run_dir: str | Path, output_dir: str | Path) -> Path:
    """Export ``run_dir``'s adapter merged into a full-precision base as a standalone model.

    QLoRA adapters are merged into the unquantised base (merging into 4-bit weights would
    round the update away). The result loads with plain ``AutoModelFor*.from_pretrained`` and
    with :meth:`Classifier.from_run`.
    """
    import dataclasses

    from peft import PeftModel

    from .training import write_json

    run_dir, output_dir = Path(run_dir), Path(output_dir)
    config = read_run_config(run_dir)
    if config["method"] == "full":
        raise ValueError(f"{run_dir} is a fully fine-tuned model already: nothing to merge")
    tokenizer = classifier_tokenizer(run_dir)
    cfg = dataclasses.replace(model_config_of(config), method="lora")
    base = load_base(cfg, config["labels"], tokenizer, config["seed"])
    merged = PeftModel.from_pretrained(base, run_dir).merge_and_unload()
    merged.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    write_json(output_dir / TOKMASK_CONFIG, {**config, "method": "full", "merged_from": str(run_dir)})
    return output_dir
