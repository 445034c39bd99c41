"""sweep.side_by_side: K rates of one seed trained side by side equal the K runs trained one by one."""
import json
import shutil

import pytest
import torch
from helpers import logged_losses
from safetensors.torch import load_file

from tokmask_peft.sweeps import groups
from tokmask_peft.adapter_slots import AdapterSlots, replicate
from tokmask_peft.recipe_setup import Setup
from tokmask_peft.sweeps import sweep
from tokmask_peft.evaluation import eval_loader

RATES = ("0.00", "0.10", "0.30")


def without_dropout(tiny_model, kind, tmp_path):
    """The tiny model with its dropout off: packed and lone runs then draw nothing differently."""
    path = tmp_path / f"{kind}-no-dropout"
    shutil.copytree(tiny_model(kind), path)
    config = json.loads((path / "config.json").read_text())
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (path / "config.json").write_text(json.dumps(config))
    return str(path)


def packed_and_lone(recipe, tmp_path):
    """The same sweep trained one run after another, then side by side."""
    outs = {}
    for pack in (0, 3):
        outs[pack] = tmp_path / f"pack{pack}"
        sweep(recipe.with_overrides([f"sweep.side_by_side={pack}"]), outs[pack])
    return outs[0], outs[3]


def flat(tree: dict, prefix: str = "") -> dict:
    """A nested metrics dict as ``{"delete/0.2/weighted_f1": value}``."""
    out = {}
    for key, value in tree.items():
        out.update(flat(value, f"{prefix}{key}/") if isinstance(value, dict) else {prefix + key: value})
    return out


def assert_same_runs(lone, packed, atol):
    for rate in RATES:
        a, b = lone / f"mask_{rate}" / "seed_0", packed / f"mask_{rate}" / "seed_0"
        assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
        la, lb = logged_losses(a), logged_losses(b)
        assert len(la) == len(lb)  # the same number of updates: a slot stops where its lone run stopped
        assert lb[0] == pytest.approx(la[0], abs=1e-5)  # before any update: a wrong rate or mixed slots shows here
        torch.testing.assert_close(torch.tensor(lb), torch.tensor(la), rtol=1e-4, atol=atol)
        torch.testing.assert_close(load_file(b / "adapter_model.safetensors"),
                                   load_file(a / "adapter_model.safetensors"), rtol=1e-4, atol=atol)
        ma, mb = (json.loads((run / "metrics.json").read_text()) for run in (a, b))
        assert mb["best"]["step"] == ma["best"]["step"] and mb["stopped_early"] == ma["stopped_early"]
        assert mb["best"]["weighted_f1"] == pytest.approx(ma["best"]["weighted_f1"], abs=1e-6)
        assert (mb["trainable_params"], mb["total_params"]) == (ma["trainable_params"], ma["total_params"])
        assert flat(mb["robustness"]) == pytest.approx(flat(ma["robustness"]), abs=1e-4)
        assert mb["side_by_side"]["rates"] == [0.0, 0.1, 0.3] and "side_by_side" not in ma


@pytest.mark.slow
@pytest.mark.parametrize("method,bits", [("lora", 4), ("qlora", 8), ("qlora", 4)], ids=["lora", "qlora-8bit", "qlora-4bit"])
def test_pack_equals_runs_one_by_one_with_early_stopping(make_recipe, tmp_path, method, bits):
    # lr and patience chosen so that with LoRA the rates stop after different numbers of updates (18, 12, 18)
    recipe = make_recipe("llama", "sequence", method, model={"quant_bits": bits}, train={"epochs": 5, "lr": 2e-2, "patience": 1},
                         sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0]})
    lone, packed = packed_and_lone(recipe, tmp_path)
    steps = [json.loads((lone / f"mask_{r}" / "seed_0" / "metrics.json").read_text())["steps"] for r in RATES]
    if method == "lora":  # (QLoRA: all three may stop together)
        assert len(set(steps)) > 1, f"every rate stopped at the same step {steps}: the test would not cover stopping"
    # Equal up to float32 rounding, which depends on the CPU's kernels: bit-identical on one Intel host; on an
    # AMD EPYC the first losses agree to 1e-6 and, at this lr (2e-2), the drift reaches 7e-4 in a loss or an
    # adapter weight (of ~0.2) by the last update. Stop and best steps must still match exactly.
    assert_same_runs(lone, packed, atol=2e-3)


@pytest.mark.slow
def test_pack_of_taggers_with_word_masking_and_consistency(make_recipe, tiny_model, tmp_path):
    recipe = make_recipe("bert", "token", model={"name": without_dropout(tiny_model, "bert", tmp_path)},
                         masking={"unit": "word", "consistency": 1.0}, train={"epochs": 2},
                         sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0]})
    assert_same_runs(*packed_and_lone(recipe, tmp_path), atol=1e-5)


def test_pack_with_new_mask_row_loads_as_a_plain_run(make_recipe, tmp_path):
    """Qwen has no mask token: each slot trains its own <mask> row; a packed run loads like any run."""
    from tokmask_peft import Classifier

    recipe = make_recipe("qwen", train={"epochs": 2, "robustness": [0.2]}, sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0]})
    lone, packed = packed_and_lone(recipe, tmp_path)
    assert_same_runs(lone, packed, atol=1e-4)  # batched matmuls round differently from one linear at a time
    assert json.loads((packed / "mask_0.10" / "seed_0" / "metrics.json").read_text())["robustness"]["mask"]["0.2"]
    texts = ["the good movie", "el perro malo"]
    a = Classifier.from_run(lone / "mask_0.30" / "seed_0").logits(texts)
    b = Classifier.from_run(packed / "mask_0.30" / "seed_0").logits(texts)
    torch.testing.assert_close(torch.stack(b), torch.stack(a), rtol=0, atol=1e-4)


