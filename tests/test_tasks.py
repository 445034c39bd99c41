"""Sentence pairs, multi-label and regression, end to end on short slices of the real SICK and GoEmotions
files: reading (and refusing bad rows), pair encoding and masking by segment, the losses, thresholds tuned
on dev and used at inference, regression predictions, verdicts, serving and file prediction."""
import io
import json

import numpy as np
import pytest
import torch
from helpers import shared_path

from tokmask_peft.config import Recipe
from tokmask_peft.data import Example, LabelFormat, encode, padded_word_ids, read_table
from tokmask_peft.inference import Classifier
from tokmask_peft.masking import TokenMasker
from tokmask_peft.runs import load_predictions, read_run_config
from tokmask_peft.sweeps import sweep


def head(src, dst, rows: int):
    with open(src, encoding="utf-8") as f:
        dst.write_text("".join(f.readline() for _ in range(rows + 1)), encoding="utf-8")
    return dst


@pytest.fixture(scope="module")
def slices(tmp_path_factory):
    """SICK and GoEmotions slices (test data only: SICK is CC BY-NC-SA and never enters the repository)."""
    folder = tmp_path_factory.mktemp("tasks")
    sick, ge = shared_path("data", "sick"), shared_path("data", "goemotions")
    return {"sick_train": head(sick / "train.csv", folder / "sick_train.csv", 64),
            "sick_dev": head(sick / "dev.csv", folder / "sick_dev.csv", 40),
            "ge_train": head(ge / "train.csv", folder / "ge_train.csv", 96),
            "ge_dev": head(ge / "dev.csv", folder / "ge_dev.csv", 64), "folder": folder}


def task_recipe(tiny_model, slices, out, problem: str, **extra) -> Recipe:
    data = ({"train": str(slices["ge_train"]), "dev": str(slices["ge_dev"]), "label_column": "labels"}
            if problem == "multi_label" else
            {"train": str(slices["sick_train"]), "dev": str(slices["sick_dev"]), "text_column": "sentence1",
             "text_pair_column": "sentence2", "label_column": "score" if problem == "regression" else "label"})
    d = {"model": {"name": tiny_model("bert"), "problem_type": problem, "lora_r": 4, "lora_dropout": 0.0},
         "data": {**data, "format": "csv", "max_length": 48}, "masking": {"unit": "word"},
         "train": {"epochs": 2, "batch_size": 16, "lr": 5e-3, "output_dir": str(out)},
         "sweep": {"rates": [0.0, 0.2], "seeds": [0]}}
    for section, values in extra.items():
        d[section].update(values)
    return Recipe.from_dict(d)


@pytest.fixture(scope="module")
def trained(tiny_model, slices, tmp_path_factory):
    out = tmp_path_factory.mktemp("task_sweeps")
    for problem in ("single_label", "multi_label", "regression"):
        sweep(task_recipe(tiny_model, slices, out / problem, problem, train={"robustness": [0.3]}))
    return out


# ---- reading and encoding ---------------------------------------------------------------------------


def test_pairs_keep_both_segments_and_mask_only_the_chosen_ones(load_tokenizer):
    tok = load_tokenizer("bert-uncased")
    ex = [Example("a man is playing a guitar", None, "x:1", "someone plays music loudly")]
    both = encode(ex, tok, "sequence", None, 64)[0]
    tokens = tok.convert_ids_to_tokens(both["input_ids"])
    assert tokens.count("[SEP]") == 2 and "guitar" in tokens and "loudly" in tokens
    assert both["word_ids"] == [None, 0, 1, 2, 3, 4, 5, None, 6, 7, 8, 9, None]  # second text numbered on
    sep = tokens.index("[SEP]")
    for segments, allowed in (("first", range(1, sep)), ("second", range(sep + 1, len(tokens) - 1))):
        feature = encode(ex, tok, "sequence", None, 64, segments=segments)[0]
        words = padded_word_ids([feature], len(tokens))
        ids = torch.tensor([feature["input_ids"]])
        for unit in ("token", "word"):
            masker = TokenMasker.for_tokenizer(tok, _mask(tok), rate=0.99, seed=0, unit=unit)
            masked = masker(ids, torch.ones_like(ids), words)[0]
            changed = {i for i in range(len(tokens)) if masked[i] != ids[0, i]}
            assert changed and changed <= set(allowed), (segments, unit)  # separators and the other text kept


