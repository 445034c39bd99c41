"""Masked-view ensembles at inference (issue 40, the RanMASK idea): does averaging K masked views of each
input change clean F1, F1 under shifts, or calibration? Scored, not retrained.

    python benchmarks/tta.py --block 7 [--strategies none,word_p1] [--k 8] [--sets all | test,test:mask@0.2,...]
                             [--runs runs/low_resource,...] [key=value ...]

For each run of the block's strategies, each chosen set is scored as the mean of K views drawn with the
adapter's own unit and replacement at its training rate (at p = 0, at ``--rate``, default 0.1, in the unit its
recipe names: token in blocks 7 and 8), and compared
with the run's own plain predictions on that set (its committed ``predictions.npz``: same weights, same fixed
shifted copies, so they are not computed again). The sets default to every clean held-out set plus ``test``
with 20 % of words masked (``all``: every shifted copy too). K views cost K forward passes: block 7 at one
thread here, ~7 min a model for the default sets, ~20 min for ``all``.

Each run's ensemble predictions land in its light copy (``OUT/block_N/STRATEGY/mask_*/seed_*/tta_kK.npz``)
as soon as they are scored, so a cut measurement resumes and the table is rebuilt on a machine without
the weights. The tables cover every strategy and rate with committed ensembles. Per (strategy, set): weighted
F1 and ECE (15 bins) plain → ensemble, and the ensemble's paired Δ over seeds with the verdicts' interval
(seeds and examples) and verdict. Writes ``OUT/block_N/tta.md`` and ``tta.json``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402
from low_resource import BLOCKS, NAMES, strategy_recipe  # noqa: E402

from tokmask_peft.metrics import classification_metrics  # noqa: E402
from tokmask_peft.runs import (PREDICTIONS_FILE, TOKMASK_CONFIG, Predictions, load_predictions,  # noqa: E402
                               save_predictions)
from tokmask_peft.storage import atomic_write_text  # noqa: E402
from tokmask_peft.verdicts import paired_verdict  # noqa: E402


def ensemble(clf, examples, features: list[dict], k: int, rate: float | None, plain: Predictions) -> Predictions:
    """The K-view ensemble on one set (its features as the run saw them), in ``plain``'s row order (runs
    save rows in scoring order, ``example`` naming each row's input); gold labels must agree."""
    import torch

    features = [{key: v for key, v in f.items() if key != "labels"} for f in features]
    rows = [row for row, _ in clf.forward(examples, features, batch_size=64, tta=k, tta_rate=rate)]
    probs = torch.stack(rows).softmax(-1).numpy()[plain.example]
    index = {label: i for i, label in enumerate(clf.labels)}
    if not np.array_equal(np.array([index[examples[i].label] for i in plain.example]), plain.gold):
        raise SystemExit(f"{clf.active}: the set's gold labels differ from those the run saved: another recipe?")
    return Predictions(plain.example, plain.gold, probs.argmax(1), probs)


def shifted_sets(setup) -> dict:
    """Every held-out set the recipe scores and each of its shifted copies, by the name runs save them
    under: a function giving its (examples, features), built only when scored."""
    from tokmask_peft.robustness import condition_name, shifted_set

    sets = {}
    for name in setup.extra_examples:
        sets[name] = lambda n=name: (setup.extra_examples[n], setup.extra_features[n])
        for kind, q in setup.recipe.scored_shifts():
            if setup.can_shift(name, kind):  # as training scores them
                sets[shifted_set(name, condition_name(kind, q))] = lambda n=name, c=kind, r=q: (
                    setup.extra_examples[n], setup.robustness_features(c, r, n))
    return sets


def chosen_sets(setup, asked: str | None) -> dict:
    """``--sets`` (default: the clean held-out sets and ``test:mask@0.2``; ``all``: every set and shifted
    copy the block scores); an unknown name is an error."""
    every = shifted_sets(setup)
    names = list(every) if asked == "all" else asked.split(",") if asked else [*setup.extra_examples, "test:mask@0.2"]
    unknown = [n for n in names if n not in every]
    if unknown:
        raise SystemExit(f"--sets: {unknown} not scored by this block; choose from {sorted(every)}")
    return {n: every[n] for n in names}


