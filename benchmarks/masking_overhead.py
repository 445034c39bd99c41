"""Target 1: training-step time at p = 0.1 against p = 0 on the same batches (≤ 1 % overhead).

    python benchmarks/masking_overhead.py [--shape medium] [--repeats 15] [--tiny]

One LoRA model; each repetition runs the same batch twice, masking hook on (p = 0.1) and off,
alternating; the figure is the ratio of the medians.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternate, benchmark_parser, decoder, lora_step_parts, median, write_result  # noqa: E402

from tokmask_peft.masking import TokenMasker, attach_masking  # noqa: E402


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__, shape="medium", batch=32, repeats=15).parse_args(argv)
    shape, repeats = ("tiny", 2) if args.tiny else (args.shape, args.repeats)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with decoder(shape) as (tmp, model_dir):
        setup, model, optimizer, batch, labels = lora_step_parts(model_dir, tmp, args.batch, device)
        masker = TokenMasker.for_tokenizer(setup.tokenizer, setup.mask_token, rate=0.1, seed=0)

        def step():
            loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        def masked_step():
            handle = attach_masking(model, masker)
            step()
            handle.remove()

        times = alternate({"p=0.1": masked_step, "p=0": step}, repeats=repeats, warmup=2)
    ratio = median(times["p=0.1"]) / median(times["p=0"])
    result = {"shape": shape, "batch": [args.batch, int(batch["input_ids"].shape[1])], "repeats": repeats,
              "device": str(device), "median_step_s": {k: median(v) for k, v in times.items()},
              "overhead_ratio": ratio, "target": "<= 1.01"}
    print(f"masking overhead ({shape}, batch {args.batch}x{batch['input_ids'].shape[1]}, {device}): "
          f"step {median(times['p=0']) * 1e3:.1f} ms at p=0, {median(times['p=0.1']) * 1e3:.1f} ms at p=0.1 "
          f"-> ratio {ratio:.4f} (target <= 1.01)")
    write_result("masking_overhead" + ("_tiny" if args.tiny else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
