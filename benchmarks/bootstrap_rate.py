"""Bootstrap intervals: ichbatch's resamples scored many at once (row weights, numpy) against one
scikit-learn call per resample (how evaluate scored them before 2026-11-27), on the same data, in one run.

    python benchmarks/bootstrap_rate.py [--slices 20000] [--studies 500] [--resamples 1000]

Generated scores for the six labels, slices grouped into studies; both ways draw the same resamples of
studies, so their intervals must agree (printed). Times are for ROC AUC and PR AUC intervals of every
label at slice level, with studies as the resampled units.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from ichbatch.config import LABELS
from ichbatch.evaluate import bootstrap_ci, pr_auc, roc_auc, weighted_pr_auc, weighted_roc_auc


def per_resample(y: np.ndarray, p: np.ndarray, metric, units: np.ndarray, n: int) -> list[float] | None:  # type: ignore[no-untyped-def]
    """The reference: rows of each resample gathered and scored by scikit-learn, one call per resample."""
    _, index = np.unique(units, return_inverse=True)
    k = int(index.max()) + 1
    members = [np.flatnonzero(index == u) for u in range(k)]
    rng = np.random.default_rng(0)
    values = []
    for _ in range(n):
        rows = np.concatenate([members[u] for u in rng.integers(0, k, k)])
        value = metric(y[rows], p[rows])
        if value is not None:
            values.append(value)
    if len(values) < n // 2:
        return None
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=20000)
    parser.add_argument("--studies", type=int, default=500)
    parser.add_argument("--resamples", type=int, default=1000)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(args.studies), -(-args.slices // args.studies))[:args.slices]
    y = (rng.random((args.slices, len(LABELS))) < 0.1).astype(float)
    y[:, 0] = y[:, 1:].max(axis=1)
    p = np.clip(0.3 * y + rng.normal(0.3, 0.2, y.shape), 0, 1)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; {args.slices} slices of {args.studies} "
          f"studies, {len(LABELS)} labels, {args.resamples} resamples of studies")
    start = time.perf_counter()
    fast = [bootstrap_ci(y[:, j], p[:, j], metric, groups, n=args.resamples)
            for j in range(len(LABELS)) for metric in (weighted_roc_auc, weighted_pr_auc)]
    fast_s = time.perf_counter() - start
    print(f"  numpy, many resamples at once: {fast_s:.1f} s")
    start = time.perf_counter()
    slow = [per_resample(y[:, j], p[:, j], metric, groups, args.resamples)
            for j in range(len(LABELS)) for metric in (roc_auc, pr_auc)]
    slow_s = time.perf_counter() - start
    print(f"  scikit-learn, one call per resample: {slow_s:.1f} s")
    same = all((a is None and b is None) or (a is not None and b is not None and np.allclose(a, b, atol=1e-9))
               for a, b in zip(fast, slow))
    print(f"same intervals: {same}; ratio scikit-learn / numpy: {slow_s / fast_s:.1f}")

if __name__ == "__main__":
    main()