def _mask(tok):
    from tokmask_peft.masking import resolve_mask_token

    return resolve_mask_token(tok, "auto")


def test_a_decoder_without_a_pair_template_sees_the_texts_parted_by_a_newline(load_tokenizer):
    tok = load_tokenizer("qwen")
    feature = encode([Example("a dog runs", None, "x:1", "an animal moves")], tok, "sequence", None, 32)[0]
    assert tok.decode(feature["input_ids"]) == "a dog runs\nan animal moves"
    assert feature["word_ids"][-3:] == [3, 4, 5]


def test_labels_read_as_the_problem_type_says(slices, tmp_path):
    ge = read_table(slices["ge_train"], "csv", "text", "labels", labels=LabelFormat("multi_label"))
    assert all(isinstance(e.label, list) and e.label for e in ge)
    assert any(len(e.label) > 1 for e in ge)
    sick = read_table(slices["sick_train"], "csv", "sentence1", "score", pair_column="sentence2",
                      labels=LabelFormat("regression"))
    assert isinstance(sick[0].label, float) and 1 <= sick[0].label <= 5 and sick[0].pair
    columns = tmp_path / "cols.csv"
    columns.write_text("text,joy,anger\nyay,1,0\ngrr,0,1\nboth,1,1\n")
    rows = read_table(columns, "csv", labels=LabelFormat("multi_label", columns=("joy", "anger")))
    assert [r.label for r in rows] == [["joy"], ["anger"], ["joy", "anger"]]


def test_multi_label_outputs_cover_every_label_of_the_training_file_not_only_the_subset(tiny_model, slices,
                                                                                       tmp_path):
    from tokmask_peft.recipe_setup import Setup

    whole = read_table(slices["ge_train"], "csv", "text", "labels", labels=LabelFormat("multi_label"))
    every = sorted({label for e in whole for label in e.label})
    setup = Setup.from_recipe(task_recipe(tiny_model, slices, tmp_path, "multi_label",
                                          data={"max_train_examples": 8}))
    subset = {label for e in setup.train_features for label, on in zip(setup.labels, e["labels"]) if on}
    assert len(setup.train_features) == 8 and subset < set(every)  # the subset lacks some labels...
    assert setup.labels == every  # ...and each still has its output


