"""Is a study like the data the model was trained on? A distance in the model's own feature space.

Each slice's pooled features (the input of the classifier head) are projected to a few principal
components and measured by Mahalanobis distance under a shrinkage (Ledoit-Wolf) covariance, both fitted
on training-like slices. A study's score is the lower quartile of its slices' distances: lesion slices
sit far out, and the lower quartile does not move until three quarters of a study are lesion, so
lesions do not set the threshold. (Measured on the demo bundle with 100 fit/held-out phantom studies:
in-domain studies' highest score 9.5 as the median but 5.6 as the lower quartile, against 13.7 and 11.9
for the real head phantom; the lower quartile doubles the margin.) The threshold is a high quantile
of the scores of held-out studies (not slices) times a margin, fitted by `ichbatch models fit-domain`.
Scores from the model's outputs (max probability, energy) are not used: on real CT the demo model is
confidently wrong, which is exactly what this check must catch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BundleError

STATISTIC = "lower quartile of the slices' Mahalanobis distances of pooled features (PCA, Ledoit-Wolf covariance)"
QUANTILE = 0.25  # of a study's slice distances
FEATURES = "pooled features of the unaugmented view (the same at any --tta)"


@dataclass(frozen=True)
class DomainCheck:
    mean: np.ndarray  # (d,) feature mean
    components: np.ndarray  # (k, d) principal axes
    precision: np.ndarray  # (k, k) inverse of the shrunk covariance in the projected space
    threshold: float  # study scores above it are outside the domain

    def slice_distances(self, features: np.ndarray) -> np.ndarray:
        """(n, d) pooled features -> (n,) Mahalanobis distances."""
        z = (np.asarray(features, np.float64) - self.mean) @ self.components.T
        return np.sqrt(np.maximum(((z @ self.precision) * z).sum(axis=1), 0.0))  # einsum here took 12 ms a study

    def study_score(self, features: np.ndarray) -> float:
        return float(np.quantile(self.slice_distances(features), QUANTILE)) if len(features) else float("inf")

    def save(self, path: Path) -> None:
        with open(path, "wb") as fh:
            np.savez(fh, mean=self.mean.astype(np.float32), components=self.components.astype(np.float32),
                     precision=self.precision.astype(np.float64), threshold=np.float64(self.threshold))

    @classmethod
    def load(cls, path: Path) -> DomainCheck:
        try:
            with np.load(path, allow_pickle=False) as data:
                check = cls(data["mean"].astype(np.float64), data["components"].astype(np.float64),
                            data["precision"], float(data["threshold"]))
        except (OSError, KeyError, ValueError) as exc:
            raise BundleError(f"{path}: not a readable domain-check file ({exc})") from exc
        if check.components.shape[1] != check.mean.shape[0] or check.precision.shape != (len(check.components),) * 2:
            raise BundleError(f"{path}: domain-check arrays do not fit together")
        return check


@dataclass(frozen=True)
class DomainFit:
    check: DomainCheck
    fit_studies: int
    held_out_scores: np.ndarray  # study scores of the held-out studies
    quantile: float
    margin: float

    def summary(self) -> dict[str, object]:
        scores = self.held_out_scores
        return {"statistic": STATISTIC, "features": FEATURES, "dimensions": int(self.check.components.shape[0]),
                "fit_studies": self.fit_studies, "held_out_studies": int(len(scores)),
                "threshold": round(self.check.threshold, 4),
                "rule": f"{self.quantile:.3g} quantile of held-out study scores x {self.margin:g}",
                "held_out_outside": round(float(np.mean(scores > self.check.threshold)), 4),
                "held_out_median_score": round(float(np.median(scores)), 4),
                "held_out_max_score": round(float(np.max(scores)), 4)}


def fit_domain(studies: Sequence[np.ndarray], dims: int = 64, quantile: float = 0.99, margin: float = 1.25,
               seed: int = 0) -> DomainFit:
    """studies: one (n_slices, d) feature array per study. Half the studies fit the space, the other
    half set the threshold (split by study, never by slice: slices of one study are alike)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

    studies = [np.asarray(s, np.float64) for s in studies if len(s)]
    if len(studies) < 4:
        raise ValueError(f"fitting a domain check needs at least 4 studies. Received: {len(studies)}")
    order = np.random.default_rng(seed).permutation(len(studies))
    half = len(studies) // 2
    fit = np.concatenate([studies[i] for i in order[:half]])
    k = int(min(dims, fit.shape[0] - 1, fit.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(fit)
    projected = pca.transform(fit)
    precision = LedoitWolf().fit(projected).precision_
    base = DomainCheck(pca.mean_, pca.components_, precision, float("inf"))
    scores = np.array([base.study_score(studies[i]) for i in order[half:]])
    threshold = float(np.quantile(scores, quantile) * margin)
    check = DomainCheck(pca.mean_, pca.components_, precision, threshold)
    return DomainFit(check, half, scores, quantile, margin)
