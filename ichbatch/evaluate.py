"""`ichbatch evaluate`: metrics of predictions against labels, slice- and study-level.

- RSNA 2019 weighted multi-label log loss: per-label binary log loss, weighted 2 for `any` and 1 for
  each subtype, divided by the sum of the weights.
- ROC AUC per label (the Mann-Whitney statistic, ties counted half).
- Sensitivity and specificity at given thresholds, and the threshold that reaches a target sensitivity.
- Calibration: ten equal-width bins of predicted probability, observed rate per bin, and the expected
  calibration error (the count-weighted mean gap).
Study level: predictions and labels are reduced per study by their maximum over slices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .config import LABELS
from .errors import IchBatchError

EPS = 1e-7


def roc_auc(y: np.ndarray, p: np.ndarray) -> float | None:
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = pd.Series(p).rank(method="average").to_numpy()
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, np.float64), EPS, 1 - EPS)
    y = np.asarray(y, np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def weighted_log_loss(y: np.ndarray, p: np.ndarray, labels: tuple[str, ...]) -> float:
    weights = np.array([2.0 if label == "any" else 1.0 for label in labels])
    losses = np.array([log_loss(y[:, j], p[:, j]) for j in range(len(labels))])
    return float((weights * losses).sum() / weights.sum())


def sens_spec(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float | None]:
    y, flag = np.asarray(y).astype(bool), np.asarray(p) >= threshold
    sens = float((flag & y).sum() / y.sum()) if y.any() else None
    spec = float((~flag & ~y).sum() / (~y).sum()) if (~y).any() else None
    return {"threshold": float(threshold), "sensitivity": sens, "specificity": spec}


def threshold_for_sensitivity(y: np.ndarray, p: np.ndarray, target: float) -> float | None:
    """The highest threshold at which at least `target` of the positives are flagged."""
    pos = np.sort(np.asarray(p)[np.asarray(y).astype(bool)])[::-1]
    if len(pos) == 0:
        return None
    return float(pos[max(0, math.ceil(target * len(pos)) - 1)])


def roc_points(y: np.ndarray, p: np.ndarray, max_points: int = 200) -> dict[str, list[float]]:
    """False- and true-positive rates at every distinct threshold (thinned to max_points)."""
    y, p = np.asarray(y).astype(bool), np.asarray(p, np.float64)
    if y.all() or not y.any():
        return {"fpr": [], "tpr": []}
    order = np.argsort(-p, kind="stable")
    tps, fps = np.cumsum(y[order]), np.cumsum(~y[order])
    last = np.r_[np.diff(p[order]) != 0, True]  # one point per distinct threshold
    tpr, fpr = np.r_[0, tps[last] / y.sum()], np.r_[0, fps[last] / (~y).sum()]
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


def _level(y: np.ndarray, p: np.ndarray, labels: tuple[str, ...], thresholds: dict[str, float],
           target: float) -> dict:
    out: dict = {"n": int(len(y)), "labels": {}}
    if set(labels) == set(LABELS) or "any" in labels:
        out["weighted_log_loss"] = weighted_log_loss(y, p, labels)
    for j, label in enumerate(labels):
        thr = threshold_for_sensitivity(y[:, j], p[:, j], target)
        out["labels"][label] = {
            "positives": int(y[:, j].sum()),
            "auc": roc_auc(y[:, j], p[:, j]),
            "log_loss": log_loss(y[:, j], p[:, j]),
            "at_card_threshold": sens_spec(y[:, j], p[:, j], thresholds.get(label, 0.5)),
            f"at_sensitivity_{target:g}": None if thr is None else sens_spec(y[:, j], p[:, j], thr),
            "calibration": calibration(y[:, j], p[:, j]),
            "roc": roc_points(y[:, j], p[:, j]),
        }
    return out


def evaluate_arrays(y: np.ndarray, p: np.ndarray, labels: tuple[str, ...], groups: np.ndarray | None = None,
                    thresholds: dict[str, float] | None = None, target: float = 0.95) -> dict:
    """Slice-level metrics, and study-level ones (max per group) when groups are given."""
    thresholds = thresholds or {}
    result = {"slice": _level(y, p, labels, thresholds, target)}
    if groups is not None:
        frame = pd.DataFrame(np.hstack([y, p]), index=pd.Index(groups, name="g"))
        study = frame.groupby(level=0).max().to_numpy()
        k = len(labels)
        result["study"] = _level(study[:, :k], study[:, k:], labels, thresholds, target)
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
    y = merged[list(names)].to_numpy(np.float64)
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
            axes[1].plot([b["mean_predicted"] for b in bins], [b["observed"] for b in bins], marker="o", label=name)
        axes[1].plot([0, 1], [0, 1], "k--", linewidth=0.8)
        axes[1].set_title(f"{level}-level calibration")
        axes[1].set_xlabel("predicted")
        axes[1].set_ylabel("observed")
        axes[1].legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{level}_metrics.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths
