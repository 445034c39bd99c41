"""Shifts users meet (issue 40): entity redaction from LinCE's own tags, shifted copies of the held-out set
too, verdicts with intervals under every condition, a recommendation for the user's objective, ECE, and
test-time masking with the adapter's own strategy."""
import numpy as np
import pytest
from helpers import shared_path

from tokmask_peft.config import Recipe
from tokmask_peft.data import encode, read_lince
from tokmask_peft.masking import resolve_mask_token
from tokmask_peft.modeling import classifier_tokenizer
from tokmask_peft.robustness import PLACEHOLDER, corrupted_features
from tokmask_peft.verdicts import Verdict, recommended_for

LABELS = {"negative": 0, "neutral": 1, "positive": 2}


def tagged(task: str, n: int = 400):
    return read_lince(shared_path("data", "lince", "sa_spaeng" if task == "sequence" else "lid_spaeng",
                                  "dev.conll"), task)[:n]


@pytest.mark.parametrize("name", ["bert-uncased", "qwen"])
def test_entity_redactions_repeat_touch_only_entities_and_never_empty_a_text(name):
    tok = classifier_tokenizer(shared_path("tokenizers", name))
    mask = resolve_mask_token(tok)
    examples = tagged("sequence")
    assert sum(t == "ne" for e in examples for t in e.tags) > 100
    features = encode(examples, tok, "sequence", LABELS, 64)

    def copy(kind):
        return corrupted_features(examples, features, kind, None, tok, "sequence", LABELS, 64, mask.id)

    masked = copy("entities_mask")
    assert masked == copy("entities_mask")  # the same copy for every run
    for ex, clean, bad in zip(examples, features, masked):
        for w, x, y in zip(clean["word_ids"], clean["input_ids"], bad["input_ids"]):
            is_entity = w is not None and ex.tags[w] == "ne"
            assert (y == mask.id) == is_entity or x == mask.id  # entities masked, specials and the rest kept
    placeholder = copy("entities_placeholder")
    marked = tok(PLACEHOLDER, add_special_tokens=False)["input_ids"]
    assert mask.id not in marked and len(marked) >= 1  # tokenised as text, not as the mask
    with_entity = [i for i, e in enumerate(examples) if "ne" in e.tags]
    shown = [PLACEHOLDER.lower() in tok.decode(placeholder[i]["input_ids"]).replace(" ", "").lower()
             for i in with_entity]
    assert sum(shown) >= 0.95 * len(with_entity)  # (a few entities lie past max_length)
    deleted = copy("entities_delete")
    for i, (ex, f) in enumerate(zip(examples, deleted)):
        assert len([w for w in f["word_ids"] if w is not None]) >= 1  # never empty
        if "ne" in ex.tags and any(t != "ne" for t in ex.tags):
            assert max(w for w in f["word_ids"] if w is not None) + 1 == sum(t != "ne" for t in ex.tags)


def test_entity_deletion_keeps_token_labels_aligned(load_tokenizer):
    from tokmask_peft.robustness import redact_entities

    examples = [e for e in tagged("token", 600) if "ne" in e.tags and len(e.tags) > 3][:50]
    for before, after in zip(examples, redact_entities(examples, "delete")):
        kept = [i for i, t in enumerate(before.tags) if t != "ne"]
        assert after.text == [before.text[i] for i in kept] and after.label == [before.label[i] for i in kept]


