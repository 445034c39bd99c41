"""Masked-view ensembles at inference (issue 40, the RanMASK idea): does averaging K masked views of each
input change clean F1, F1 under shifts, or calibration? Scored, not retrained.

    python benchmarks/tta.py --block 7 [--strategies none,word_p1] [--k 8] [--runs runs/low_resource]

For each finished run of the block's strategies (their weights under RUNS), every held-out set and its
shifted copies are scored twice with the same weights: plainly, and as the mean of K views drawn with the
adapter's own unit and replacement at its training rate (at p = 0, at ``--rate``, default 0.1). Per
(strategy, set): weighted F1 and ECE (15 bins) with and without the ensemble, and the ensemble's paired Δ
over seeds with the two-level bootstrap interval and verdict. Writes ``OUT/block_N/tta.md`` and ``tta.json``.
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
from tokmask_peft.runs import Predictions, TOKMASK_CONFIG  # noqa: E402
from tokmask_peft.storage import atomic_write_text  # noqa: E402
from tokmask_peft.verdicts import paired_verdict  # noqa: E402


def scored(clf, examples, features, k: int, rate: float | None) -> Predictions:
    """Predictions on one set (its features as the run saw them), plain (k = 0) or as a K-view ensemble."""
    import torch

    features = [{key: v for key, v in f.items() if key != "labels"} for f in features]
    rows = [row for row, _ in clf.forward(examples, features, batch_size=64, tta=k, tta_rate=rate)]
    probs = torch.stack(rows).softmax(-1).numpy()
    labels = {label: i for i, label in enumerate(clf.labels)}
    gold = np.array([labels[e.label] for e in examples])
    return Predictions(np.arange(len(gold)), gold, probs.argmax(1), probs)


def score_run(run: Path, setup, k: int, rate: float) -> dict[str, tuple[Predictions, Predictions]]:
    """Every held-out set and shifted copy of ``run``: (plain, ensemble) predictions."""
    from tokmask_peft.inference import Classifier
    from tokmask_peft.robustness import condition_name, conditions

    clf = Classifier.from_run(run, device="cpu")
    trained_at = json.loads((run / TOKMASK_CONFIG).read_text())["masking"]["rate"]
    tc, out = setup.recipe.train, {}
    kinds = tc.robustness_conditions or ["delete", "mask", "typo"]
    for name, examples in setup.extra_examples.items():
        copies = {name: setup.extra_features[name]}
        for kind, q in conditions(kinds, tc.robustness):
            if not (kind.startswith("entities") and not setup.tagged(name)):
                copies[f"{name}:{condition_name(kind, q)}"] = setup.robustness_features(kind, q, name)
        for set_name, features in copies.items():
            out[set_name] = (scored(clf, examples, features, 0, None),
                             scored(clf, examples, features, k, trained_at or rate))
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, default=7, choices=sorted(BLOCKS))
    parser.add_argument("--strategies", default="none,word_p1")
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.1, help="the views' rate for runs trained at p = 0")
    parser.add_argument("--runs", default="runs/low_resource")
    parser.add_argument("--out", default="benchmarks/results/low_resource")
    args = parser.parse_args(argv)
    from tokmask_peft.recipe_setup import Setup

    lines, record = [], {}
    for name in args.strategies.split(","):
        folder = Path(args.runs) / f"block_{args.block}" / name
        runs = sorted(p for p in folder.glob("mask_*/seed_*") if (p / "metrics.json").is_file())
        if not runs:
            print(f"{folder}: no finished runs with weights; train the block first", file=sys.stderr)
            continue
        setup = Setup.from_recipe(strategy_recipe(args.block, name, [0], []))
        per_seed = {int(r.name.split("_")[1]): score_run(r, setup, args.k, args.rate) for r in runs}
        lines += strategy_lines(name, per_seed, args.k)
        record[name] = {str(s): {set_name: {"plain": _metrics(a), "ensemble": _metrics(b)}
                                 for set_name, (a, b) in sets.items()} for s, sets in per_seed.items()}
    out = Path(args.out) / f"block_{args.block}"
    table = "\n".join(lines) + "\n"
    atomic_write_text(out / "tta.md", table)
    atomic_write_text(out / "tta.json", json.dumps({**environment(), "k": args.k, "scores": record}, indent=2))
    print(table)


def _metrics(p: Predictions) -> dict:
    return {k: v for k, v in classification_metrics(p.pred, p.gold, probs=p.probs).items()
            if k in ("weighted_f1", "ece")}


def strategy_lines(name: str, per_seed: dict, k: int) -> list[str]:
    """One row per set: mean weighted F1 and ECE plain → ensemble, and the ensemble's paired Δ on each."""
    sets = list(next(iter(per_seed.values())))
    lines = [f"{NAMES[name]}, {len(per_seed)} seed(s): plain → mean of {k} masked views (paired over seeds, "
             "two-level bootstrap)", "", "| set | weighted F1 | Δ F1 [95 %] | ECE | Δ ECE [95 %] |",
             "|---|---|---|---|---|"]
    for set_name in sets:
        plain = {s: per_seed[s][set_name][0] for s in per_seed}
        views = {s: per_seed[s][set_name][1] for s in per_seed}
        cells = []
        for metric in ("weighted_f1", "ece"):
            before = np.mean([_metrics(p)[metric] for p in plain.values()])
            after = np.mean([_metrics(p)[metric] for p in views.values()])
            v = paired_verdict(k, views, plain, len(plain[next(iter(plain))].probs[0]), metric)
            cells += [f"{before:.3f} → {after:.3f}", f"{v.delta:+.3f} [{v.low:+.3f}, {v.high:+.3f}] {v.word}"]
        lines.append(f"| {set_name} | " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    main()
