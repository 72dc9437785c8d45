"""Calibrated scores: Platt scaling per label, fitted on held-out labelled slices, stored in the card.

A network's sigmoid outputs are scores, not probabilities: the demo model says 1.000 for slices that
are positive far less often than that. Platt scaling maps logit(p) through a fitted line and a sigmoid
(scikit-learn's logistic regression), one line per label. The card's thresholds then apply to the
calibrated scores, and the card records the expected calibration error before and after, measured on
studies the fit did not see.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

EPS = 1e-6


def logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return np.log(p / (1 - p))


def apply(probs: np.ndarray, outputs: Sequence[str], params: Mapping[str, Sequence[float]]) -> np.ndarray:
    """(n, outputs) raw probabilities -> calibrated; outputs without parameters pass unchanged."""
    out = np.array(probs, np.float32, copy=True)
    for j, label in enumerate(outputs):
        if label in params:
            a, b = params[label]
            out[:, j] = 1.0 / (1.0 + np.exp(-(a * logit(probs[:, j]) + b)))
    return out


def ece(y: np.ndarray, p: np.ndarray) -> float:
    """Expected calibration error, as `ichbatch evaluate` reports it."""
    from ..evaluate import calibration

    return float(calibration(y, p)["ece"])


@dataclass(frozen=True)
class CalibrationFit:
    params: dict[str, list[float]]
    ece_before: dict[str, float]
    ece_after: dict[str, float]
    studies: int

    def card_entry(self, fitted_on: str) -> dict[str, object]:
        return {"method": "platt (logistic regression on logit p, per label, slice level)",
                "params": self.params, "ece_before": self.ece_before, "ece_after": self.ece_after,
                "ece_measured_on": f"{self.studies - self.studies // 2} held-out studies not used in the fit",
                "fitted_on": fitted_on}


def _platt(y: np.ndarray, p: np.ndarray) -> list[float]:
    from sklearn.linear_model import LogisticRegression

    if y.min() == y.max():
        return [1.0, 0.0]  # one class only: nothing to learn, leave the scores as they are
    model = LogisticRegression(C=1e4, max_iter=1000).fit(logit(p)[:, None], y.astype(int))
    a, b = float(model.coef_[0, 0]), float(model.intercept_[0])
    # A slope of 0 or below means the scores do not rise with the label (an untrained or failed
    # model): a map that flattens or inverts them would hide that, so the scores stay as they are.
    return [a, b] if a > 0 else [1.0, 0.0]


def fit_calibration(studies: Sequence[tuple[np.ndarray, np.ndarray]], outputs: Sequence[str],
                    seed: int = 0) -> CalibrationFit:
    """studies: (labels (n, k) 0/1, raw probabilities (n, k)) per study. ECE before and after is measured
    on half of the studies with a fit on the other half; the stored parameters use all of them."""
    if len(studies) < 4:
        raise ValueError(f"calibration needs at least 4 labelled studies. Received: {len(studies)}")
    order = np.random.default_rng(seed).permutation(len(studies))
    half = len(studies) // 2

    def stack(ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return (np.concatenate([studies[i][0] for i in ids]), np.concatenate([studies[i][1] for i in ids]))

    (y_fit, p_fit), (y_test, p_test) = stack(order[:half].tolist()), stack(order[half:].tolist())
    (y_all, p_all) = stack(range(len(studies)))
    params, before, after = {}, {}, {}
    for j, label in enumerate(outputs):
        trial = _platt(y_fit[:, j], p_fit[:, j])
        calibrated = apply(p_test[:, [j]], [label], {label: trial})[:, 0]
        before[label] = round(ece(y_test[:, j], p_test[:, j]), 4)
        after[label] = round(ece(y_test[:, j], calibrated), 4)
        params[label] = [round(v, 6) for v in _platt(y_all[:, j], p_all[:, j])]
    return CalibrationFit(params, before, after, len(studies))
