"""The paper's class weights and focal loss, which all 22 recipes set, checked against hand computation."""
import math

import pytest
import torch

from tokmask_peft.losses import class_weights, classification_loss, label_counts


def test_paper_weights_are_sqrt_inverse_frequency_renormalised_to_the_class_count():
    counts = [600, 300, 100]  # N = 1000, K = 3
    raw = [math.sqrt(1000 / (3 * n)) for n in counts]
    expected = [3 * w / sum(raw) for w in raw]
    assert class_weights(counts, "paper").tolist() == pytest.approx(expected, rel=1e-6)
    assert float(class_weights(counts, "paper").sum()) == pytest.approx(3.0)
    inverse = [1000 / (3 * n) for n in counts]
    assert class_weights(counts, "inverse").tolist() == pytest.approx([3 * w / sum(inverse) for w in inverse], rel=1e-6)
    assert class_weights(counts, "none") is None


def test_a_class_absent_from_training_gets_weight_zero_and_a_bad_kind_is_named():
    weights = class_weights([10, 0, 30], "paper")
    assert weights[1] == 0 and torch.isfinite(weights).all()
    with pytest.raises(ValueError, match="class weights must be none, paper or inverse, got 'sqrt'"):
        class_weights([1, 2], "sqrt")


def test_label_counts_skip_ignored_positions_of_token_tasks():
    features = [{"labels": 1}, {"labels": [0, -100, 2, 2]}, {"labels": 1}]
    assert label_counts(features, 4) == [1, 2, 2, 0]


def test_focal_weighted_loss_equals_the_formula_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0], [0.0, 3.0, 0.0]])
    labels = torch.tensor([0, 2, 1])
    weights = torch.tensor([0.5, 1.0, 2.0])
    p = logits.softmax(-1)[torch.arange(3), labels]
    expected = ((1 - p) ** 2 * weights[labels] * -p.log()).mean()
    assert classification_loss(logits, labels, weights, focal_gamma=2.0) == pytest.approx(float(expected), rel=1e-6)
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert classification_loss(logits, labels) == pytest.approx(float(plain), rel=1e-6)  # gamma 0, no weights: CE


def test_token_loss_ignores_padding_labels_and_an_all_ignored_batch_is_zero_with_a_graph():
    logits = torch.randn(2, 4, 3, requires_grad=True)
    labels = torch.tensor([[0, 1, -100, -100], [2, -100, -100, -100]])
    kept = logits.reshape(-1, 3)[labels.reshape(-1) != -100]
    expected = torch.nn.functional.cross_entropy(kept, labels.reshape(-1)[labels.reshape(-1) != -100])
    assert float(classification_loss(logits, labels)) == pytest.approx(float(expected), rel=1e-6)
    empty = classification_loss(logits, torch.full((2, 4), -100))
    empty.backward()
    assert float(empty) == 0.0 and logits.grad is not None
