"""Where a LoRA training step's time goes, and what one pass over several rate adapters could buy.

    python benchmarks/step_anatomy.py [--shape qwen2.5-0.5b] [--steps 25] [--repeats 3] [--tiny]

A hand-written loop (no Accelerate, no Trainer) on real LinCE SA batches, length-grouped, batch 32,
bf16 autocast where a GPU is present. Variants, each on a fresh adapter over the same kept base:

- ``clip_all``: ``clip_grad_norm_(model.parameters())`` (walks the PEFT module tree every step);
- ``clip_trainable``: clipping a precomputed list of the trainable tensors;
- ``frozen_in_bf16``: also the frozen LoRA base linears stored in bf16 (GPU only: what autocast
  would cast them to on every forward anyway).

Then the one-pass bound: the same step on 6 × 32 rows (each batch repeated six times) against six
32-row steps. If a 192-row step costs little more than a 32-row one, training six rate adapters in
one pass over the shared frozen base could cost a fraction of six sequential runs.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_parser, decoder, lince_recipe, timed, write_result  # noqa: E402

from tokmask_peft.config import Recipe  # noqa: E402
from tokmask_peft.data import LengthGroupedBatches, padding_collator  # noqa: E402
from tokmask_peft.masking import TokenMasker, attach_masking  # noqa: E402
from tokmask_peft.modeling import cast_frozen_linears  # noqa: E402
from tokmask_peft.recipe_setup import Setup  # noqa: E402


def ms_per_step(step, batches: list[dict]) -> float:
    """Mean milliseconds of ``step`` over ``batches`` (``timed`` synchronises the device at both ends)."""
    return timed(lambda: [step(batch) for batch in batches]) / len(batches) * 1e3


def measure(setup: Setup, variant: str, batches: dict[str, list[dict]], device: torch.device, repeats: int) -> dict:
    """One variant on a fresh adapter: median ms per 32-row step (and per 192-row step for the bound)."""
    cuda = device.type == "cuda"
    model = setup.model_for(0, device).to(device)
    if variant != "clip_all" and cuda:
        cast_frozen_linears(model, torch.bfloat16)  # the kept base stays cast for later variants
    trainable = [p for p in model.parameters() if p.requires_grad]
    handle = attach_masking(model, TokenMasker.for_tokenizer(setup.tokenizer, setup.mask_token, 0.1, 0))
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    model.train()

    def step(batch):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        labels = batch.pop("labels")
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = torch.nn.functional.cross_entropy(model(**batch).logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters() if variant == "clip_all" else trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    out = {}
    for rows in ("rows_32", "rows_192") if variant == "one_pass_bound" else ("rows_32",):
        ms_per_step(step, batches[rows][:5])  # warm-up: kernels, allocator, new shapes
        out[rows] = statistics.median(ms_per_step(step, batches[rows][5:]) for _ in range(repeats))
    handle.remove()
    setup.release(model)
    return out


def length_grouped_batches(setup: Setup, steps: int, cuda: bool) -> dict[str, list[dict]]:
    """``steps + 5`` real 32-row batches (pinned on a GPU), and each of them repeated six times."""
    collate = padding_collator(setup.tokenizer, "sequence")
    sampler = LengthGroupedBatches([len(f["input_ids"]) for f in setup.train_features], 32, 0, True)
    batches = [collate([setup.train_features[i] for i in b]) for b in list(sampler)[:steps + 5]]
    pinned = [{k: v.pin_memory() if cuda else v for k, v in b.items()} for b in batches]
    return {"rows_32": pinned, "rows_192": [{k: torch.cat([v] * 6) for k, v in b.items()} for b in pinned]}


def main(argv=None) -> dict:
    args = benchmark_parser(__doc__, shape="qwen2.5-0.5b", steps=25, repeats=3).parse_args(argv)
    shape, steps, repeats = ("tiny", 3, 1) if args.tiny else (args.shape, args.steps, args.repeats)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    with decoder(shape) as (tmp, model_dir):
        recipe = Recipe.from_dict(lince_recipe(model_dir, tmp / "run",
                                               data={"max_train_examples": 64 * (steps + 5), "max_eval_examples": 8},
                                               train={"mixed_precision": "bf16" if cuda else "no"}))
        setup = Setup.from_recipe(recipe)
        batches = length_grouped_batches(setup, steps, cuda)
        ms = {}
        for variant in ["clip_all", "clip_trainable"] + (["frozen_in_bf16"] if cuda else []) + ["one_pass_bound"]:
            ms[variant] = measure(setup, variant, batches, device, repeats)
            print(f"{variant:16s} " + "  ".join(f"{k}: {v:7.1f} ms/step" for k, v in ms[variant].items()), flush=True)
    bound = ms["one_pass_bound"]["rows_192"] / (6 * ms["one_pass_bound"]["rows_32"])
    print(f"one 6 x 32-row step = {bound:.2f}x six 32-row steps ({shape}, {device.type}): the bound for training "
          f"six rate adapters in one pass")
    result = {"shape": shape, "device": device.type, "steps": steps, "repeats": repeats, "ms_per_step": ms,
              "one_pass_vs_six_steps": bound}
    write_result("step_anatomy" + ("_tiny" if args.tiny else "") + ("_gpu" if cuda else ""), result, args.out)
    return result


if __name__ == "__main__":
    main()
