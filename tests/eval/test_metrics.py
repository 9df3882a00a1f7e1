"""Metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest

from qst_jax.eval import metrics


def test_accuracy_and_f1():
    pred, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    assert metrics.accuracy(pred, gold) == 0.6
    # tp = 2, fp = 1, fn = 1: F1 = 4 / 6
    assert metrics.f1(pred, gold) == pytest.approx(2 / 3)
    assert metrics.f1([0, 0], [1, 1]) == 0.0


def test_matthews():
    pred, gold = [1, 0, 1, 1, 0], [1, 0, 0, 1, 1]
    tp, tn, fp, fn = 2, 1, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews(pred, gold) == pytest.approx(expected)  # 1/6
    assert metrics.matthews([1, 1], [1, 0]) == 0.0  # undefined: no negative predictions
    assert metrics.matthews([1, 0], [1, 0]) == 1.0


def test_pearson_and_spearman():
    assert metrics.pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert metrics.pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # x = [1,2,3,4], y = [1,3,2,4]: cov 1.0 (centred sums 4), var 5 each -> 0.8
    assert metrics.pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    # monotone but non-linear: Spearman 1, Pearson below 1
    assert metrics.spearman([1, 2, 3, 4], [1, 8, 27, 64]) == pytest.approx(1.0)
    # ties take average ranks: ranks of [1, 2, 2, 3] are [1, 2.5, 2.5, 4]
    assert metrics.spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(metrics.pearson([1, 2.5, 2.5, 4], [1, 2, 3, 4]))
