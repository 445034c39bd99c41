"""One metric registry: a run's scores and the verdict bootstrap compute every metric the same way, for
single-label, multi-label and regression (checked against scikit-learn and scipy)."""
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, mean_squared_error

from tokmask_peft.metrics import (METRICS, PREDICTION_METRICS, check_metric, classification_metrics, compute_metrics,
                                  is_better, metric_values, problem_metrics)

SKLEARN = {"weighted_f1": lambda g, p: f1_score(g, p, average="weighted", zero_division=0),
           "macro_f1": lambda g, p: f1_score(g, p, average="macro", zero_division=0),
           "accuracy": accuracy_score}
MULTI_LABEL = {**SKLEARN, "micro_f1": lambda g, p: f1_score(g, p, average="micro", zero_division=0),
               "samples_f1": lambda g, p: f1_score(g, p, average="samples", zero_division=0)}
REGRESSION = {"pearson": lambda g, p: pearsonr(g, p)[0], "spearman": lambda g, p: spearmanr(g, p)[0],
              "mse": mean_squared_error}


def test_every_prediction_metric_equals_scikit_learn_on_random_labelings():
    assert set(PREDICTION_METRICS) == set(MULTI_LABEL) | set(REGRESSION) | {"ece"}
    assert set(problem_metrics("single_label")) == set(SKLEARN) | {"ece"}
    rng = np.random.default_rng(0)
    for _ in range(200):
        k, n = rng.integers(2, 6), rng.integers(1, 80)
        gold, pred = rng.integers(0, k, n), rng.integers(0, k, n)  # classes missing from one side included
        ours = classification_metrics(pred, gold)
        for name, sk in SKLEARN.items():
            assert ours[name] == pytest.approx(sk(gold, pred), abs=1e-12), name


def test_multi_label_metrics_equal_scikit_learn_with_empty_labels_and_rows():
    assert set(problem_metrics("multi_label")) == set(MULTI_LABEL)
    rng = np.random.default_rng(2)
    for _ in range(100):
        labels, n = rng.integers(2, 8), rng.integers(1, 60)
        gold = (rng.random((n, labels)) < 0.3).astype(int)
        pred = (rng.random((n, labels)) < 0.3).astype(int)
        gold[:, -1] = 0  # a label nobody has: scikit-learn counts it (F1 0) in the macro average
        ours = classification_metrics(pred, gold, "multi_label")
        for name, sk in MULTI_LABEL.items():
            assert ours[name] == pytest.approx(sk(gold, pred), abs=1e-12), name


def test_regression_metrics_equal_scipy_and_resample_as_pairs_with_ties():
    assert set(problem_metrics("regression")) == set(REGRESSION)
    rng = np.random.default_rng(3)
    gold = np.round(rng.uniform(1, 5, 120), 1)  # SICK-like scores: many ties
    pred = np.round(gold + rng.normal(0, 1, 120), 1)
    draws = [rng.integers(0, 120, 120) for _ in range(5)]
    weights = np.stack([np.bincount(d, minlength=120) for d in draws])
    for name, reference in REGRESSION.items():
        assert classification_metrics(pred, gold, "regression")[name] == pytest.approx(reference(gold, pred))
        values = metric_values(weights, gold, pred, 0, name, "regression")
        for value, draw in zip(values, draws):  # a resample of pairs, the correlation recomputed on it
            assert value == pytest.approx(reference(gold[draw], pred[draw]), abs=1e-10), name


def test_ece_is_the_binned_gap_between_accuracy_and_confidence_and_resamples_like_the_rest():
    rng = np.random.default_rng(4)
    probs = rng.dirichlet([1, 1, 1], 400)
    pred, gold = probs.argmax(1), rng.integers(0, 3, 400)
    confidence, correct = probs.max(1), pred == gold
    bins = np.minimum((confidence * 15).astype(int), 14)

    def by_hand(rows):
        return sum(abs(correct[rows][bins[rows] == b].sum() - confidence[rows][bins[rows] == b].sum())
                   for b in range(15)) / len(rows)

    assert classification_metrics(pred, gold, probs=probs)["ece"] == pytest.approx(by_hand(np.arange(400)))
    draw = rng.integers(0, 400, 400)
    weights = np.bincount(draw, minlength=400)[None, :]
    assert metric_values(weights, gold, pred, 3, "ece", probs=probs)[0] == pytest.approx(by_hand(draw))
    assert "ece" not in classification_metrics(pred, gold)  # no probabilities, no calibration
    with pytest.raises(ValueError, match="ece needs the predicted probabilities"):
        metric_values(weights, gold, pred, 3, "ece")


def test_resample_weights_equal_scoring_the_resampled_rows():
    rng = np.random.default_rng(1)
    gold, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    draw = rng.integers(0, 50, 50)
    weights = np.bincount(draw, minlength=50)[None, :]
    for name in SKLEARN:
        assert metric_values(weights, gold, pred, 3, name)[0] == pytest.approx(SKLEARN[name](gold[draw], pred[draw]))


def test_unknown_names_are_errors_and_loss_has_no_bootstrap():
    assert check_metric("macro_f1", "train.metric") == "macro_f1"
    with pytest.raises(ValueError, match=r"train.metric must be one of \['weighted_f1', 'macro_f1', 'micro_f1'"):
        check_metric("f1", "train.metric")
    with pytest.raises(ValueError, match="recomputes it from saved predictions"):
        check_metric("loss", "the verdict's metric", from_predictions=True)
    with pytest.raises(ValueError, match="got 'f1'"):
        metric_values(np.ones((1, 2)), np.array([0, 1]), np.array([0, 1]), 2, "f1")
    with pytest.raises(ValueError, match=r"train.metric: pearson does not score single_label problems"):
        check_metric("pearson", "train.metric", problem="single_label")


def test_direction_comes_from_the_registry():
    assert is_better("loss", 0.4, 0.5) and not is_better("loss", 0.6, 0.5)
    assert is_better("accuracy", 0.6, 0.5) and is_better("macro_f1", 0.1, None)
    assert is_better("mse", 0.4, 0.5) and is_better("pearson", 0.5, 0.4)
    assert [name for name, m in METRICS.items() if not m.higher_is_better] == ["ece", "mse", "loss"]


def test_token_positions_labelled_minus_100_are_not_scored():
    assert classification_metrics([[0, 1, 1]], [[0, 1, -100]])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="no labelled positions"):
        classification_metrics([1], [-100])


def test_the_trainers_compute_metrics_reads_each_problem_type_as_transformers_models_do():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4))
    multi = (rng.random((50, 4)) < 0.3).astype(np.float32)  # BCE labels: floats shaped like the logits
    score, target = rng.normal(size=(50, 1)), rng.normal(size=50).astype(np.float32)
    cases = [(logits, multi, "multi_label", classification_metrics((logits >= 0).astype(int), multi, "multi_label")),
             (score, target, "regression", classification_metrics(score[:, 0], target, "regression")),
             (logits, multi.argmax(1), "single_label", classification_metrics(logits.argmax(1), multi.argmax(1)))]
    for predictions, labels, problem, expected in cases:
        output = SimpleNamespace(predictions=(predictions, None), label_ids=labels)  # a tuple: extra outputs
        assert compute_metrics(output) == expected
        assert compute_metrics(output, problem) == expected
    assert "micro_f1" in cases[0][3] and "pearson" in cases[1][3] and "weighted_f1" in cases[2][3]
    with pytest.raises(ValueError, match="problem_type 'ranking'"):
        compute_metrics(SimpleNamespace(predictions=logits, label_ids=multi.argmax(1)), "ranking")