def test_conditions_and_objective_are_checked_by_name_before_anything_trains():
    base = {"model": {"name": "m"}, "data": {"train": "t", "dev": "d"}}

    def recipe(**train):
        objective = train.pop("objective", "clean")
        fmt = train.pop("format", "lince")
        return Recipe.from_dict({**base, "data": {**base["data"], "format": fmt}, "train": train,
                                 "sweep": {"objective": objective}})

    r = recipe(robustness=[0.2], robustness_conditions=["mask", "entities_placeholder"], objective="mask@0.2")
    assert r.scored_conditions() == ["mask@0.2", "entities_placeholder"]
    assert recipe(robustness=[0.1]).scored_conditions() == ["delete@0.1", "mask@0.1", "typo@0.1"]
    with pytest.raises(ValueError, match=r"train.robustness_conditions entry must be one of .*got 'blur'"):
        recipe(robustness_conditions=["blur"])
    with pytest.raises(ValueError, match=r"entry entities_mask needs word tags .* data.format csv has none"):
        recipe(robustness_conditions=["entities_mask"], format="csv")
    with pytest.raises(ValueError, match=r"entry typo takes severities: set train.robustness"):
        recipe(robustness_conditions=["typo"])
    with pytest.raises(ValueError, match=r"sweep.objective 'mask@0.3' is not a condition this recipe scores"):
        recipe(robustness=[0.2], objective="mask@0.3")
    assert Recipe.from_dict({**base, "data": {**base["data"], "extra_eval": {"other": "o.csv"}},
                             "sweep": {"objective": "other"}}).sweep.objective == "other"
    with pytest.raises(ValueError, match=r"data.extra_eval.x must be a path or a mapping of .* with a path"):
        Recipe.from_dict({**base, "data": {**base["data"], "extra_eval": {"x": {"file": "a.csv"}}}})
    with pytest.raises(ValueError, match=r"data.extra_eval.x.format must be one of"):
        Recipe.from_dict({**base, "data": {**base["data"], "extra_eval": {"x": {"path": "a", "format": "xls"}}}})


def test_the_objective_changes_the_recommendation_and_a_worse_clean_rate_is_refused():
    def v(rate, low, high):
        return Verdict(rate, (low + high) / 2, low, high, 3, "seeds and examples")

    clean = [v(0.1, -0.01, 0.02), v(0.3, -0.05, -0.01)]
    masked = [v(0.1, 0.01, 0.05), v(0.3, 0.04, 0.09)]
    assert recommended_for(clean, clean) == (None, [0.3])  # clean objective: nothing beats p = 0
    best, refused = recommended_for(masked, clean)
    assert best.rate == 0.1 and refused == [0.3]  # 0.3 gains more under masking but is worse on clean dev
    assert recommended_for(masked, [v(0.1, -0.01, 0.02), v(0.3, -0.02, 0.01)])[0].rate == 0.3


@pytest.mark.slow
def test_a_sweep_scores_shifted_dev_and_test_copies_judges_them_and_recommends_for_its_objective(
        tiny_model, tmp_path):
    from tokmask_peft.reporting import PredictionFiles, collect, objective_lines, set_verdicts
    from tokmask_peft.runs import load_predictions
    from tokmask_peft.sweeps import sweep
    from tokmask_peft.verdicts import paired_verdict

    lince = shared_path("data", "lince", "sa_spaeng")
    small = tmp_path / "train.conll"
    small.write_text("\n\n".join((lince / "train.conll").read_text(encoding="utf-8").split("\n\n")[:360]) + "\n",
                     encoding="utf-8")
    out = tmp_path / "sweep"
    other = tmp_path / "other.csv"  # another corpus, stored otherwise, sorted by label: sampled
    other.write_text("sentiment,tweet\n" + "".join(f"{lab},so {lab} today {i}\n" for lab in LABELS for i in range(30)))
    recipe = Recipe.from_dict({
        "model": {"name": tiny_model("llama"), "lora_r": 4, "lora_alpha": 8},
        "data": {"train": str(small), "dev_fraction": 0.25, "test_from_train": 80, "max_length": 32,
                 "extra_eval": {"other": {"path": str(other), "format": "csv", "text_column": "tweet",
                                          "label_column": "sentiment", "sample": 40}}},
        "masking": {"unit": "word"},
        "train": {"epochs": 1, "batch_size": 16, "lr": 5e-3, "output_dir": str(out), "robustness": [0.3],
                  "robustness_conditions": ["mask", "entities_placeholder"]},
        "sweep": {"rates": [0.0, 0.3], "seeds": [0, 1], "objective": "mask@0.3"}})
    sweep(recipe)
    run = out / "mask_0.30" / "seed_0"
    saved = load_predictions(run / "predictions.npz")
    assert {"dev", "test", "dev:mask@0.3", "test:mask@0.3", "dev:entities_placeholder",
            "test:entities_placeholder", "other", "other:mask@0.3"} <= set(saved)
    assert "other:entities_placeholder" not in saved  # no tags in the other corpus: not redacted
    assert len(np.unique(saved["other"].example)) == 40 and len(set(saved["other"].gold)) == 3
    text = (out / "results.md").read_text()
    assert "Recommendation for the objective mask@0.3" in text and "| words masked (q = 0.3) | test | 0.30 |" in text
    assert "| named entities replaced by [NAME] | dev | 0.30 |" in text
    rows = collect(out)
    [ours] = set_verdicts(out, rows, "test:entities_placeholder", "weighted_f1")
    def kept(rate: str) -> dict:
        return {s: load_predictions(out / f"mask_{rate}/seed_{s}/predictions.npz")["test:entities_placeholder"]
                for s in (0, 1)}

    by_hand = paired_verdict(0.3, kept("0.30"), kept("0.00"), 3, "weighted_f1")
    assert (ours.delta, ours.low, ours.high) == (by_hand.delta, by_hand.low, by_hand.high)
    assert np.isfinite(ours.delta) and (out / "results.png").stat().st_size > 0
    # Objective another corpus: no dev copy, so the rate picked on clean dev is judged there.
    dev = set_verdicts(out, rows, "dev", "weighted_f1")
    [line] = objective_lines(out, rows, "weighted_f1", "other", dev, ["test", "other"], PredictionFiles())[1:]
    [there] = set_verdicts(out, rows, "other", "weighted_f1")
    assert line == f"Objective other (no dev copy to pick on): p = 0.3, the rate picked on clean dev, {there.describe()}: {there.word}."


