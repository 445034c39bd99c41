"""Cost of a training step per masking strategy, against uniform token masking, in one run.

    python benchmarks/masking_strategies.py [--shape medium] [--repeats 15] [--tiny]

One LoRA model, one batch of the longest LinCE SA tweets (with word ids), p = 0.15. Each repetition
runs every variant once, alternating: token (the reference), word, span, bert (80/10/10), deletion
(token and whole-word: the chosen units dropped, the rows shortened), and token masking plus the consistency term with gradients through both passes and with the clean
pass as a stop-gradient target. Targets: word/span/bert/delete <= 1.02x, consistency <= 1.6x.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import alternate, benchmark_parser, decoder, lora_step_parts, median, write_result  # noqa: E402

from tokmask_peft.masking import TokenMasker, attach_masking, consistency_term  # noqa: E402

VARIANTS = {  # name: (strategy, consistency: None | "both" | "stop_grad")
    "token": ({}, None), "word": ({"unit": "word"}, None), "span": ({"unit": "span"}, None),
    "bert": ({"replace": "bert"}, None), "delete": ({"replace": "delete"}, None),
    "word_delete": ({"unit": "word", "replace": "delete"}, None),
    "consistency": ({}, "both"), "consistency_stop_grad": ({}, "stop_grad"),
}
TARGETS = {"word": 1.02, "span": 1.02, "bert": 1.02, "delete": 1.02, "word_delete": 1.02, "consistency": 1.6}


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__, shape="medium", batch=32, repeats=15).parse_args(argv)
    shape, repeats = ("tiny", 2) if args.tiny else (args.shape, args.repeats)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with decoder(shape) as (tmp, model_dir):
        setup, model, optimizer, batch, labels = lora_step_parts(model_dir, tmp, args.batch, device, word_ids=True)

        def step_for(strategy: dict, consistency: str | None):
            masker = TokenMasker.for_tokenizer(setup.tokenizer, setup.mask_token, rate=0.15, seed=0, **strategy)

            def step():
                handle = attach_masking(model, masker)
                logits = model(**batch).logits
                loss = torch.nn.functional.cross_entropy(logits, labels)
                if consistency:
                    loss = loss + consistency_term(model, batch, logits, masker, labels, consistency == "stop_grad")
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                handle.remove()

            return step

        times = alternate({name: step_for(*v) for name, v in VARIANTS.items()}, repeats=repeats, warmup=2)
    reference = median(times["token"])
    ratios = {name: median(t) / reference for name, t in times.items() if name != "token"}
    result = {"shape": shape, "batch": list(batch["input_ids"].shape), "repeats": repeats, "device": str(device),
              "median_step_s": {k: median(v) for k, v in times.items()}, "ratio_vs_token": ratios,
              "targets": {k: f"<= {v}" for k, v in TARGETS.items()}}
    print(f"step cost vs token masking ({shape}, batch {tuple(batch['input_ids'].shape)}, {device}, "
          f"token step {reference * 1e3:.1f} ms):")
    for name, ratio in ratios.items():
        target = f" (target <= {TARGETS[name]})" if name in TARGETS else ""
        print(f"  {name:22s} {ratio:.3f}x{target}")
    write_result("masking_strategies" + ("_tiny" if args.tiny else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
