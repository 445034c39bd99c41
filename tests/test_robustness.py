"""Robustness curves: corrupted dev copies, identical for every run, scored with the best weights."""
import json

import pytest

from helpers import shared_path
from tokmask_peft.data import Example, encode, read_lince
from tokmask_peft.masking import resolve_mask_token
from tokmask_peft.modeling import classifier_tokenizer
from tokmask_peft.robustness import corrupted_features, delete_words, typo_words


def lince(task, n=300):
    return read_lince(shared_path("data", "lince", "sa_spaeng", "dev.conll"), task)[:n]


@pytest.mark.parametrize("name", ["bert-uncased", "llama2", "qwen"])
def test_masked_words_leave_specials_and_padding_alone_and_repeat_exactly(name):
    tok = classifier_tokenizer(shared_path("tokenizers", name))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    mask = resolve_mask_token(tok)
    examples = lince("sequence")
    label2id = {"negative": 0, "neutral": 1, "positive": 2}
    features = encode(examples, tok, "sequence", label2id, 40)
    a = corrupted_features(examples, features, "mask", 0.3, tok, "sequence", label2id, 40, mask.id)
    b = corrupted_features(examples, features, "mask", 0.3, tok, "sequence", label2id, 40, mask.id)
    assert a == b  # the same copy for every run and rate
    assert corrupted_features(examples, features, "mask", 0.0, tok, "sequence", label2id, 40, mask.id) is features
    masked = total = 0
    for clean, bad in zip(features, a):
        for w, x, y in zip(clean["word_ids"], clean["input_ids"], bad["input_ids"]):
            if w is None:
                assert x == y  # specials never change
            masked += y == mask.id and x != y
            total += w is not None
        assert bad["labels"] == clean["labels"]
    assert 0.2 < masked / total < 0.4


def test_deletion_and_typos_keep_labels_aligned_and_are_seeded():
    words = lince("token")
    for ex in words:
        ex.label = ["lang1"] * len(ex.text)
    deleted = delete_words(words, 0.3, seed=1)
    assert deleted == delete_words(words, 0.3, seed=1) and deleted != delete_words(words, 0.3, seed=2)
    kept = sum(len(d.text) for d in deleted) / sum(len(ex.text) for ex in words)
    assert 0.65 < kept < 0.75 and all(d.text and len(d.text) == len(d.label) for d in deleted)
    texts = [Example("hola amigo como estas", "positive")] * 200
    typed = typo_words(texts, 0.5, seed=0)
    changed = sum(a != b for t in typed for a, b in zip(t.text.split(), "hola amigo como estas".split()))
    assert 0.35 < changed / 800 < 0.6 and all(t.label == "positive" for t in typed)


def test_a_sentence_pair_loses_and_misspells_words_in_both_texts_and_single_texts_draw_as_before():
    pairs = [Example("one two three four five six", "x", pair="seven eight nine ten eleven twelve")] * 100
    for shifted in (delete_words(pairs, 0.5, seed=3), typo_words(pairs, 0.5, seed=3)):
        assert sum(s.text != pairs[0].text for s in shifted) > 80 and sum(s.pair != pairs[0].pair for s in shifted) > 80
        assert all(s.label == "x" and s.pair for s in shifted)
    # A single text's stream is the one every committed robustness result was scored on.
    single = [Example("one two three four five six", "x"), Example("seven eight nine ten", "y")]
    assert [e.text for e in delete_words(single, 0.5, 7)] == ["three five", "eight"]
    assert [e.text for e in typo_words(single, 0.5, 7)] == ["ne two hree four five ix", "sveen eight nien ten"]


def test_a_run_scores_corrupted_copies_and_q_zero_is_the_clean_score(make_recipe, tmp_path):
    from tokmask_peft.sweeps import sweep

    recipe = make_recipe("llama", "sequence", "lora", train={"epochs": 2, "robustness": [0.0, 0.3]},
                         sweep={"rates": [0.0, 0.3], "seeds": [0]})
    out = tmp_path / "sweep"
    sweep(recipe, out)
    metrics = json.loads((out / "mask_0.30" / "seed_0" / "metrics.json").read_text())
    assert set(metrics["robustness"]) == {"delete", "mask", "typo"}
    for kind, by_q in metrics["robustness"].items():
        assert by_q["0.0"]["weighted_f1"] == pytest.approx(metrics["best"]["weighted_f1"], abs=1e-9)
    assert metrics["robustness"]["mask"]["0.3"] != metrics["robustness"]["mask"]["0.0"]
    text = (out / "results.md").read_text()
    assert "mask_0.30_weighted_f1" in text and "Held out" not in text  # corrupted copies are not held-out sets
    assert (out / "results_robustness.png").stat().st_size > 5000
    with pytest.raises(ValueError, match="train.robustness entry"):
        make_recipe("bert", train={"robustness": [1.5]})
