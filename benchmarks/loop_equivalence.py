"""Is our loop the HF Trainer's computation? Both train the same model on the same batches with dropout off
(issue 38's peer): if they are, their test scores agree to float rounding and any gap between the two in
``tasks.py``'s campaign is the draw of batch order and dropout, not the loop.

    python benchmarks/loop_equivalence.py --task goemotions --method lora [--train-examples 640] [--epochs 2]
    python benchmarks/loop_equivalence.py --tiny     # seconds, a tiny random encoder

Same recipe and features as ``tasks.py`` (its ``job_recipe`` and ``peer_run``), at p = 0, seed 0, no early
stopping; the Trainer is handed our length-grouped batch order (``LengthGroupedBatches``, epoch by epoch)
in place of its own sampler, and every dropout (LoRA's too) is set to 0 in both. Reports the largest
difference in a test probability and how many test decisions differ. One known difference remains:
warmup of a fractional number of updates (``warmup_ratio`` x updates) is rounded down here and up by the
Trainer, one update of a smaller learning rate; the defaults (640 examples, 2 epochs: 40 updates, 4 of
warmup) and ``--tiny`` (10, 1) avoid it.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).parent))
from _common import benchmark_parser, write_result  # noqa: E402
from tasks import job_paths, job_recipe, peer_run, tiny_encoder  # noqa: E402

from tokmask_peft.data import LengthGroupedBatches  # noqa: E402
from tokmask_peft.recipe_setup import Setup  # noqa: E402
from tokmask_peft.runs import PREDICTIONS_FILE, load_predictions  # noqa: E402
from tokmask_peft.training import train  # noqa: E402


def without_dropout(setup: Setup) -> Setup:
    """``setup`` whose models come with every dropout at 0: the loops then draw nothing at random."""
    build = setup.model_for

    def model_for(*args, **kwargs):
        model = build(*args, **kwargs)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        return model

    setup.model_for = model_for
    return setup


def our_batches_for_the_trainer(recipe):
    """A ``Trainer.get_train_dataloader`` yielding our loop's batches (the Trainer calls ``set_epoch``)."""
    tc = recipe.train

    def get_train_dataloader(trainer):
        lengths = [len(f["input_ids"]) for f in trainer.train_dataset]
        batches = LengthGroupedBatches(lengths, tc.batch_size, tc.seed, tc.group_by_length)
        return trainer.accelerator.prepare(DataLoader(trainer.train_dataset, batch_sampler=batches,
                                                      collate_fn=trainer.data_collator))

    return get_train_dataloader


def compare(task: str, method: str, out: Path, tiny: str | None, examples: int, epochs: int) -> dict:
    from transformers import Trainer

    shutil.rmtree(out, ignore_errors=True)
    recipe = job_recipe(task, method, [0], out / "runs", tiny).with_overrides(
        [f"data.max_train_examples={examples}", f"train.epochs={epochs}", "model.lora_dropout=0.0",
         "train.patience=0", "masking.rate=0.0", "train.seed=0"])
    ours = train(recipe, without_dropout(Setup.from_recipe(recipe)), out / "ours")
    keep = out / "peer"
    keep.mkdir(parents=True)
    original, Trainer.get_train_dataloader = Trainer.get_train_dataloader, our_batches_for_the_trainer(recipe)
    try:
        peer = peer_run(recipe, without_dropout(Setup.from_recipe(recipe)), 0, out / "peer_run", keep)
    finally:
        Trainer.get_train_dataloader = original
    a = load_predictions(out / "ours" / PREDICTIONS_FILE)["test"]
    b = load_predictions(keep / PREDICTIONS_FILE)["test"]
    order = np.argsort(a.example, kind="stable")  # ours in example order, as the Trainer predicts
    return {"task": task, "method": method, "metric": recipe.train.metric, "train_examples": examples,
            "epochs": epochs, "steps": {"ours": ours["steps"], "trainer": peer["steps"]},
            "test": {"ours": ours["extra_eval"]["test"][recipe.train.metric], "trainer": peer["test"]},
            "max_abs_prob_diff": float(np.abs(a.probs[order].astype(np.float64) - b.probs).max()),
            "decisions_differ": int((a.pred[order] != b.pred).sum()), "decisions": int(b.pred.size)}


def main() -> None:
    parser = benchmark_parser(__doc__, task="goemotions", method="lora", train_examples=640, epochs=2)
    args = parser.parse_args()
    out = Path(args.out)
    tiny = tiny_encoder(out) if args.tiny else None
    name = f"loop_equivalence_{args.task}_{args.method}" + ("_tiny" if tiny else "")
    work = job_paths(args.task, args.method, out, tiny)[1].with_name(name)
    # 10 updates on --tiny: warmup (ratio 0.1) is then one whole update in both loops, which round a
    # fractional one differently (ours down, the Trainer up)
    result = compare(args.task, args.method, work, tiny, 64 if tiny else args.train_examples,
                     5 if tiny else args.epochs)
    shutil.rmtree(work, ignore_errors=True)
    write_result(name, result, out)
    print(result)


if __name__ == "__main__":
    main()
