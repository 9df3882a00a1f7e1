"""Task metrics, computed in float64 numpy from predictions and references."""

from __future__ import annotations

import math

import numpy as np


def accuracy(pred, gold) -> float:
    pred, gold = np.asarray(pred), np.asarray(gold)
    return float(np.mean(pred == gold))


def f1(pred, gold, positive: int = 1) -> float:
    """F1 of the positive class (GLUE's MRPC and QQP)."""
    pred, gold = np.asarray(pred) == positive, np.asarray(gold) == positive
    tp = float(np.sum(pred & gold))
    fp = float(np.sum(pred & ~gold))
    fn = float(np.sum(~pred & gold))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


def matthews(pred, gold) -> float:
    """Matthews correlation of binary predictions (GLUE's CoLA); 0 when undefined."""
    pred, gold = np.asarray(pred) == 1, np.asarray(gold) == 1
    tp = float(np.sum(pred & gold))
    tn = float(np.sum(~pred & ~gold))
    fp = float(np.sum(pred & ~gold))
    fn = float(np.sum(~pred & gold))
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return 0.0 if denom == 0 else (tp * tn - fp * fn) / denom


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denom = math.sqrt(float(np.sum(x * x) * np.sum(y * y)))
    return 0.0 if denom == 0 else float(np.sum(x * y) / denom)


def _ranks(x) -> np.ndarray:
    """Average ranks (ties share the mean of their positions), 1-based."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    return pearson(_ranks(x), _ranks(y))
