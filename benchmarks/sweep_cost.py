"""Target 3: a 6-rate sweep in one process against 6 independent runs, each its own process
and base load (≤ 0.4×).

    python benchmarks/sweep_cost.py [--shape small] [--train 256] [--repeats 2] [--tiny]

Both train the same six (rate, seed 0) runs; the sweep loads tokenizer, data and base once and
re-creates only the adapter per run. Whole wall times alternate sweep, independent, sweep, …
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_parser, decoder, lince_recipe, median, write_result  # noqa: E402

RATES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5]


def tokmask(*args) -> None:
    subprocess.run([sys.executable, "-m", "tokmask_peft.cli", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__, shape="small", train=256, repeats=2).parse_args(argv)
    shape, n_train, repeats, rates = ("tiny", 32, 1, RATES[:2]) if args.tiny else \
        (args.shape, args.train, args.repeats, RATES)
    times = {"sweep": [], "independent": []}
    with decoder(shape) as (tmp, model_dir):
        recipe = lince_recipe(model_dir, tmp / "run",
                              data={"max_train_examples": n_train, "max_eval_examples": 128},
                              sweep={"rates": rates, "seeds": [0]})
        path = tmp / "recipe.yaml"
        path.write_text(yaml.safe_dump(recipe))
        for i in range(repeats):
            start = time.perf_counter()
            tokmask("sweep", path, "--output", tmp / f"sweep{i}")
            times["sweep"].append(time.perf_counter() - start)
            start = time.perf_counter()
            for rate in rates:
                tokmask("train", path, f"masking.rate={rate}", f"train.output_dir={tmp / f'ind{i}' / str(rate)}")
            times["independent"].append(time.perf_counter() - start)
            print(f"repeat {i}: sweep {times['sweep'][-1]:.1f} s, {len(rates)} independent runs "
                  f"{times['independent'][-1]:.1f} s")
            shutil.rmtree(tmp / f"sweep{i}")
            shutil.rmtree(tmp / f"ind{i}")
    ratio = median(times["sweep"]) / median(times["independent"])
    result = {"shape": shape, "train_examples": n_train, "rates": rates, "repeats": repeats, "seconds": times,
              "cost_ratio": ratio, "target": "<= 0.4"}
    print(f"sweep cost ({shape}, {len(rates)} rates, {n_train} examples each): "
          f"{median(times['sweep']):.1f} s vs {median(times['independent']):.1f} s -> {ratio:.2f}x (target <= 0.4)")
    write_result("sweep_cost" + ("_tiny" if args.tiny else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
