"""Where does token masking help? The low-resource evidence campaign (issue 19), block by block.

    python benchmarks/low_resource.py --block 1 [--seeds 0,1,2,3,4] [--strategies token,word,...]
        [--runs runs/low_resource] [--out benchmarks/results/low_resource]

Each block is one regime (model, method, data size); each strategy is one sweep of that regime's
recipe in ``RUNS/block_N/<strategy>``. The first strategy, ``token``, holds the shared p = 0 runs:
every strategy (R-Drop and NEFTune at p = 0 included) is judged against them, on dev where its rate
is picked and on the held-out ``test`` carve (``data.test_from_train``) where that pick is judged.
Sweeps resume where they stopped, so a block cut short continues on the next call; run a few seeds
of every strategy first (``--seeds 0,1,2``), then the rest. Not part of the test suite.

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

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.reporting import compare_sweeps  # noqa: E402
from tokmask_peft.runs import collect  # noqa: E402
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
    4: ("recipes/lowres_sa500_full.yaml", ["data.max_train_examples=2000"], ["token"]),
}
ROBUSTNESS_Q = 0.2


def strategy_sweep(block: int, name: str, seeds: list[int], runs: Path, extra: list[str]) -> Path:
    recipe_path, block_overrides, _ = BLOCKS[block]
    out = runs / f"block_{block}" / name
    recipe = Recipe.from_yaml(recipe_path, [*block_overrides, *STRATEGIES[name], f"sweep.seeds={seeds}", *extra])
    started = time.perf_counter()
    sweep(recipe, out)
    print(f"block {block} {name}: {time.perf_counter() - started:.0f} s", flush=True)
    return out


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
    sweeps = {name: strategy_sweep(args.block, name, seeds, runs, args.overrides) for name in names}
    for name, path in sweeps.items():
        light_copy(path, out / name, keep=("metrics.json", "tokmask_config.json", "predictions.npz"))
    copies = [out / name for name in sweeps]
    (out / "comparison.md").write_text(compare_sweeps(copies))
    (out / "robustness.md").write_text(robustness_table({name: out / name for name in sweeps}))
    print((out / "comparison.md").read_text(), (out / "robustness.md").read_text(), sep="\n")
    (out / "block.json").write_text(json.dumps(
        {**environment(), "block": args.block, "recipe": BLOCKS[args.block][0], "seeds": seeds,
         "strategies": {n: STRATEGIES[n] for n in names}, "overrides": args.overrides,
         "wall_time_s": round(time.perf_counter() - started, 1)}, indent=2))


if __name__ == "__main__":
    main()
