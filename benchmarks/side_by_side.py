"""Issue 23: a sweep's rates trained side by side in one pass (``sweep.side_by_side``, once ``sweep.pack``)
against one run after another.

    python benchmarks/side_by_side.py [--shape small] [--train 256] [--rates 6] [--method lora]
        [--bf16] [--repeats 1] [--tiny]

Both sides train the same K rates of seed 0 with the CLI's ``tokmask sweep``, each sweep in a fresh
process (so each has its own peak memory), alternating side by side, one-by-one, side by side, … Reported: the
whole sweep's wall time (one base load on either side) and the time inside the runs (training,
evaluations, saving), the largest per-run peak memory (side by side: the group's), and how far the two sides' dev weighted F1 lie apart per rate (dropout is off in
these random-weight decoders, so they train the same adapters up to rounding).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_parser, decoder, lince_recipe, median, write_result  # noqa: E402


def run_sweep(recipe: Path, out: Path, pack: int) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "tokmask_peft.cli", "sweep", str(recipe), f"sweep.side_by_side={pack}",
                    "--output", str(out)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def runs(out: Path) -> dict[float, dict]:
    found = {}
    for path in sorted(out.glob("mask_*/seed_0/metrics.json")):
        found[float(path.parent.parent.name.split("_")[1])] = json.loads(path.read_text())
    return found


def training_seconds(metrics, packed: bool) -> float:
    """Time inside the runs (training, evaluations, saving; no process start or base load): one after
    another they add up; a pack's slots all start together, so the last one to finish has it all."""
    walls = [m["wall_time_s"] for m in metrics]
    return max(walls) if packed else sum(walls)


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__, shape="small", train=256, rates=6, method="lora", bf16=False,
                            repeats=1).parse_args(argv)
    shape, n_train, k, repeats = ("tiny", 32, 2, 1) if args.tiny else (args.shape, args.train, args.rates, args.repeats)
    rates = [round(0.1 * i, 2) for i in range(k)]
    times: dict[str, list[float]] = {"packed": [], "one_by_one": []}
    inside: dict[str, list[float]] = {"packed": [], "one_by_one": []}
    with decoder(shape) as (tmp, model_dir):
        recipe = lince_recipe(model_dir, tmp / "run", data={"max_train_examples": n_train, "max_eval_examples": 128},
                              model={"method": args.method},
                              train={"mixed_precision": "bf16" if args.bf16 else "no", "eval_batch_size": 64},
                              sweep={"rates": rates, "seeds": [0]})
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        found = {}
        for i in range(repeats):
            for side, pack in (("packed", k), ("one_by_one", 0)):
                out = tmp / f"{side}{i}"
                times[side].append(run_sweep(path, out, pack))
                found[side] = runs(out)
                inside[side].append(training_seconds(found[side].values(), packed=pack > 1))
                shutil.rmtree(out)
            print(f"repeat {i}: packed {times['packed'][-1]:.1f} s, one by one {times['one_by_one'][-1]:.1f} s")
    packed, single = found["packed"], found["one_by_one"]
    f1_gap = max(abs(packed[r]["best"]["weighted_f1"] - single[r]["best"]["weighted_f1"]) for r in rates)
    peak = {side: max(m["peak_memory_mb"] for m in found[side].values()) for side in found}
    ratio = median(times["packed"]) / median(times["one_by_one"])
    inside_ratio = median(inside["packed"]) / median(inside["one_by_one"])
    result = {"shape": shape, "method": args.method, "bf16": args.bf16, "train_examples": n_train, "rates": rates,
              "repeats": repeats, "seconds": times, "wall_ratio": ratio, "target": "<= 0.35 on a GPU",
              "seconds_inside_runs": inside, "inside_runs_ratio": inside_ratio,
              "peak_memory_mb": peak, "peak_memory_kind": next(iter(packed.values()))["peak_memory_kind"],
              "max_dev_weighted_f1_gap": f1_gap}
    print(f"{k}-rate sweep ({shape}, {args.method}{', bf16' if args.bf16 else ''}, {n_train} examples): packed "
          f"{median(times['packed']):.1f} s vs one by one {median(times['one_by_one']):.1f} s -> {ratio:.2f}x "
          f"(inside the runs {median(inside['packed']):.1f} vs {median(inside['one_by_one']):.1f} s -> {inside_ratio:.2f}x); "
          f"peak memory {peak['packed']:.0f} vs {peak['one_by_one']:.0f} MiB; dev wF1 gap {f1_gap:.4f}")
    write_result(f"side_by_side_{shape}_{args.method}" + ("_bf16" if args.bf16 else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
