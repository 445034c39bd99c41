"""Sentence pairs, multi-label and regression on real data (issue 38): our sweep against the HF Trainer + PEFT.

    python benchmarks/tasks.py --task nli|relatedness|goemotions --method lora|full [--seeds 0,1,2]
    python benchmarks/tasks.py --summary          # the README table from the committed results

One job = the task's recipe (``recipes/sick_nli.yaml``, ``sick_relatedness.yaml``, ``goemotions.yaml``;
MiniLM-L6; ``--method full`` sets full fine-tuning at lr 5e-5) swept over rates {0, 0.1} and the seeds,
then, as the peer, the HF ``Trainer`` on the same encoded features at p = 0: same model builder, batch
size, epochs, learning rate, warm-up and early stopping on the same dev metric (patience), grouped by length,
best checkpoint reloaded, then scored on test. Both are resumable: the sweep skips finished runs, the peer
finished seeds (kept in the result JSON); each finished run is copied light into ``OUT/tasks_TASK_METHOD/``
(metrics, config, predictions; no weights and no text: SICK is never shipped) and skipped on any machine
that has the copy. Reported: each side's test metric (mean over seeds) and training
wall time, and our verdict of p = 0.1 against p = 0 on test (paired, two-level bootstrap).
"""
from __future__ import annotations

import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, benchmark_parser, write_result  # noqa: E402

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.metrics import METRICS, classification_metrics  # noqa: E402
from tokmask_peft.problems import decide, scores  # noqa: E402
from tokmask_peft.recipe_setup import Setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RECIPES = {"nli": "sick_nli", "relatedness": "sick_relatedness", "goemotions": "goemotions"}
FULL = ["model.method=full", "train.lr=5e-5"]


def job_recipe(task: str, method: str, seeds: list[int], out: Path, tiny: str | None, extra: tuple = ()) -> Recipe:
    overrides = [f"train.output_dir={out}", f"sweep.seeds={seeds}", *(FULL if method == "full" else []), *extra]
    if tiny:  # seconds: a tiny encoder, short slices, one epoch
        overrides += [f"model.name={tiny}", "train.epochs=1", "data.max_train_examples=64", "data.max_eval_examples=48"]
    recipe = Recipe.from_yaml(ROOT / "recipes" / f"{RECIPES[task]}.yaml", overrides)
    data = {k: str(SHARED / v.removeprefix("../shared/")) if isinstance(v, str) and v.startswith("../shared/") else v
            for k, v in recipe.to_dict()["data"].items()}
    data["extra_eval"] = {k: str(SHARED / v.removeprefix("../shared/")) for k, v in data["extra_eval"].items()}
    return Recipe.from_dict({**recipe.to_dict(), "data": data})


def peer_run(recipe: Recipe, setup: Setup, seed: int, out: Path) -> dict:
    """The HF Trainer + PEFT at p = 0 on ``setup``'s features: best dev checkpoint, then test."""
    from transformers import DataCollatorWithPadding, EarlyStoppingCallback, Trainer, TrainingArguments

    tc, problem = recipe.train, recipe.model.problem_type
    metric = tc.metric

    def compute(prediction):
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        import torch

        pred = decide(problem, scores(problem, torch.as_tensor(logits))).numpy()
        return classification_metrics(pred, prediction.label_ids, problem, logits.shape[-1])

    def plain(features):
        return [{k: v for k, v in f.items() if k != "word_ids"} for f in features]

    start = time.perf_counter()
    model = setup.model_for(seed)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=tc.batch_size, per_device_eval_batch_size=tc.eval_batch_size,
        num_train_epochs=tc.epochs, learning_rate=tc.lr, weight_decay=tc.weight_decay, warmup_steps=tc.warmup_ratio,
        lr_scheduler_type="linear", max_grad_norm=tc.max_grad_norm, seed=seed, report_to=[], use_cpu=True,
        eval_strategy="epoch", save_strategy="epoch", save_total_limit=1, load_best_model_at_end=True,
        metric_for_best_model=metric, greater_is_better=METRICS[metric].higher_is_better, logging_strategy="no",
        train_sampling_strategy="group_by_length", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=plain(setup.train_features),
                      eval_dataset=plain(setup.dev_features), data_collator=DataCollatorWithPadding(setup.tokenizer),
                      compute_metrics=compute,
                      callbacks=[EarlyStoppingCallback(tc.patience)] if tc.patience else [])
    trainer.train()
    wall = time.perf_counter() - start
    dev = trainer.evaluate()[f"eval_{metric}"]
    test = trainer.evaluate(plain(setup.extra_features["test"]), metric_key_prefix="test")[f"test_{metric}"]
    setup.release(model)
    shutil.rmtree(out, ignore_errors=True)  # its checkpoints only served to reload the best one
    return {"seed": seed, "dev": dev, "test": test, "wall_time_s": wall, "steps": trainer.state.global_step}


