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
two-level bootstrap over the seeds both rates have and the examples; the clean Δ is tasks.py's table.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_parser, write_result  # noqa: E402
from tasks import ROOT, _f, _interval, as_dict, job_recipe, mean, run_job, tiny_encoder  # noqa: E402

from tokmask_peft.metrics import classification_metrics  # noqa: E402
from tokmask_peft.robustness import condition_name, condition_title, shifted_set  # noqa: E402
from tokmask_peft.runs import (PREDICTIONS_FILE, load_predictions, read_run_config, run_dirs,  # noqa: E402
                               save_predictions)
from tokmask_peft.verdicts import paired_verdict  # noqa: E402

SHIFTS = (("mask", 0.2), ("delete", 0.2), ("typo", 0.2))
SHIFTED_FILE = "shifted.npz"
"""Beside a light copy's ``predictions.npz`` (which tasks.py rewrites from the run): the shifted test sets."""


def set_names() -> list[str]:
    return [shifted_set("test", condition_name(kind, q)) for kind, q in SHIFTS]


def score_run(weights: Path, copy: Path, setup) -> None:
    """Score the shifted test sets ``copy`` lacks with the run in ``weights``; each saved as soon as scored."""
    from accelerate import Accelerator

    from tokmask_peft.evaluation import eval_loader, evaluate
    from tokmask_peft.inference import Classifier

    target = copy / SHIFTED_FILE
    done = load_predictions(target) if target.exists() else {}
    todo = [(kind, q) for kind, q in SHIFTS if shifted_set("test", condition_name(kind, q)) not in done]
    if not todo:
        return
    clean = load_predictions(copy / PREDICTIONS_FILE)["test"]
    clf, recipe = Classifier.from_run(weights, device="cpu"), setup.recipe
    for kind, q in todo:
        features = setup.robustness_features(kind, q, "test")
        loader = eval_loader(features, setup.tokenizer, recipe.model.task, recipe.train.eval_batch_size)
        _, kept = evaluate(clf.model, loader, Accelerator(cpu=True), recipe.model.task, keep=True,
                           problem=recipe.model.problem_type)[0]
        order, clean_order = np.argsort(kept.example), np.argsort(clean.example)
        if not np.array_equal(kept.gold[order], clean.gold[clean_order]):  # the same test set, row for row
            raise SystemExit(f"{copy}: test gold differs from the run's saved predictions: another recipe?")
        done[shifted_set("test", condition_name(kind, q))] = kept
        save_predictions(target, done)
        print(f"{copy} {condition_name(kind, q)}: scored", flush=True)


def score_job(task: str, method: str, out: Path, tiny: str | None) -> None:
    """Every finished run of the job that has a light copy, scored on the shifted test sets it lacks."""
    from tokmask_peft.recipe_setup import Setup

    name = f"tasks_{task}_{method}" + ("_tiny" if tiny else "")
    runs = ROOT / "runs" / "tasks" / name if not tiny else out / f"{name}_runs"
    copy = out / name
    setup = None
    for run in run_dirs(runs):
        if (copy / run.relative_to(runs) / PREDICTIONS_FILE).is_file():
            setup = setup or Setup.from_recipe(job_recipe(task, method, [0], runs, tiny))
            score_run(run, copy / run.relative_to(runs), setup)


def judged(copy: Path, metric: str) -> dict:
    """Per shifted set: each rate's mean test metric and p = 0.1 − p = 0, paired per example over the seeds
    both rates have scored."""
    by_rate: dict[float, dict[int, dict]] = {}
    config = None
    for run in sorted(copy.glob("mask_*/seed_*")):
        if (run / SHIFTED_FILE).is_file():
            config = read_run_config(run)
            by_rate.setdefault(config["masking"]["rate"], {})[config["seed"]] = load_predictions(run / SHIFTED_FILE)
    if config is None or 0.0 not in by_rate:
        return {}
    problem, classes = config.get("problem_type", "single_label"), len(config["labels"])
    out = {}
    for name in set_names():
        scored = {rate: {s: sets[name] for s, sets in seeds.items() if name in sets} for rate, seeds in by_rate.items()}
        means = {str(rate): mean(classification_metrics(p.pred, p.gold, problem, classes)[metric]
                                 for p in runs.values()) for rate, runs in scored.items() if runs}
        rate = max(by_rate)
        shared = sorted(set(scored[rate]) & set(scored[0.0]))
        verdict = paired_verdict(rate, scored[rate], scored[0.0], classes, metric, problem=problem) if (
            rate > 0 and shared) else None
        out[name] = {"test": means, "rate": rate, "verdict": verdict and as_dict(verdict)}
    return out


def summary_table(results: list[dict]) -> str:
    lines = ["| task | method | metric | shift of test | seeds | p = 0 | p = 0.1 | Δ [95 % CI] | verdict |",
             "|---" * 9 + "|"]
    for r in results:
        for name, j in r["shifts"].items():
            v = j["verdict"]
            lines.append(f"| {r['task']} | {r['method']} | {r['metric']} | {condition_title(name.split(':', 1)[1])} | "
                         f"{v['seeds'] if v else '–'} | {_f(j['test'].get('0.0'))} | "
                         f"{_f(j['test'].get(str(j['rate'])) if j['rate'] > 0 else None)} | {_interval(v)} | "
                         f"{v['word'] if v else '–'} |")
    return "\n".join(lines)


def result_for(task: str, method: str, out: Path, tiny: str | None) -> dict:
    name = f"tasks_{task}_{method}" + ("_tiny" if tiny else "")
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
    if tiny and not (out / f"tasks_{args.task}_{args.method}_tiny.json").is_file():
        run_job(args.task, args.method, [0], out, tiny)  # the runs to score: tasks.py's tiny job
    score_job(args.task, args.method, out, tiny)
    result = result_for(args.task, args.method, out, tiny)
    write_result(f"task_shifts_{args.task}_{args.method}" + ("_tiny" if tiny else ""), result, out)
    print(summary_table([result]))


if __name__ == "__main__":
    main()