# ---- masking.replace: delete -------------------------------------------------------------------------


def test_deletion_drops_chosen_units_keeps_specials_labels_aligned_and_never_empties(load_tokenizer):
    import torch

    from tokmask_peft.data import padding_collator
    from tokmask_peft.masking import TokenMasker

    tok = load_tokenizer("bert-uncased")
    examples = tagged("token", 64)
    features = encode(examples, tok, "token", {"lang1": 0, "lang2": 1, "other": 2}, 32)
    batch = padding_collator(tok, "token", word_ids=True)(features)
    ids = batch["input_ids"]  # text tokens made unique, so where each kept one came from is unambiguous
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    batch["input_ids"] = torch.where(special, ids, 50_000 + torch.arange(ids.numel()).reshape(ids.shape))
    for unit, rate in (("token", 0.3), ("word", 0.3), ("word", 0.99)):
        masker = TokenMasker.for_tokenizer(tok, resolve_mask_token(tok), rate=rate, seed=1, unit=unit,
                                           replace="delete")
        out = masker.apply(batch)
        assert out["input_ids"].shape == batch["input_ids"].shape and "word_ids" not in out
        for row in range(len(features)):
            before = batch["input_ids"][row][batch["attention_mask"][row] == 1].tolist()
            after = out["input_ids"][row][out["attention_mask"][row] == 1].tolist()
            assert after[0] == tok.cls_token_id and after[-1] == tok.sep_token_id  # specials kept
            assert len(after) >= 3  # at least one text token
            it = iter(range(len(before)))  # the kept tokens are a subsequence, each with its own label
            positions = [next(i for i in it if before[i] == token) for token in after]
            assert len(positions) == len(after)
            assert out["labels"][row][:len(after)].tolist() == batch["labels"][row][positions].tolist()
            assert (out["input_ids"][row][len(after):] == tok.pad_token_id).all()
        followed = masker.follow(batch["labels"], batch["attention_mask"])
        assert torch.equal(followed, out["labels"])  # our loop's labels move with their words


@pytest.mark.slow
def test_delete_trains_token_and_sequence_tasks_and_refuses_what_cannot_follow_it(make_recipe, tmp_path):
    from tokmask_peft.training import train

    for task in ("token", "sequence"):
        metrics = train(make_recipe("bert", task=task, masking={"rate": 0.3, "unit": "word", "replace": "delete"}),
                        output_dir=tmp_path / task)
        assert np.isfinite(metrics["best"]["loss"])
    with pytest.raises(ValueError, match="replace delete on a token task .* sweep.side_by_side"):
        make_recipe("bert", task="token", masking={"replace": "delete"}, sweep={"side_by_side": 2})
