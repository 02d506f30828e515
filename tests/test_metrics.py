"""Metrics against small cases computed by hand."""

from __future__ import annotations

import pytest

from erc_distill.report import compute_metrics


def test_hand_computed_case():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 2, 2]
    m = compute_metrics(pred, gold, ["a", "b", "c", "d"])
    # F1: a = 2*2/(2*2+0+1) = 0.8; b = 2/(2+1+1) = 0.5; c = 2/(2+1+0) = 2/3; d absent everywhere
    assert m.per_class == pytest.approx({"a": 0.8, "b": 0.5, "c": 2 / 3, "d": 0.0})
    assert m.weighted_f1 == pytest.approx((3 * 0.8 + 2 * 0.5 + 1 * 2 / 3) / 6)
    assert m.macro_f1 == pytest.approx((0.8 + 0.5 + 2 / 3) / 3)  # over classes seen in gold or preds
    assert m.accuracy == pytest.approx(4 / 6)
    assert m.confusion == [[2, 1, 0, 0], [0, 1, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m.support == {"a": 3, "b": 2, "c": 1, "d": 0}
    assert m.n == 6


def test_class_predicted_but_never_gold():
    m = compute_metrics([0, 1], [0, 0], ["neutral", "joy"])
    assert m.per_class == pytest.approx({"neutral": 2 / 3, "joy": 0.0})
    assert m.weighted_f1 == pytest.approx(2 / 3)  # joy has no support: weight 0
    assert m.macro_f1 == pytest.approx(1 / 3)
    assert m.accuracy == pytest.approx(0.5)


def test_perfect_and_summary():
    m = compute_metrics([2, 1, 0], [2, 1, 0], ["x", "y", "z"])
    assert (m.weighted_f1, m.macro_f1, m.accuracy) == (1.0, 1.0, 1.0)
    assert m.summary().startswith("weighted F1 100.00")
    assert m.to_dict()["labels"] == ("x", "y", "z")


@pytest.mark.parametrize(
    "pred, gold, message",
    [([0, 1], [0], "2 items"), ([], [], "no predictions"), ([0, 5], [0, 1], "outside 0..1")],
)
def test_bad_arguments(pred, gold, message):
    with pytest.raises(ValueError, match=message):
        compute_metrics(pred, gold, ["a", "b"])