def score_run(weights: Path, copy: Path, sets: dict, k: int, rate: float) -> None:
    """Score the sets ``copy``'s ensemble file lacks with the weights in ``weights``; write it at once."""
    from tokmask_peft.inference import Classifier

    target, plain = copy / f"tta_k{k}.npz", load_predictions(copy / PREDICTIONS_FILE)
    done = load_predictions(target) if target.exists() else {}
    todo = [n for n in sets if n not in done]
    if not todo:
        return
    clf = Classifier.from_run(weights, device="cpu")
    trained_at = json.loads((weights / TOKMASK_CONFIG).read_text())["masking"]["rate"]
    for name in todo:
        examples, features = sets[name]()
        if len(features) != len(plain[name].gold):
            raise SystemExit(f"{copy}: {name} has {len(features)} inputs now, {len(plain[name].gold)} when trained")
        done[name] = ensemble(clf, examples, features, k, trained_at or rate, plain[name])
        save_predictions(target, done)
        print(f"{copy} {name}: scored", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=7, choices=sorted(BLOCKS))
    parser.add_argument("--strategies", default="none,word_p1")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.1, help="the views' rate for runs trained at p = 0")
    parser.add_argument("--sets", help="comma-separated sets (default: clean held-out sets and test:mask@0.2)")
    parser.add_argument("--runs", default="runs/low_resource", help="comma-separated folders holding the weights")
    parser.add_argument("--out", default="benchmarks/results/low_resource")
    parser.add_argument("overrides", nargs="*", help="key=value applied to the block's recipes (as low_resource.py)")
    args = parser.parse_args(argv)
    from tokmask_peft.recipe_setup import Setup

    out = Path(args.out) / f"block_{args.block}"
    for name in args.strategies.split(","):
        sets = chosen_sets(Setup.from_recipe(strategy_recipe(args.block, name, [0], args.overrides)), args.sets)
        for root in args.runs.split(","):
            for weights in sorted((Path(root) / f"block_{args.block}" / name).glob("mask_*/seed_*")):
                copy = out / name / weights.relative_to(Path(root) / f"block_{args.block}" / name)
                if (weights / "metrics.json").is_file() and (copy / PREDICTIONS_FILE).is_file():
                    score_run(weights, copy, sets, args.k, args.rate)
    print(write_tables(out, args.k))


def write_tables(out: Path, k: int) -> str:
    """``tta.md`` and ``tta.json`` over every strategy and rate of the block with committed ensembles (not only
    those scored by this call), each on the sets every one of its seeds has."""
    lines, record = [], {}
    for name in [n for n in NAMES if (out / n).is_dir()]:
        for rate_copy in sorted((out / name).glob("mask_*")):
            per_seed = committed(rate_copy, k)
            if per_seed:
                lines += strategy_lines(f"{NAMES[name]}, {rate_copy.name}", per_seed, k)
                record.setdefault(name, {})[rate_copy.name] = {
                    str(s): {n: {"plain": _metrics(a), "ensemble": _metrics(b)} for n, (a, b) in by_set.items()}
                    for s, by_set in per_seed.items()}
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "tta.md", table)
    atomic_write_text(out / "tta.json", json.dumps({**environment(), "k": k, "scores": record}, indent=2))
    return table


def committed(rate_copy: Path, k: int) -> dict[int, dict[str, tuple[Predictions, Predictions]]]:
    """Seed → set → (plain, ensemble) from one rate's light copy, on the sets every seed's ensemble has."""
    files = {int(f.parent.name.split("_")[1]): f for f in sorted(rate_copy.glob(f"seed_*/tta_k{k}.npz"))}
    views = {s: load_predictions(f) for s, f in files.items()}
    common = [n for n in next(iter(views.values()), {}) if all(n in v for v in views.values())]
    plain = {s: load_predictions(f.parent / PREDICTIONS_FILE) for s, f in files.items()}
    return {s: {n: (plain[s][n], views[s][n]) for n in common} for s in files} if common else {}


def _metrics(p: Predictions) -> dict:
    return {k: v for k, v in classification_metrics(p.pred, p.gold, probs=p.probs).items()
            if k in ("weighted_f1", "ece")}


def strategy_lines(title: str, per_seed: dict, k: int) -> list[str]:
    """One row per set: mean weighted F1 and ECE plain → ensemble, and the ensemble's paired Δ on each."""
    sets = list(next(iter(per_seed.values())))
    lines = [f"{title}, {len(per_seed)} seed(s): plain → mean of {k} masked views (paired over seeds, "
             "interval over seeds and examples)", "", "| set | weighted F1 | Δ F1 [95 %] | ECE | Δ ECE [95 %] |",
             "|---|---|---|---|---|"]
    for set_name in sets:
        plain = {s: per_seed[s][set_name][0] for s in per_seed}
        views = {s: per_seed[s][set_name][1] for s in per_seed}
        cells = []
        for metric in ("weighted_f1", "ece"):
            before = np.mean([_metrics(p)[metric] for p in plain.values()])
            after = np.mean([_metrics(p)[metric] for p in views.values()])
            v = paired_verdict(k, views, plain, plain[next(iter(plain))].probs.shape[1], metric)
            cells += [f"{before:.3f} → {after:.3f}", f"{v.delta:+.3f} [{v.low:+.3f}, {v.high:+.3f}] {v.word}"]
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
