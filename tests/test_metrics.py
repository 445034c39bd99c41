"""One metric registry: a run's scores and the verdict bootstrap compute every metric the same way."""
import numpy as np
import pytest
from sklearn.metrics import accuracy_score, f1_score

from tokmask_peft.metrics import (METRICS, PREDICTION_METRICS, check_metric, classification_metrics, is_better,
                                  metric_values)

SKLEARN = {"weighted_f1": lambda g, p: f1_score(g, p, average="weighted", zero_division=0),
           "macro_f1": lambda g, p: f1_score(g, p, average="macro", zero_division=0),
           "accuracy": accuracy_score}


def test_every_prediction_metric_equals_scikit_learn_on_random_labelings():
    assert set(PREDICTION_METRICS) == set(SKLEARN)
    rng = np.random.default_rng(0)
    for _ in range(200):
        k, n = rng.integers(2, 6), rng.integers(1, 80)
        gold, pred = rng.integers(0, k, n), rng.integers(0, k, n)  # classes missing from one side included
        ours = classification_metrics(pred, gold)
        for name, sk in SKLEARN.items():
            assert ours[name] == pytest.approx(sk(gold, pred), abs=1e-12), name


def test_resample_weights_equal_scoring_the_resampled_rows():
    rng = np.random.default_rng(1)
    gold, pred = rng.integers(0, 3, 50), rng.integers(0, 3, 50)
    draw = rng.integers(0, 50, 50)
    weights = np.bincount(draw, minlength=50)[None, :]
    for name in PREDICTION_METRICS:
        assert metric_values(weights, gold, pred, 3, name)[0] == pytest.approx(SKLEARN[name](gold[draw], pred[draw]))


def test_unknown_names_are_errors_and_loss_has_no_bootstrap():
    assert check_metric("macro_f1", "train.metric") == "macro_f1"
    with pytest.raises(ValueError, match=r"train.metric must be one of \['weighted_f1', 'macro_f1', 'accuracy', 'loss'\]"):
        check_metric("f1", "train.metric")
    with pytest.raises(ValueError, match="recomputes it from saved predictions"):
        check_metric("loss", "the verdict's metric", from_predictions=True)
    with pytest.raises(ValueError, match="got 'f1'"):
        metric_values(np.ones((1, 2)), np.array([0, 1]), np.array([0, 1]), 2, "f1")


def test_direction_comes_from_the_registry():
    assert is_better("loss", 0.4, 0.5) and not is_better("loss", 0.6, 0.5)
    assert is_better("accuracy", 0.6, 0.5) and is_better("macro_f1", 0.1, None)
    assert [name for name, m in METRICS.items() if not m.higher_is_better] == ["loss"]


def test_token_positions_labelled_minus_100_are_not_scored():
    assert classification_metrics([[0, 1, 1]], [[0, 1, -100]])["accuracy"] == 1.0
    with pytest.raises(ValueError, match="no labelled positions"):
        classification_metrics([1], [-100])