def ours(out: Path, metric: str) -> dict:
    """Per rate: test metric and wall time per seed (from the sweep's runs); p = 0.1 vs p = 0 on test."""
    from tokmask_peft.reporting import collect, set_verdicts
    from tokmask_peft.runs import read_metrics

    rows = collect(out)
    by_rate: dict[float, list[dict]] = {}
    for row in rows:
        by_rate.setdefault(row["rate"], []).append({"seed": row["seed"], "dev": row[metric], "test": row.get(
            f"test_{metric}"), "wall_time_s": row["wall_time_s"],
            "steps": read_metrics(out / row["run"])["steps"]})
    verdicts = {v.rate: {"delta": v.delta, "low": v.low, "high": v.high, "word": v.word, "level": v.level}
                for v in set_verdicts(out, rows, "test", metric)}
    return {"runs": {str(r): runs for r, runs in by_rate.items()},
            "test_verdicts": {str(r): v for r, v in verdicts.items()}}


def run_job(task: str, method: str, seeds: list[int], out_dir: Path, tiny: str | None) -> dict:
    """Seed by seed (both rates, then that seed's peer), each finished run copied light into
    ``OUT/NAME/`` (metrics, config, predictions: no weights, no text) and the result JSON rewritten, so a
    job cut short leaves committed evidence and continues on any machine without training it again."""
    from low_resource import missing_rates
    from real_data import light_copy

    from tokmask_peft.sweeps import sweep

    name = f"tasks_{task}_{method}" + ("_tiny" if tiny else "")
    runs = ROOT / "runs" / "tasks" / name if not tiny else out_dir / f"{name}_runs"
    copy = Path(out_dir) / name
    recipe = job_recipe(task, method, seeds, runs, tiny)
    path = Path(out_dir) / f"{name}.json"
    peer = {p["seed"]: p for p in json.loads(path.read_text()).get("peer", [])} if path.is_file() else {}
    setup = None
    for seed in seeds:
        for rate in missing_rates(copy, job_recipe(task, method, [seed], runs, tiny), seed):
            sweep(job_recipe(task, method, [seed], runs, tiny, [f"sweep.rates=[{rate}]"]), runs)
            light_copy(runs, copy, keep=("metrics.json", "tokmask_config.json", "predictions.npz"), sweep_files=False)
        if seed not in peer:
            setup = setup or Setup.from_recipe(recipe)
            peer[seed] = peer_run(recipe, setup, seed, runs.with_name(f"{name}_peer_{seed}"))
            print(f"peer seed {seed}: {peer[seed]}", flush=True)
        result = {"task": task, "method": method, "metric": recipe.train.metric, "recipe": recipe.to_dict(),
                  "ours": ours(copy, recipe.train.metric), "peer": sorted(peer.values(), key=lambda p: p["seed"])}
        write_result(name, result, out_dir)
    return result


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def summary_table(results: list[dict]) -> str:
    """task × method × rate: test metric (ours, the Trainer's at p = 0), wall time and time per optimizer step
    (early stopping ends the two loops after different numbers of epochs), the verdict vs p = 0."""
    lines = ["| task | method | metric | rate | seeds | test (ours) | test (HF Trainer) | train s (ours) | "
             "train s (Trainer) | s/step (ours) | s/step (Trainer) | Δ vs p = 0 on test [95 % CI] | verdict |",
             "|---" * 13 + "|"]
    for r in results:
        for rate, runs in sorted(r["ours"]["runs"].items(), key=lambda kv: float(kv[0])):
            v = r["ours"]["test_verdicts"].get(rate)
            peer = r["peer"] if float(rate) == 0.0 else []
            verdict = (f"{v['delta']:+.4f} [{v['low']:+.4f}, {v['high']:+.4f}]", v["word"]) if v else ("–", "–")
            lines.append(f"| {r['task']} | {r['method']} | {r['metric']} | {float(rate):g} | {len(runs)} | "
                         f"{_f(mean(x['test'] for x in runs))} | {_f(mean(p['test'] for p in peer))} | "
                         f"{_f(mean(x['wall_time_s'] for x in runs), 0)} | {_f(mean(p['wall_time_s'] for p in peer), 0)}"
                         f" | {_f(per_step(runs), 2)} | {_f(per_step(peer), 2)} | {verdict[0]} | {verdict[1]} |")
    return "\n".join(lines)


def per_step(runs: list[dict]) -> float | None:
    """Mean seconds per optimizer step over the runs that recorded their steps (peers before 2026-12-06 did not)."""
    return mean(r["wall_time_s"] / r["steps"] for r in runs if r.get("steps"))


def _f(value, digits: int = 4) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def main() -> None:
    parser = benchmark_parser(__doc__, task="nli", method="lora", seeds="0,1,2")
    parser.add_argument("--summary", action="store_true", help="print the README table from the results")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summary:
        results = [json.loads(p.read_text()) for p in sorted(out.glob("tasks_*.json"))
                   if not p.stem.endswith("_tiny")]
        print(summary_table(results))
        return
    tiny = None
    if args.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from helpers import make_tiny_model

        tiny = str(make_tiny_model("bert", out / "tiny-bert")) if not (out / "tiny-bert").exists() else str(
            out / "tiny-bert")
    seeds = [0] if args.tiny else [int(s) for s in args.seeds.split(",")]
    result = run_job(args.task, args.method, seeds, out, tiny)
    print(summary_table([result]))
    assert np.isfinite([p["test"] for p in result["peer"]]).all()


if __name__ == "__main__":
    main()