@pytest.mark.parametrize("content, problem, message", [
    ("sentence1,sentence2,label\na b,c d,NEUTRAL\ne f\n", "single_label",
     r"bad.csv:3: no value for column 'sentence2'"),
    ("sentence1,sentence2,label\na b,c d,NEUTRAL\ne f,,NEUTRAL\n", "single_label",
     r"bad.csv:3: column 'sentence2' is empty"),
    ("sentence1,sentence2,label\na b,c d,;\n", "multi_label", r"bad.csv:2: column 'label' holds no label"),
    ("sentence1,sentence2,label\na b,c d,4.5\ne f,g h,high\n", "regression",
     r"bad.csv:3: column 'label' must be a finite number for regression, got 'high'"),
])
def test_bad_rows_are_named_by_file_line_and_column(tmp_path, content, problem, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_table(path, "csv", "sentence1", "label", pair_column="sentence2", labels=LabelFormat(problem))


def test_a_dev_label_not_in_training_and_options_that_do_not_fit_are_refused_before_training(tiny_model, slices,
                                                                                               tmp_path):
    from tokmask_peft.recipe_setup import Setup

    dev = tmp_path / "dev.csv"
    dev.write_text("text,labels,id\nfine,joy;wonder,x1\n")
    recipe = task_recipe(tiny_model, slices, tmp_path / "out", "multi_label").with_overrides([f"data.dev={dev}"])
    with pytest.raises(ValueError, match=r"dev.csv:2: label 'wonder' is not among the training labels"):
        Setup.from_recipe(recipe)
    base = task_recipe(tiny_model, slices, tmp_path / "out", "regression")
    for override, message in ((["train.focal_gamma=1"], "train.focal_gamma is for single-label"),
                              (["train.class_weights=paper"], "train.class_weights needs classes"),
                              (["train.metric=macro_f1"], "macro_f1 does not score regression"),
                              (["masking.consistency=1"], "masking.consistency compares class distributions"),
                              (["data.text_pair_column=null", "masking.segments=first"],
                               "masking.segments first needs sentence pairs"),
                              (["model.problem_type=ordinal"], "model.problem_type must be one of")):
        with pytest.raises(ValueError, match=message):
            base.with_overrides(override)
    assert base.train.metric == "pearson"
    assert task_recipe(tiny_model, slices, tmp_path, "multi_label").train.metric == "micro_f1"


# ---- training, saving, inference ---------------------------------------------------------------------


@pytest.mark.slow
def test_each_problem_type_trains_reports_and_reloads_with_its_head(trained):
    for problem, metric in (("single_label", "weighted_f1"), ("multi_label", "micro_f1"), ("regression", "pearson")):
        run = trained / problem / "mask_0.20" / "seed_0"
        config = read_run_config(run)
        assert config["problem_type"] == problem
        report = (trained / problem / "results.md").read_text()
        assert f"the highest mean by {metric}" in report
        # Robustness columns and curves in the problem's own metric: both texts of a pair shifted.
        assert all(f"{kind}_0.30_{metric} |" in report for kind in ("delete", "mask", "typo"))
        assert (trained / problem / "results_robustness.png").is_file()
        clf = Classifier.from_run(run)
        expected = {"single_label": "single_label_classification", "multi_label": "multi_label_classification",
                    "regression": "regression"}[problem]
        assert clf.model.config.problem_type == expected
        assert clf.model.config.num_labels == (1 if problem == "regression" else len(config["labels"]))
    card = (trained / "regression" / "mask_0.00" / "seed_0" / "README.md").read_text()
    assert "| set | pearson | spearman | mse |" in card and "problem_type='regression'" in card


@pytest.mark.slow
def test_the_card_snippet_loads_each_problem_type_in_plain_peft_with_its_loss_and_our_outputs(trained):
    import torch.nn.functional as F

    cases = {"single_label": (("a dog runs", "an animal moves"), torch.tensor([1]), F.cross_entropy),
             "multi_label": (("thanks so much!",), None, F.binary_cross_entropy_with_logits),
             "regression": (("a man plays", "nobody plays"), torch.tensor([3.5]), F.mse_loss)}
    for problem, (text, labels, loss) in cases.items():
        run = trained / problem / "mask_0.20" / "seed_0"
        snippet = (run / "README.md").read_text().split("```python\n")[1].split("```")[0]
        namespace: dict = {}
        exec(snippet.replace('run = "."', f"run = {str(run)!r}"), namespace)
        tokenizer, model = namespace["tokenizer"], namespace["model"]
        labels = torch.eye(model.config.num_labels)[:1] if labels is None else labels
        with torch.no_grad():
            out = model(**tokenizer(*text, return_tensors="pt"), labels=labels)
        # transformers picks the loss from config.problem_type (or infers it): the one we trained with
        torch.testing.assert_close(out.loss, loss(out.logits.squeeze(-1) if problem == "regression" else out.logits,
                                                  labels))
        ours = Classifier.from_run(run).logits([text if len(text) > 1 else text[0]])[0]
        torch.testing.assert_close(out.logits[0], ours, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_a_regression_runs_saved_predictions_equal_the_models_outputs(trained, slices):
    run = trained / "regression" / "mask_0.20" / "seed_0"
    dev = load_predictions(run / "predictions.npz")["dev"]
    rows = read_table(slices["sick_dev"], "csv", "sentence1", "score", pair_column="sentence2",
                      labels=LabelFormat("regression"))
    scores = [r["score"] for r in Classifier.from_run(run).predict([(r.text, r.pair) for r in rows])]
    assert np.allclose(dev.pred[np.argsort(dev.example)], scores, atol=1e-4)
    assert np.allclose(dev.gold[np.argsort(dev.example)], [r.label for r in rows])


@pytest.mark.slow
def test_multi_label_thresholds_are_tuned_on_dev_saved_and_used_at_inference(trained):
    run = trained / "multi_label" / "mask_0.00" / "seed_0"
    config = read_run_config(run)
    thresholds = config["thresholds"]
    assert len(thresholds) == len(config["labels"]) and all(0 < t < 1 for t in thresholds)
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"tuned_micro_f1", "tuned_macro_f1", "tuned_samples_f1"} <= set(metrics["dev_tuned"])
    clf = Classifier.from_run(run)
    result = clf.predict(["I am so happy for you, thank you!"])[0]
    assert result["labels"] == [lab for lab, t in zip(config["labels"], thresholds) if result["scores"][lab] >= t]
    edited = {**config, "thresholds": [0.99] * len(thresholds)}  # thresholds are bound to the weights
    (run / "tokmask_config.json").write_text(json.dumps(edited))
    try:
        with pytest.raises(ValueError, match="edited"):
            Classifier.from_run(run)
    finally:
        (run / "tokmask_config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_a_pair_adapter_refuses_single_texts_and_file_prediction_reads_the_pair_column(trained, slices, capsys):
    from tokmask_peft.cli import main

    run = trained / "single_label" / "mask_0.00" / "seed_0"
    clf = Classifier.from_run(run)
    with pytest.raises(ValueError, match=r"input\[0\]: this adapter was trained on sentence pairs"):
        clf.predict(["one text"])
    assert set(clf.predict([("a dog runs", "an animal moves")])[0]["probs"]) == {"CONTRADICTION", "ENTAILMENT",
                                                                               "NEUTRAL"}
    from tokmask_peft.inference import tta_masker

    assert tta_masker(clf.tokenizer, clf.active_config, None, 0).unit == "word"  # its own unit, words of both texts
    assert clf.predict([("a dog runs", "an animal moves")], tta=3) == clf.predict([("a dog runs", "an animal moves")],
                                                                                 tta=3)
    main(["predict", str(run), "--input", str(slices["sick_dev"]), "--text-column", "sentence1",
          "--text-pair-column", "sentence2"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 40 and all(line["label"] in ("CONTRADICTION", "ENTAILMENT", "NEUTRAL") for line in lines)


@pytest.mark.slow
def test_pair_multi_label_and_regression_runs_export_to_onnx_and_answer_as_pytorch(trained, tmp_path):
    pytest.importorskip("onnxruntime")
    from tokmask_peft.onnx_export import export_run, onnx_classifier

    inputs = {"single_label": [("a dog runs", "an animal moves"), ("a man plays", "nobody plays")],
              "multi_label": ["I am so happy for you, thank you!", "this is awful"],
              "regression": [("a dog runs", "an animal moves"), ("a man plays", "nobody plays")]}
    for problem, texts in inputs.items():
        run = trained / problem / "mask_0.00" / "seed_0"
        measured = export_run(run, tmp_path / problem, quantize="int8")
        assert measured["max_abs_diff"] <= 1e-4 and measured["metric"] == {
            "single_label": "weighted_f1", "multi_label": "micro_f1", "regression": "pearson"}[problem]
        exported, reference = onnx_classifier(tmp_path / problem), Classifier.from_run(run)
        ours, theirs = exported.predict(texts), reference.predict(texts)
        assert [o.get("label", o.get("labels")) for o in ours] == [t.get("label", t.get("labels")) for t in theirs]
        if problem == "regression":
            assert all(abs(o["score"] - t["score"]) < 1e-4 for o, t in zip(ours, theirs))
    assert read_run_config(tmp_path / "multi_label")["thresholds"] == read_run_config(
        trained / "multi_label" / "mask_0.00" / "seed_0")["thresholds"]  # tuned on dev, carried and used


@pytest.mark.slow
def test_serve_answers_pairs_and_multi_label_in_the_documented_shapes(trained):
    from starlette.testclient import TestClient

    from tokmask_peft.server import create_app
    from tokmask_peft.serving import AdapterPool

    pool = AdapterPool([f"nli={trained / 'single_label' / 'mask_0.00' / 'seed_0'}",
                        f"emotions={trained / 'multi_label' / 'mask_0.00' / 'seed_0'}",
                        f"related={trained / 'regression' / 'mask_0.00' / 'seed_0'}"])
    assert len(pool.classifiers) == 1  # three problem types, one shared base, a head each
    with TestClient(create_app(pool)) as client:
        one = client.post("/predict", json={"inputs": ["a dog runs", "an animal moves"], "adapter": "nli"})
        assert one.status_code == 200 and {r["label"] for r in one.json()} == {"CONTRADICTION", "ENTAILMENT",
                                                                               "NEUTRAL"}
        batch = client.post("/predict", json={"inputs": [["a", "b"], ["c", "d"]], "adapter": "nli"}).json()
        assert len(batch) == 2 and all(len(r) == 3 for r in batch)
        refused = client.post("/predict", json={"inputs": "one text", "adapter": "nli"})
        assert refused.status_code == 422 and "takes sentence pairs" in refused.json()["error"]
        refused = client.post("/predict", json={"inputs": [["a", "b"]], "adapter": "emotions"})
        assert refused.status_code == 422 and "trained on single texts" in refused.json()["error"]
        emotions = client.post("/predict", json={"inputs": "thanks so much!", "adapter": "emotions"}).json()
        thresholds = read_run_config(trained / "multi_label" / "mask_0.00" / "seed_0")["thresholds"]
        labels = pool.served["emotions"].config["labels"]
        assert len(emotions) == len(labels) and all(0 < r["score"] < 1 for r in emotions)
        assert all(r["predicted"] == (r["score"] >= thresholds[labels.index(r["label"])]) for r in emotions)
        score = client.post("/predict", json={"inputs": ["a", "b"], "adapter": "related"}).json()
        assert score == [{"label": "score", "score": pytest.approx(score[0]["score"])}]
        listing = {a["name"]: a for a in client.get("/adapters").json()["adapters"]}
        assert listing["nli"]["pairs"] and listing["emotions"]["problem_type"] == "multi_label"


# ---- verdicts ------------------------------------------------------------------------------------


def test_a_regression_verdict_equals_a_hand_computed_paired_bootstrap():
    from scipy.stats import pearsonr

    from tokmask_peft.runs import Predictions
    from tokmask_peft.verdicts import example_weights, paired_verdict

    rng = np.random.default_rng(5)
    gold = np.round(rng.uniform(1, 5, 60), 1)
    examples = np.arange(60)
    ours = Predictions(examples, gold, gold + rng.normal(0, 0.6, 60))
    base = Predictions(examples, gold, gold + rng.normal(0, 1.0, 60))
    verdict = paired_verdict(0.1, {0: ours}, {0: base}, 1, "pearson", replicates=300, problem="regression")
    assert verdict.delta == pytest.approx(pearsonr(gold, ours.pred)[0] - pearsonr(gold, base.pred)[0])
    hand_rng = np.random.default_rng(0)  # the verdict's own draws, replayed: resample pairs, recompute r
    deltas = []
    for counts in example_weights(60, 300, hand_rng):
        rows = np.repeat(examples, counts)
        deltas.append(pearsonr(gold[rows], ours.pred[rows])[0] - pearsonr(gold[rows], base.pred[rows])[0])
    low, high = np.percentile(deltas, [2.5, 97.5])
    assert (verdict.low, verdict.high) == (pytest.approx(low), pytest.approx(high))
    assert verdict.word == "better"
    mse = paired_verdict(0.1, {0: ours}, {0: base}, 1, "mse", replicates=300, problem="regression")
    assert mse.delta < 0 and mse.word == "better"  # lower is better for mse


def test_multi_label_thresholds_are_the_best_f1_per_label_on_dev():
    from tokmask_peft.problems import tune_thresholds

    probs = np.array([[0.9, 0.2], [0.7, 0.35], [0.3, 0.1], [0.6, 0.05]])
    gold = np.array([[1, 1], [1, 1], [0, 0], [0, 0]])
    assert tune_thresholds(probs, gold) == [0.65, 0.2]
    assert tune_thresholds(probs, np.zeros((4, 2), int)) == [0.5, 0.5]  # never seen: kept at 0.5


def test_predict_files_flatten_multi_label_results_for_csv():
    from tokmask_peft.predict_files import write_csv

    out = io.StringIO()
    write_csv(out, [{"id": "1", "labels": ["joy", "love"], "scores": {"joy": 0.9, "love": 0.7, "anger": 0.1},
                     "truncated": False}], ["anger", "joy", "love"])
    assert out.getvalue().splitlines() == ["id,labels,truncated,score_anger,score_joy,score_love",
                                           "1,joy;love,False,0.1,0.9,0.7"]
