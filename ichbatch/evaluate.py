"""`ichbatch evaluate`: metrics of predictions against labels, slice- and study-level, with intervals.

scikit-learn computes the metrics and SciPy the binomial intervals (well-kept, tested code instead of
our own rank sums):
- ROC AUC and PR AUC (average precision) per label, each with a bootstrap 95% interval: 1000
  resamples of studies (slices of one study are not independent, so slice-level metrics resample
  whole studies too), percentile method, fixed seed. The resamples are scored in numpy, many at once, as
  the same two metrics with row weights (a test holds them equal to scikit-learn's on the rows repeated):
  a scikit-learn call per resample took seconds per label on a small validation set, minutes on a large one.
- Sensitivity and specificity at the card's thresholds (or a target sensitivity), with Wilson 95%
  intervals.
- The RSNA 2019 weighted multi-label log loss: per-label binary log loss, weighted 2 for `any` and 1 for
  each subtype, divided by the sum of the weights.
- Reliability: ten equal-width bins of predicted probability, the observed rate per bin, and the
  expected calibration error (the count-weighted mean gap); a reliability diagram per level.
Study level: predictions and labels are reduced per study by their maximum over slices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .config import LABELS
from .errors import IchBatchError

EPS = 1e-7
BOOTSTRAP = 1000
RESAMPLE_CELLS = 4_000_000  # resamples x rows weighed at once (32 MB of float64 a copy)


def _both_classes(y: np.ndarray) -> bool:
    return 0 < int(np.sum(y)) < len(y)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y).astype(int)
    return float(roc_auc_score(y, p)) if _both_classes(y) else None


def pr_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    from sklearn.metrics import average_precision_score

    y = np.asarray(y).astype(int)
    return float(average_precision_score(y, p)) if _both_classes(y) else None


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import log_loss as sk_log_loss

    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    return float(sk_log_loss(np.asarray(y).astype(int), p, labels=[0, 1]))


def weighted_log_loss(y: np.ndarray, p: np.ndarray, labels: tuple[str, ...]) -> float:
    weights = np.array([2.0 if label == "any" else 1.0 for label in labels])
    losses = np.array([log_loss(y[:, j], p[:, j]) for j in range(len(labels))])
    return float((weights * losses).sum() / weights.sum())


def wilson(successes: int, n: int) -> list[float] | None:
    """Wilson score 95% interval of a proportion (SciPy)."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    ci = binomtest(successes, n).proportion_ci(confidence_level=0.95, method="wilson")
    return [float(ci.low), float(ci.high)]


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, object]:
    y, flag = np.asarray(y).astype(bool), np.asarray(p) >= threshold
    tp, tn, pos, neg = int((flag & y).sum()), int((~flag & ~y).sum()), int(y.sum()), int((~y).sum())
    return {"threshold": float(threshold),
            "sensitivity": tp / pos if pos else None, "sensitivity_ci95": wilson(tp, pos),
            "specificity": tn / neg if neg else None, "specificity_ci95": wilson(tn, neg)}


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float | None:
    """The highest threshold at which at least `target` of the positives are flagged."""
    pos = np.sort(np.asarray(p)[np.asarray(y).astype(bool)])[::-1]
    if len(pos) == 0:
        return None
    return float(pos[max(0, math.ceil(target * len(pos)) - 1)])


