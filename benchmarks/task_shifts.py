"""Masking under the shifts users meet, on the tasks of issue 38: does a model trained at p = 0.1 hold up
better than one trained at p = 0 when test words are masked, deleted or misspelt? Scored, not retrained.

    python benchmarks/task_shifts.py --task nli|relatedness|goemotions --method lora|full
    python benchmarks/task_shifts.py --summary        # the README table from the committed predictions

Each finished run of a ``benchmarks/tasks.py`` job (its weights under ``runs/tasks/``) scores the task's
test set under each of :data:`SHIFTS`: 20 % of words masked, deleted or given a typo, in both texts of a
pair, each copy fixed per shift as ``train.robustness`` draws it, through the training loop's own
evaluation (``evaluation.evaluate``). The predictions land in the run's light copy
(``OUT/tasks_TASK_METHOD/mask_R/seed_N/shifted.npz``) as each set is scored, so a cut job resumes and the
table is rebuilt on a machine without the weights. Per shift: p = 0.1 − p = 0 on the task's metric
(multi-label: micro F1 at 0.5, as tasks.py judges it), paired per test example with the verdicts'
interval over the seeds both rates have and the examples; the clean Δ is tasks.py's table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_parser, write_result  # noqa: E402
from tasks import _f, _interval, as_dict, job_paths, job_recipe, mean, run_job, tiny_encoder  # noqa: E402

from tokmask_peft.metrics import classification_metrics  # noqa: E402
from tokmask_peft.problems import decide  # noqa: E402
from tokmask_peft.robustness import condition_name, condition_title, shifted_set  # noqa: E402
from tokmask_peft.runs import (PREDICTIONS_FILE, Predictions, load_predictions, read_run_config,  # noqa: E402
                               run_dirs, save_predictions)
from tokmask_peft.verdicts import paired_verdict  # noqa: E402

SHIFTS = (("mask", 0.2), ("delete", 0.2), ("typo", 0.2))
SHIFTED_FILE = "shifted.npz"
"""Beside a light copy's ``predictions.npz`` (which tasks.py rewrites from the run): the shifted test sets."""


def set_names() -> dict[str, tuple[str, float]]:
    """Each shifted test set's name as saved (``test:mask@0.2``) → its (shift, q)."""
    return {shifted_set("test", condition_name(kind, q)): (kind, q) for kind, q in SHIFTS}


def score_run(weights: Path, copy: Path, setup, done: dict) -> None:
    """Score the shifted test sets ``copy`` lacks (``done``: those it has) with the run in ``weights``; each
    saved as soon as scored."""
    from accelerate import Accelerator

    from tokmask_peft.evaluation import eval_loader, evaluate
    from tokmask_peft.inference import Classifier

    clean = load_predictions(copy / PREDICTIONS_FILE)["test"]
    clf, recipe = Classifier.from_run(weights, device="cpu"), setup.recipe
    for name, (kind, q) in set_names().items():
        if name in done:
            continue
        features = setup.robustness_features(kind, q, "test")
        loader = eval_loader(features, setup.tokenizer, recipe.model.task, recipe.train.eval_batch_size)
        _, kept = evaluate(clf.model, loader, Accelerator(cpu=True), recipe.model.task, keep=True,
                           problem=recipe.model.problem_type)[0]
        order, clean_order = np.argsort(kept.example), np.argsort(clean.example)
        if not np.array_equal(kept.gold[order], clean.gold[clean_order]):  # the same test set, row for row
            raise SystemExit(f"{copy}: test gold differs from the run's saved predictions: another recipe?")
        done[name] = kept
        save_predictions(copy / SHIFTED_FILE, done)
        print(f"{copy} {condition_name(kind, q)}: scored", flush=True)


def score_job(task: str, method: str, out: Path, tiny: str | None) -> None:
    """Every finished run of the job that has a light copy, scored on the shifted test sets it lacks."""
    from tokmask_peft.recipe_setup import Setup

    name, runs = job_paths(task, method, out, tiny)
    setup = None
    for run in run_dirs(runs):
        kept = out / name / run.relative_to(runs)
        done = load_predictions(kept / SHIFTED_FILE) if (kept / SHIFTED_FILE).is_file() else {}
        if (kept / PREDICTIONS_FILE).is_file() and not set(set_names()) <= set(done):
            setup = setup or Setup.from_recipe(job_recipe(task, method, [0], runs, tiny))  # only to score
            score_run(run, kept, setup, done)


