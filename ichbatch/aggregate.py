"""Stage 5: slice probabilities -> study scores, flags and key slices.

The rule (documented in the README): each label's slice probabilities are smoothed along z with a
[1, 2, 1] / 4 kernel (edges repeated), so a single noisy slice counts less than a run of positive
slices; the study score is then the maximum of the smoothed curve ("max"), or the mean of its k highest
values ("topk"). A label is flagged when its score reaches the card's threshold. Key slices are the
slices with the highest smoothed "any" score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("max", "topk")
N_KEY = 3  # key slices per study: shown in the report, each with its heat map


@dataclass(frozen=True)
class Aggregation:
    smoothed: np.ndarray  # (n_slices, n_outputs)
    scores: dict[str, float | None]
    flags: dict[str, bool | None]
    key_slices: tuple[int, ...]


def smooth_z(probs: np.ndarray) -> np.ndarray:
    if probs.shape[0] < 3:
        return probs.copy()
    padded = np.concatenate([probs[:1], probs, probs[-1:]])
    return (padded[:-2] + 2 * padded[1:-1] + padded[2:]) / 4


def study_score(curve: np.ndarray, method: str = "max", k: int = 3) -> float:
    if method == "max":
        return float(curve.max())
    if method == "topk":
        return float(np.sort(curve)[-min(k, len(curve)) :].mean())
    raise ValueError(f"aggregation method must be one of {METHODS}. Received: {method!r}")


def aggregate(
    probs: np.ndarray,
    outputs: tuple[str, ...],
    labels: tuple[str, ...],
    thresholds: dict[str, float],
    method: str = "max",
    k: int = 3,
    n_key: int = N_KEY,
) -> Aggregation:
    """Labels the model does not output get None (reported as not available), never a made-up score."""
    smoothed = smooth_z(probs)
    scores: dict[str, float | None] = {}
    flags: dict[str, bool | None] = {}
    for label in labels:
        if label in outputs:
            score = study_score(smoothed[:, outputs.index(label)], method, k)
            scores[label] = score
            flags[label] = score >= thresholds.get(label, 0.5)
        else:
            scores[label], flags[label] = None, None
    key_curve = smoothed[:, outputs.index("any")] if "any" in outputs else smoothed.max(axis=1)
    order = np.argsort(-key_curve, kind="stable")[:n_key]
    return Aggregation(smoothed, scores, flags, tuple(int(i) for i in order))
