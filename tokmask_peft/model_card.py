"""The run's README.md: a model card saying what was trained, how, on what, how well, and how to load it.

PEFT writes a generic card into every adapter directory; this one replaces it when the run finishes
(from ``tokmask_config.json`` and ``metrics.json`` alone), and :func:`~tokmask_peft.reporting.update_cards`
rewrites it with the sweep's verdict. The YAML header is the Hub's metadata (library_name, base_model,
pipeline_tag, tags); the loading snippet uses plain PEFT + transformers, no tokmask_peft.
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import yaml

CARD = "README.md"
PIPELINES = {"sequence": "text-classification", "token": "token-classification"}
PROBLEM_LINES = {"single_label": "Labels", "multi_label": "Labels, any number per text (a sigmoid "
                 "each; thresholds tuned on dev in tokmask_config.json)", "regression": "One score per text"}
AUTO_CLASSES = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification"}


def training_command() -> str:
    """The command line that trained the run, as the user typed it (``tokmask …`` for the CLI)."""
    argv = list(sys.argv)
    if argv and (Path(argv[0]).name == "tokmask" or argv[0].endswith("tokmask_peft/cli.py")):
        return shlex.join(["tokmask", *argv[1:]])
    return shlex.join(["python", *argv]) if argv and argv[0] else "(from Python)"


def write_card(run: Path, command: str | None = None, verdict: str | None = None) -> None:
    """(Re)write ``run/README.md`` from the run's files; ``command`` defaults to the one on record."""
    from .runs import METRICS_FILE, read_run_config
    from .storage import atomic_write_text, read_json

    config = read_run_config(run)
    metrics = read_json(run / METRICS_FILE, "metrics file")
    command = command or config.get("command") or "(not recorded)"
    atomic_write_text(run / CARD, card(config, metrics, command, verdict))


def card(config: dict, metrics: dict, command: str, verdict: str | None = None) -> str:
    model, masking, data = config["recipe"]["model"], config["masking"], config["recipe"]["data"]
    full = config["method"] == "full"
    header = {"library_name": "transformers" if full else "peft", "base_model": config["base_model"],
              "pipeline_tag": PIPELINES[config["task"]],
              "tags": ["tokmask-peft", "token-masking", config["method"], *(["lora"] if config["method"] == "qlora"
                                                                           else [])]}
    best = metrics["best"]
    lines = ["---", yaml.safe_dump(header, sort_keys=False).strip(), "---", "",
             f"# {config['task'].capitalize()} classifier: {config['base_model']} + {method_line(config, model)}", "",
             f"{PROBLEM_LINES[config.get('problem_type', 'single_label')]} ({len(config['labels'])}): "
             f"{', '.join(config['labels'])}.", "",
             "## Masking", "", masking_line(config, masking), "",
             "## Data", "",
             f"- train: `{data['train']}` ({metrics['train_examples']} examples used)",
             f"- dev: `{data['dev'] or 'carved from train'}` ({metrics['dev_examples']} examples; it picked the best "
             "epoch)",
             *[f"- {name}: held out, scored once with the best weights" for name in metrics.get("extra_eval", {})],
             "", "## Results", "", *results_table(config, metrics), ""]
    if verdict:
        lines += ["Sweep verdict (this rate against p = 0, over seeds):", "", verdict, ""]
    lines += ["## Trained with", "", "```bash", command, "```", "",
              f"Seed {config['seed']}; versions: " + ", ".join(f"{k} {v}" for k, v in config["versions"].items()), "",
              "## Load it", "", "```python", loading_snippet(config), "```", ""]
    return "\n".join(lines)


CARD_METRICS = {"single_label": ("weighted_f1", "macro_f1", "accuracy"),
                "multi_label": ("micro_f1", "macro_f1", "samples_f1", "tuned_micro_f1", "tuned_macro_f1"),
                "regression": ("pearson", "spearman", "mse")}