def judged(copy: Path, metric: str) -> list[dict]:
    """Clean test, then each shifted copy (multi-label: at 0.5 and at the thresholds tuned on dev, which
    inference uses): each rate's mean test metric and p = 0.1 − p = 0, paired per example over the seeds
    both rates have scored."""
    runs: dict[float, dict[int, tuple[dict, dict]]] = {}
    for run in sorted(copy.glob("mask_*/seed_*")):
        if (run / SHIFTED_FILE).is_file():
            config = read_run_config(run)
            sets = {**load_predictions(run / PREDICTIONS_FILE), **load_predictions(run / SHIFTED_FILE)}
            runs.setdefault(config["masking"]["rate"], {})[config["seed"]] = (config, sets)
    if 0.0 not in runs:
        return []
    config = next(iter(runs[0.0].values()))[0]
    problem, classes, rate = config.get("problem_type", "single_label"), len(config["labels"]), max(runs)
    out = []
    for name in ["test", *set_names()]:
        for tuned in (False, True) if problem == "multi_label" else (False,):
            scored = {r: {s: at_cut(sets[name], c, tuned) for s, (c, sets) in seeds.items() if name in sets}
                      for r, seeds in runs.items()}
            shared = set(scored[rate]) & set(scored[0.0]) if rate > 0 else set()
            if shared:  # the means on the seeds judged
                scored = {r: {s: scored[r][s] for s in shared} for r in (0.0, rate)}
            means = {str(r): mean(classification_metrics(p.pred, p.gold, problem, classes)[metric]
                                  for p in by_seed.values()) for r, by_seed in scored.items() if by_seed}
            verdict = (paired_verdict(rate, scored[rate], scored[0.0], classes, metric, problem=problem)
                       if shared else None)
            out.append({"set": name, "tuned": tuned, "test": means, "rate": rate,
                        "verdict": verdict and as_dict(verdict)})
    return out


def at_cut(p: Predictions, config: dict, tuned: bool) -> Predictions:
    """Multi-label decisions at the run's thresholds tuned on dev (``tuned``), else as saved (at 0.5)."""
    if not tuned:
        return p
    pred = decide("multi_label", torch.as_tensor(p.probs, dtype=torch.float32), config["thresholds"]).numpy()
    return Predictions(p.example, p.gold, pred.astype(p.pred.dtype), p.probs)


def summary_table(results: list[dict]) -> str:
    lines = ["| task | method | metric | test set | seeds | p = 0 | p = 0.1 | Δ [95 % CI] | verdict |",
             "|---" * 9 + "|"]
    for r in results:
        for j in r["shifts"]:
            v, title = j["verdict"], "clean" if j["set"] == "test" else condition_title(j["set"].split(":", 1)[1])
            cut = " (tuned thresholds)" if j["tuned"] else " (at 0.5)" if r["metric"] == "micro_f1" else ""
            lines.append(f"| {r['task']} | {r['method']} | {r['metric']}{cut} | {title} | "
                         f"{v['seeds'] if v else '–'} | {_f(j['test'].get('0.0'))} | "
                         f"{_f(j['test'].get(str(j['rate'])) if j['rate'] > 0 else None)} | {_interval(v)} | "
                         f"{v['word'] if v else '–'} |")
    return "\n".join(lines)


def result_for(task: str, method: str, out: Path, tiny: str | None) -> dict:
    name, _ = job_paths(task, method, out, tiny)
    metric = json.loads((out / f"{name}.json").read_text())["metric"]
    return {"task": task, "method": method, "metric": metric, "shifts": judged(out / name, metric)}


def main() -> None:
    parser = benchmark_parser(__doc__, task="nli", method="lora")
    parser.add_argument("--summary", action="store_true", help="print the README table from the results")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summary:
        jobs = [p.stem.split("_")[1:] for p in sorted(out.glob("tasks_*.json")) if not p.stem.endswith("_tiny")]
        results = [r for task, method in jobs if (r := result_for(task, method, out, None))["shifts"]]
        print(summary_table(results))
        return
    tiny = tiny_encoder(out) if args.tiny else None
    if tiny and not (out / f"{job_paths(args.task, args.method, out, tiny)[0]}.json").is_file():
        run_job(args.task, args.method, [0], out, tiny)  # the runs to score: tasks.py's tiny job
    score_job(args.task, args.method, out, tiny)
    result = result_for(args.task, args.method, out, tiny)
    write_result(f"task_shifts_{args.task}_{args.method}" + ("_tiny" if tiny else ""), result, out)
    print(summary_table([result]))


if __name__ == "__main__":
    main()