def roc_points(y: np.ndarray, p: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    y = np.asarray(y).astype(int)
    if not _both_classes(y):
        return {"fpr": [], "tpr": []}
    fpr, tpr, _ = roc_curve(y, p)
    keep = np.unique(np.linspace(0, len(tpr) - 1, min(max_points, len(tpr))).astype(int))
    return {"fpr": fpr[keep].round(4).tolist(), "tpr": tpr[keep].round(4).tolist()}


def calibration(y: np.ndarray, p: np.ndarray, bins: int = 10) -> dict:
    y, p = np.asarray(y, np.float64), np.asarray(p, np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    rows, ece = [], 0.0
    for b in range(bins):
        sel = idx == b
        if sel.any():
            mean_p, rate = float(p[sel].mean()), float(y[sel].mean())
            rows.append({"bin": b, "count": int(sel.sum()), "mean_predicted": mean_p, "observed": rate})
            ece += sel.sum() / len(p) * abs(mean_p - rate)
    return {"bins": rows, "ece": float(ece)}


def _score_blocks(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights of the positives and of the negatives at each distinct score, scores ascending: (B, k) each,
    for B weightings w (B, n) of the rows."""
    p, y = np.asarray(p), np.asarray(y)
    if not np.all(p[1:] >= p[:-1]):  # bootstrap_ci sorts once for all its resamples
        order = np.argsort(p, kind="mergesort")
        p, y, w = p[order], y[order], w[:, order]
    pos = np.where(y.astype(bool), w, 0.0)
    starts = np.flatnonzero(np.r_[True, p[1:] != p[:-1]])
    if len(starts) < len(p):  # tied scores: one block per distinct score
        pos, w = np.add.reduceat(pos, starts, axis=1), np.add.reduceat(w, starts, axis=1)
    return pos, w - pos  # exact for counts in float64


def weighted_roc_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """ROC AUC with each row counted w times, for each row of w (B, n): the Mann-Whitney statistic with ties
    counted half, which is the trapezoidal AUC that `roc_auc` computes. NaN where a class is absent."""
    pos, neg = _score_blocks(y, p, w)
    below = np.cumsum(neg, axis=1) - neg  # negatives' weight at lower scores
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def weighted_pr_auc(y: np.ndarray, p: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Average precision (what `pr_auc` computes) with each row counted w times, for each row of w (B, n):
    the sum over thresholds, highest first, of the recall gained times the precision there. NaN where a
    class is absent."""
    pos, neg = (a[:, ::-1] for a in _score_blocks(y, p, w))
    tp, flagged = np.cumsum(pos, axis=1), np.cumsum(pos + neg, axis=1)
    precision = np.divide(tp, flagged, out=np.zeros_like(tp), where=flagged > 0)
    n_pos, n_neg = pos.sum(axis=1), neg.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ap = (pos * precision).sum(axis=1) / n_pos
    return np.where(n_neg > 0, ap, np.nan)


def bootstrap_ci(y: np.ndarray, p: np.ndarray,
                 metric: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
                 units: np.ndarray | None = None, n: int = BOOTSTRAP, seed: int = 0) -> list[float] | None:
    """Percentile 95% interval of metric over resamples of units (studies; rows when units is None).
    Resamples where the metric is undefined (one class only) are left out.

    A resample is a count per unit; the metric (weighted_roc_auc, weighted_pr_auc) takes those counts as row
    weights for many resamples at once. One scikit-learn call per resample cost minutes at RSNA scale."""
    units = np.arange(len(y)) if units is None else np.asarray(units)
    order = np.argsort(p, kind="mergesort")  # once, not once per chunk of resamples
    y, p, units = np.asarray(y)[order], np.asarray(p)[order], units[order]
    _, index = np.unique(units, return_inverse=True)
    k = int(index.max()) + 1 if len(index) else 0
    if k == 0:
        return None
    rng = np.random.default_rng(seed)
    per_chunk = max(1, RESAMPLE_CELLS // len(y))  # resamples at once: memory bounded for any data set
    scored = []
    for start in range(0, n, per_chunk):
        c = min(per_chunk, n - start)
        draws = rng.integers(0, k, (c, k)) + k * np.arange(c)[:, None]  # resample r's units, offset by r * k
        counts = np.bincount(draws.ravel(), minlength=c * k).reshape(c, k).astype(np.float64)
        scored.append(metric(y, p, counts[:, index]))
    values = np.concatenate(scored)
    values = values[~np.isnan(values)]
    if len(values) < n // 2:
        return None
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def _level(y: np.ndarray, p: np.ndarray, labels: tuple[str, ...], thresholds: dict[str, float],
           target: float, units: np.ndarray | None) -> dict:
    out: dict = {"n": int(len(y)), "labels": {}}
    if "any" in labels:
        out["weighted_log_loss"] = weighted_log_loss(y, p, labels)
    for j, label in enumerate(labels):
        yj, pj = y[:, j], p[:, j]
        thr = threshold_for_sensitivity(yj, pj, target)
        out["labels"][label] = {
            "positives": int(yj.sum()),
            "auc": roc_auc(yj, pj), "auc_ci95": bootstrap_ci(yj, pj, weighted_roc_auc, units),
            "pr_auc": pr_auc(yj, pj), "pr_auc_ci95": bootstrap_ci(yj, pj, weighted_pr_auc, units),
            "log_loss": log_loss(yj, pj),
            "at_card_threshold": sens_spec(yj, pj, thresholds.get(label, 0.5)),
            f"at_sensitivity_{target:g}": None if thr is None else sens_spec(yj, pj, thr),
            "calibration": calibration(yj, pj),
            "roc": roc_points(yj, pj),
        }
    return out


def evaluate_arrays(y: np.ndarray, p: np.ndarray, labels: tuple[str, ...], groups: np.ndarray | None = None,
                    thresholds: dict[str, float] | None = None, target: float = 0.95) -> dict:
    """Slice-level metrics, and study-level ones (max per group) when groups are given."""
    thresholds = thresholds or {}
    result: dict[str, object] = {"slice": _level(y, p, labels, thresholds, target, groups)}
    if groups is not None:
        frame = pd.DataFrame(np.hstack([y, p]), index=pd.Index(groups, name="g"))
        study = frame.groupby(level=0).max().to_numpy()
        k = len(labels)
        result["study"] = _level(study[:, :k], study[:, k:], labels, thresholds, target, None)
    result["method"] = (f"intervals: bootstrap ({BOOTSTRAP} resamples of studies, percentile) for AUC and PR AUC; "
                        "Wilson for sensitivity and specificity; all 95%")
    return result


def load_labels(path: Path) -> pd.DataFrame:
    """Labels as a wide table: keys (study_uid and slice, or image_id) and one 0/1 column per label.

    Accepts a wide CSV, the RSNA long format (`ID_<image>_<label>,Label`), or an `ichbatch synth`
    manifest.json (slice numbers 1-based in z order, as `--slices` writes them).
    """
    if path.suffix == ".json":
        return _labels_from_manifest(json.loads(path.read_text()))
    df = pd.read_csv(path)
    if list(df.columns[:2]) == ["ID", "Label"]:
        parts = df["ID"].str.extract(r"^(ID_[0-9a-fA-F]+)_(\w+)$")
        df = pd.DataFrame({"image_id": parts[0], "label": parts[1], "value": df["Label"]})
        return df.pivot_table(index="image_id", columns="label", values="value", aggfunc="max").reset_index()
    return df


def _labels_from_manifest(manifest: dict) -> pd.DataFrame:
    rows = []
    for study in manifest["studies"]:
        by_slice = {s["index"]: s["labels"] for s in study["lesion_slices"]}
        n = study.get("n_slices") or max([*by_slice, 0]) + 1
        for k in range(n):
            present = by_slice.get(k, [])
            rows.append({"study_uid": study["study_uid"], "slice": k + 1, "any": int(bool(present)),
                         **{label: int(label in present) for label in LABELS[1:]}})
    return pd.DataFrame(rows)


def evaluate_files(predictions: Path, labels: Path, thresholds: dict[str, float] | None = None,
                   target: float = 0.95) -> dict:
    pred, lab = pd.read_csv(predictions), load_labels(labels)
    keys = [k for k in ("study_uid", "slice", "image_id") if k in pred.columns and k in lab.columns]
    if not keys:
        raise IchBatchError("predictions and labels share no key column (study_uid, slice or image_id)")
    merged = pred.merge(lab, on=keys, how="inner", suffixes=("", "_label"))
    if merged.empty:
        raise IchBatchError("no prediction matched a label; check that both describe the same studies")
    names = tuple(label for label in LABELS if f"prob_{label}" in merged.columns and label in merged.columns)
    if not names:
        raise IchBatchError(f"{predictions.name} has no prob_<label> column with a matching label column in "
                            f"{labels.name} (labels: {', '.join(LABELS)})")
    y = merged[list(names)].to_numpy(np.float64)
    if not np.isin(y, (0.0, 1.0)).all():
        raise IchBatchError(f"labels in {labels.name} must be 0 or 1 (found other values in "
                            f"{', '.join(n for n in names if not merged[n].isin((0, 1)).all())}); "
                            "are predictions and labels the right way round?")
    p = merged[[f"prob_{label}" for label in names]].to_numpy(np.float64)
    groups = merged["study_uid"].to_numpy() if "slice" in keys and "study_uid" in keys else None
    result = evaluate_arrays(y, p, names, groups, thresholds, target)
    result["matched"] = int(len(merged))
    result["unmatched_predictions"] = int(len(pred) - len(merged))
    return result


def plot(result: dict, folder: Path) -> list[Path]:
    """Per level: ROC curves and a calibration (reliability) diagram, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    for level in ("slice", "study"):
        if level not in result:
            continue
        labels = result[level]["labels"]
        fig, axes = plt.subplots(1, 2, figsize=(10, 4))
        names = list(labels)
        for name in names:
            roc, auc = labels[name]["roc"], labels[name]["auc"]
            axes[0].plot(roc["fpr"], roc["tpr"], label=f"{name} (AUC {auc:.3f})" if auc is not None else name)
        axes[0].plot([0, 1], [0, 1], "k--", linewidth=0.8)
        axes[0].set_xlabel("1 - specificity")
        axes[0].set_ylabel("sensitivity")
        axes[0].set_title(f"{level}-level ROC")
        axes[0].legend(fontsize=7)
        for name in names:
            bins = labels[name]["calibration"]["bins"]
            ece = labels[name]["calibration"]["ece"]
            axes[1].plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o",
                         label=f"{name} (ECE {ece:.3f})")
        axes[1].plot([0, 1], [0, 1], "k--", linewidth=0.8)
        axes[1].set_title(f"{level}-level reliability diagram")
        axes[1].set_xlabel("predicted")
        axes[1].set_ylabel("observed")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{level}_metrics.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