def results_table(config: dict, metrics: dict) -> list[str]:
    """Dev at the best checkpoint and each held-out set, in the problem type's metrics (multi-label:
    ``tuned_*`` at the per-label thresholds tuned on dev, which inference uses)."""
    problem = config.get("problem_type", "single_label")
    names = CARD_METRICS[problem]
    best = {**metrics["best"], **metrics.get("dev_tuned", {})}

    def cells(values: dict) -> str:
        return " | ".join(f"{values[m]:.4f}" if isinstance(values.get(m), float) else "–" for m in names)

    return [f"| set | {' | '.join(m.replace('_', ' ') for m in names)} |", "|---" * (len(names) + 1) + "|",
            f"| dev (step {best['step']}, epoch {best['epoch']}) | {cells(best)} |",
            *[f"| {name} | {cells(m)} |" for name, m in metrics.get("extra_eval", {}).items()]]


def method_line(config: dict, model: dict) -> str:
    if config["method"] == "full":
        return "full fine-tuning"
    lora = f"LoRA r {model['lora_r']}, alpha {model['lora_alpha']}, targets {model['target_modules']}"
    return f"QLoRA ({config['quant_bits']}-bit base), {lora}" if config["method"] == "qlora" else lora


def masking_line(config: dict, masking: dict) -> str:
    token = config["mask_token"]
    where = ("a new token, its embedding row trained and saved with the adapter" if token.get("added")
             else "the tokenizer's own")
    return (f"During training each real input {masking.get('unit', 'token')} was replaced "
            f"(`{masking.get('replace', 'mask')}`) with probability {masking['rate']:g} "
            f"({masking.get('schedule', 'constant')} schedule); mask token "
            f"`{token['token']}` (id {token['id']}, {where}); consistency λ = {masking.get('consistency', 0.0):g}. "
            "Evaluation and prediction never mask.")


def loadable_base(base: str) -> tuple[str, str]:
    """(a base ``from_pretrained`` loads, a comment): a ``pkg:`` asset becomes its folder where the package
    is installed (``pkg:`` itself is ours, and transformers would take it for a malformed hub id)."""
    if not base.startswith("pkg:"):
        return base, ""
    from .config import resolve_path

    try:
        return resolve_path(base), f"  # {base}"
    except FileNotFoundError:
        return base, "  # a tokmask `pkg:` asset: tokmask_peft.config.resolve_path gives its folder"


def problem_argument(config: dict) -> str:
    problem = config.get("problem_type", "single_label")
    if problem == "single_label":
        return ""
    from .problems import HF_PROBLEM_TYPES

    return f", problem_type={HF_PROBLEM_TYPES[problem]!r}"


def loading_snippet(config: dict) -> str:
    auto = AUTO_CLASSES[config["task"]]
    if config["method"] == "full":
        return "\n".join([f"from transformers import {auto}, AutoTokenizer", "",
                          'run = "."  # this directory', "tokenizer = AutoTokenizer.from_pretrained(run)",
                          f"model = {auto}.from_pretrained(run).eval()"])
    gguf = f", gguf_file={config['gguf_file']!r}" if config.get("gguf_file") else ""
    base, note = loadable_base(config["base_model"])
    return "\n".join([
        "from peft import PeftModel", f"from transformers import {auto}, AutoTokenizer", "",
        'run = "."  # this directory', f"base = {base!r}{note}",
        "tokenizer = AutoTokenizer.from_pretrained(run)",
        f"model = {auto}.from_pretrained(base{gguf}, num_labels={len(config['labels'])},",
        f"    id2label={dict(enumerate(config['labels']))!r}{problem_argument(config)})",
        "model.config.pad_token_id = tokenizer.pad_token_id  # decoders pool the last non-pad token",
        "if len(tokenizer) > model.get_input_embeddings().num_embeddings:  # an added <mask> row",
        "    model.resize_token_embeddings(len(tokenizer))",
        "model = PeftModel.from_pretrained(model, run).eval()  # LoRA + the trained head (+ <mask> row)",
        "# QLoRA adapters load the same way on a full-precision base (or pass quantization_config)"
        if config["method"] == "qlora" else "",
    ]).rstrip()
