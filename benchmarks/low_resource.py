"""Where does token masking help? The low-resource evidence campaign (issue 19), block by block.

    python benchmarks/low_resource.py --block 1 [--seeds 0,1,2,3,4] [--strategies token,word,...]
        [--runs runs/low_resource] [--out benchmarks/results/low_resource]

Each block is one regime (model, method, data size); each strategy is one sweep of that regime's
recipe in ``RUNS/block_N/<strategy>``. The first strategy, ``token``, holds the shared p = 0 runs:
every strategy (R-Drop and NEFTune at p = 0 included) is judged against them, on dev where its rate
is picked and on the held-out ``test`` carve (``data.test_from_train``) where that pick is judged.
Seeds run one at a time across strategies; a seed whose results are already in the committed light
copy (OUT) is not trained again, even on a new machine, and a block cut short continues on the next
call. Not part of the test suite.

Writes ``OUT/block_N/``: a light copy of every sweep (results, each run's metrics.json,
tokmask_config.json and predictions.npz in the mask_*/seed_* layout, so ``tokmask report`` rebuilds
it), ``comparison.md`` (the verdicts), ``robustness.md`` and ``block.json`` (what ran, how long).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment  # noqa: E402
from real_data import light_copy  # noqa: E402

import yaml  # noqa: E402

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.grid import run_recipe  # noqa: E402
from tokmask_peft.reporting import compare_sweeps, report  # noqa: E402
from tokmask_peft.runs import (collect, fingerprint_diff, has_results, read_run_config, run_dir,  # noqa: E402
                               run_fingerprint)
from tokmask_peft.storage import atomic_write_text  # noqa: E402
from tokmask_peft.sweeps import sweep  # noqa: E402

MASKED = "sweep.rates=[0.1,0.3]"
STRATEGIES = {
    "token": ["sweep.rates=[0.0,0.1,0.3]"],                      # uniform token masking + the shared p = 0
    "word": ["masking.unit=word", MASKED],                        # whole-word masking
    "token_consistency": ["masking.consistency=1.0", MASKED],     # masking + the consistency term
    "rdrop": ["masking.consistency=1.0", "sweep.rates=[0.0]"],    # the consistency term alone (R-Drop)
    "neftune": ["train.neftune_alpha=5.0", "sweep.rates=[0.0]"],  # the peer: noise on input embeddings
}
BLOCKS = {
    1: ("recipes/lowres_sa500_full.yaml", [], list(STRATEGIES)),
    2: ("recipes/lowres_sa500_lora.yaml", [], list(STRATEGIES)),
    3: ("recipes/lowres_lid1000_lora.yaml", [], ["token", "word"]),
    # Blocks 4 and 6 take block 1's two (one) best strategies by its *dev* Δ: consistency (+0.0051), word (+0.0043).
    4: ("recipes/lowres_sa500_full.yaml", ["data.max_train_examples=2000"], ["token", "token_consistency", "word"]),
    6: ("recipes/lowres_empythy500_full.yaml", [], ["token", "token_consistency"]),
}
ROBUSTNESS_Q = 0.2


def strategy_recipe(block: int, name: str, seeds: list[int], extra: list[str]) -> Recipe:
    recipe_path, block_overrides, _ = BLOCKS[block]
    return Recipe.from_yaml(recipe_path, [*block_overrides, *STRATEGIES[name], f"sweep.seeds={seeds}", *extra])


def missing_rates(copy: Path, recipe: Recipe, seed: int) -> list[float]:
    """The rates of ``seed`` without results in the committed light copy: ``runs/`` (the weights) is not
    committed, so a new machine would otherwise train every finished run again."""
    missing = []
    for rate in recipe.sweep.rates:
        run = run_dir(copy, rate, seed)
        if not has_results(run):
            missing.append(rate)
        elif fingerprint_diff(read_run_config(run).get("recipe", {}),
                              run_fingerprint(run_recipe(recipe, rate, seed)), shared_keys_only=True):
            raise ValueError(f"{run} holds results of another recipe than block {copy.parent.name}'s "
                             f"{copy.name}: move it away before extending the block")
    return missing


def strategy_seed(block: int, name: str, seed: int, runs: Path, copy: Path, extra: list[str]) -> None:
    """Train one seed of one strategy at the rates not committed yet, folding each run into the light
    copy as soon as it finishes (a run is minutes to an hour on a CPU)."""
    for rate in missing_rates(copy, strategy_recipe(block, name, [seed], extra), seed):
        started = time.perf_counter()
        sweep(strategy_recipe(block, name, [seed], [*extra, f"sweep.rates=[{rate}]"]), runs / f"block_{block}" / name)
        light_copy(runs / f"block_{block}" / name, copy, keep=("metrics.json", "tokmask_config.json", "predictions.npz"))
        print(f"block {block} {name} seed {seed} rate {rate}: {time.perf_counter() - started:.0f} s", flush=True)


def robustness_table(sweeps: dict[str, Path]) -> str:
    """Mean weighted F1 over seeds at q = 0.2, each corruption, for each strategy's rates."""
    kinds = ("delete", "mask", "typo")
    lines = [f"Dev weighted F1 under corruption at q = {ROBUSTNESS_Q} (mean over seeds).", "",
             "| strategy | rate | seeds | clean | " + " | ".join(kinds) + " |", "|---|---|---|---|---|---|---|"]
    for name, out in sweeps.items():
        rows = collect(out)
        for rate in sorted({r["rate"] for r in rows}):
            group = [r for r in rows if r["rate"] == rate]
            cells = []
            for kind in kinds:
                values = [r.get(f"{kind}_{ROBUSTNESS_Q:.2f}_weighted_f1") for r in group]
                cells.append(f"{statistics.fmean(values):.4f}" if None not in values else "–")
            clean = statistics.fmean(r["weighted_f1"] for r in group)
            lines.append(f"| {name} | {rate:.2f} | {len(group)} | {clean:.4f} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--block", type=int, required=True, choices=sorted(BLOCKS))
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--strategies", help="comma-separated subset of the block's strategies")
    parser.add_argument("--runs", default="runs/low_resource")
    parser.add_argument("--out", default="benchmarks/results/low_resource")
    parser.add_argument("overrides", nargs="*", help="key=value applied to every sweep of the block")
    args = parser.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    names = args.strategies.split(",") if args.strategies else BLOCKS[args.block][2]
    unknown = set(names) - set(STRATEGIES)
    if unknown:
        parser.error(f"unknown strategies {sorted(unknown)}; choose from {list(STRATEGIES)}")
    if names[0] != "token":
        names = ["token", *[n for n in names if n != "token"]]  # the shared p = 0 comes first
    runs, out = Path(args.runs), Path(args.out) / f"block_{args.block}"
    started = time.perf_counter()
    for seed in seeds:  # seed by seed across strategies: a block cut short stays balanced
        for name in names:
            strategy_seed(args.block, name, seed, runs, out / name, args.overrides)
        write_block_report(args.block, names, out, args.overrides, time.perf_counter() - started)


def write_block_report(block: int, names: list[str], out: Path, overrides: list[str], wall_s: float) -> None:
    """Each strategy's table over every committed seed, then the verdicts and robustness of the block."""
    copies = [out / name for name in names]
    seeds = sorted({int(p.name.split("_")[1]) for copy in copies for p in copy.glob("mask_*/seed_*")})
    for name, copy in zip(names, copies):
        recipe = strategy_recipe(block, name, seeds, overrides)
        atomic_write_text(copy / "recipe.yaml", yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        report(copy)
    atomic_write_text(out / "comparison.md", compare_sweeps(copies))
    atomic_write_text(out / "robustness.md", robustness_table(dict(zip(names, copies))))
    print((out / "comparison.md").read_text(), (out / "robustness.md").read_text(), sep="\n", flush=True)
    atomic_write_text(out / "block.json", json.dumps(
        {**environment(), "block": block, "recipe": BLOCKS[block][0], "seeds": seeds,
         "strategies": {n: STRATEGIES[n] for n in names}, "overrides": overrides,
         "wall_time_s_of_last_call": round(wall_s, 1)}, indent=2))


if __name__ == "__main__":
    main()