def test_a_slots_gradient_depends_only_on_its_slice(make_recipe):
    setup = Setup.from_recipe(make_recipe("qwen"))
    pack = []
    model = setup.model_for(0, before_precision=lambda m: pack.append(AdapterSlots(m, 3)))
    pack = pack[0]
    batch = next(iter(eval_loader(setup.train_features, setup.tokenizer, "sequence", 8)))
    labels, _ = batch.pop("labels"), batch.pop("example")
    model.train()

    def grads(others: dict) -> dict:
        """Gradients of every slot's tensors when slot 1 gets ``batch`` and slots 0 and 2 ``others``."""
        model.zero_grad()
        inputs = {key: torch.cat([others[key], batch[key], others[key]]) for key in batch}
        logits = model(**inputs).logits.chunk(3)
        sum(torch.nn.functional.cross_entropy(x, labels) for x in logits).backward()
        return {slot: {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
                for slot, params in pack.params.items()}

    same, changed = grads(batch), grads({**batch, "input_ids": batch["input_ids"].roll(1, dims=0)})
    assert any(not torch.equal(changed["default"][n], g) for n, g in same["default"].items())  # others did change
    torch.testing.assert_close(changed["slot_1"], same["slot_1"], rtol=0, atol=0)
    model.zero_grad()
    with pack.only("slot_1"):  # alone: the same gradient
        torch.nn.functional.cross_entropy(model(**batch).logits, labels).backward()
    alone = {n: p.grad for n, p in pack.params["slot_1"].items() if p.grad is not None}
    torch.testing.assert_close(alone, same["slot_1"], rtol=0, atol=1e-6)
    pack.remove()
    setup.release(model)


def test_replicate_stacks_slices_in_slot_order():
    batch = {"input_ids": torch.tensor([[1, 2], [3, 4]]), "note": "kept"}
    packed = replicate(batch, 3)
    assert packed["input_ids"].tolist() == [[1, 2], [3, 4]] * 3 and packed["note"] == "kept"


def test_groups_hold_rates_of_one_seed():
    todo = [(0.0, 0), (0.0, 1), (0.1, 0), (0.1, 1), (0.3, 0)]
    assert groups(todo, 2) == [([0.0, 0.1], 0), ([0.3], 0), ([0.0, 0.1], 1)]
    assert groups(todo, 0) == groups(todo, 1) == [([r], s) for r, s in todo]  # today's order, one at a time


def test_pack_refuses_what_it_cannot_do(make_recipe, tmp_path):
    with pytest.raises(ValueError, match="sweep.side_by_side must be 0"):
        make_recipe(sweep={"side_by_side": -1})
    with pytest.raises(ValueError, match="sweep.side_by_side=3: method: full"):
        sweep(make_recipe(method="full", sweep={"side_by_side": 3}), tmp_path / "full")
    with pytest.raises(ValueError, match="sweep.side_by_side=3 trains on the local executor"):
        sweep(make_recipe(sweep={"side_by_side": 3}), tmp_path / "ray", executor="ray")


def test_the_old_key_sweep_pack_is_read_with_a_warning(make_recipe):
    from tokmask_peft.console import TokmaskWarning

    with pytest.warns(TokmaskWarning, match="sweep.pack is deprecated: it is sweep.side_by_side now"):
        recipe = make_recipe(sweep={"pack": 3})
    assert recipe.sweep.side_by_side == 3 and "pack" not in recipe.to_dict()["sweep"]
    with pytest.warns(TokmaskWarning):
        assert recipe.with_overrides(["sweep.pack=2"]).sweep.side_by_side == 2
    with pytest.raises(ValueError, match="give only sweep.side_by_side"):
        make_recipe(sweep={"pack": 3, "side_by_side": 2})


def test_a_pack_cut_short_resumes_from_its_checkpoint_like_an_uninterrupted_one(make_recipe, tmp_path, monkeypatch):
    import tokmask_peft.training as packed_training

    # 3 epochs of 6 updates, a checkpoint at every evaluation (each epoch's end); killed in update 10
    recipe = make_recipe("llama", train={"epochs": 3}, sweep={"rates": [0.0, 0.1, 0.3], "seeds": [0], "side_by_side": 3})
    sweep(recipe, tmp_path / "whole")
    real, calls = packed_training.task_loss, {"n": 0}

    def counted(problem, logits, labels, *args):
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 3 * 10:  # three slots' losses per update
                raise KeyboardInterrupt("simulated kill in update 10")
        return real(problem, logits, labels, *args)

    monkeypatch.setattr(packed_training, "task_loss", counted)
    with pytest.raises(KeyboardInterrupt):
        sweep(recipe, tmp_path / "cut")
    assert not list((tmp_path / "cut").glob("mask_*/seed_0"))  # only .partial directories
    assert list((tmp_path / "cut" / ".side_by_side").glob("*/checkpoint/recipe.json"))
    calls["n"] = -10**9  # no more kills; count the updates trained after the restart
    sweep(recipe, tmp_path / "cut")
    assert calls["n"] + 10**9 == 3 * (18 - 6)  # resumed after update 6, not from the start
    assert sorted(p.name for p in (tmp_path / "cut").iterdir()) == sorted(p.name for p in (tmp_path / "whole").iterdir())
    for rate in RATES:
        a, b = (tmp_path / side / f"mask_{rate}" / "seed_0" for side in ("whole", "cut"))
        assert logged_losses(b) == logged_losses(a)
        assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
        torch.testing.assert_close(load_file(b / "adapter_model.safetensors"),
                                   load_file(a / "adapter_model.safetensors"), rtol=0, atol=0)
