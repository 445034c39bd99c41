"""Does masking help? Rate sweeps of real pretrained models on real LinCE data, from recipes.

    python benchmarks/real_data.py recipes/minilm_sa_lora.yaml [key=value ...]
        [--full recipes/minilm_sa_full.yaml]   # then full fine-tuning at p = 0 and the sweep's best p
        [--tta 8]                               # also score each p > 0 adapter with a K-copy masked ensemble
        [--out benchmarks/results/real_data]

Each sweep runs in ``runs/real_data/<recipe>`` (adapters included); a light copy (results table,
plot, and every run's metrics.json + tokmask_config.json in the same mask_*/seed_* layout, so
``tokmask report`` rebuilds it) goes to ``--out/<recipe>`` for committing.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402

from tokmask_peft.config import Recipe, resolve_path  # noqa: E402
from tokmask_peft.reporting import summarise  # noqa: E402
from tokmask_peft.storage import atomic_write_text  # noqa: E402
from tokmask_peft.sweeps import sweep  # noqa: E402


def light_copy(src: Path, dst: Path, keep: tuple[str, ...] = ("metrics.json", "tokmask_config.json"),
               sweep_files: bool = True) -> None:
    """Results and each run's small files (``keep``), weights left out, for committing; without
    ``sweep_files`` only the runs (when ``dst`` holds runs that ``src`` lacks, its table is rebuilt instead)."""
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("results.csv", "results.md", "results.png", "recipe.yaml", "tta.json") if sweep_files else ():
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)
    for run in src.glob("mask_*/seed_*"):
        if run.name.endswith(".partial"):
            continue
        target = dst / run.relative_to(src)  # same layout: `tokmask report DST` rebuilds the table
        target.mkdir(parents=True, exist_ok=True)
        for name in keep:
            if (run / name).exists():
                shutil.copy2(run / name, target / name)


def test_time_masking(sweep_dir: Path, k: int) -> list[dict]:
    """Weighted F1 on dev with and without a K-copy masked ensemble, for each adapter with p > 0."""
    from tokmask_peft.data import read_examples
    from tokmask_peft.inference import Classifier
    from tokmask_peft.metrics import classification_metrics

    rows = []
    for run in sorted(sweep_dir.glob("mask_*/seed_*")):
        config = json.loads((run / "tokmask_config.json").read_text())
        rate = config["masking"]["rate"]
        has_weights = any((run / f).exists() for f in ("adapter_model.safetensors", "model.safetensors"))
        if rate == 0 or config["task"] != "sequence" or not has_weights:  # copies without weights: skip
            continue
        recipe = Recipe.from_dict(config["recipe"])
        dev = read_examples(resolve_path(recipe.data.dev), recipe.data.format, "sequence")
        dev = dev[: recipe.data.max_eval_examples or None]
        clf = Classifier.from_run(run)
        texts, gold = [e.text for e in dev], [clf.labels.index(e.label) for e in dev]
        scores = {}
        for name, tta in (("plain", 0), (f"tta{k}", k)):
            pred = [clf.labels.index(p["label"]) for p in clf.predict(texts, batch_size=128, tta=tta)]
            scores[name] = classification_metrics(pred, gold)["weighted_f1"]
        rows.append({"run": str(run.relative_to(sweep_dir)), "rate": rate, **scores})
        print(json.dumps(rows[-1]))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("overrides", nargs="*")
    parser.add_argument("--full", help="full fine-tuning recipe, run at p = 0 and at the sweep's best p")
    parser.add_argument("--full-overrides", nargs="*", default=[])
    parser.add_argument("--tta", type=int, default=0)
    parser.add_argument("--runs", default="runs/real_data")
    parser.add_argument("--out", default="benchmarks/results/real_data")
    args = parser.parse_args(argv)

    name = Path(args.recipe).stem
    recipe = Recipe.from_yaml(args.recipe, args.overrides)
    runs = Path(args.runs) / name
    started = time.perf_counter()
    rows = sweep(recipe, runs)
    summary = summarise(rows)
    best = next(e for e in summary if e["best"])
    print((runs / "results.md").read_text())
    if args.tta:
        atomic_write_text(runs / "tta.json", json.dumps(test_time_masking(runs, args.tta), indent=2))
    light_copy(runs, Path(args.out) / name)
    if args.full:
        full_name = Path(args.full).stem
        rates = sorted({0.0, best["rate"]})
        full = Recipe.from_yaml(args.full, [*args.full_overrides, f"sweep.rates={rates}"])
        sweep(full, Path(args.runs) / full_name)
        print((Path(args.runs) / full_name / "results.md").read_text())
        light_copy(Path(args.runs) / full_name, Path(args.out) / full_name)
    atomic_write_text(Path(args.out) / name / "environment.json", json.dumps(
        {**environment(), "wall_time_s": time.perf_counter() - started, "overrides": args.overrides}, indent=2))


if __name__ == "__main__":
    main()
