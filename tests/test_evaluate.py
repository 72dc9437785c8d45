"""Metrics against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ichbatch.cli import main
from ichbatch.evaluate import (bootstrap_ci, calibration, evaluate_arrays, log_loss, pr_auc, roc_auc, sens_spec,
                               threshold_for_sensitivity, weighted_log_loss, weighted_pr_auc, weighted_roc_auc, wilson)

Y = np.array([1, 0, 1, 0])
P = np.array([0.9, 0.2, 0.6, 0.7])


def test_auc_counts_correctly_ordered_pairs():
    assert roc_auc(Y, P) == pytest.approx(0.75)  # 3 of the 4 positive/negative pairs are ordered
    assert roc_auc(np.array([1, 0]), np.array([0.5, 0.5])) == pytest.approx(0.5)  # a tie counts half
    assert roc_auc(np.array([1, 1]), np.array([0.1, 0.2])) is None


def test_log_losses():
    expected = -(math.log(0.9) + math.log(0.8) + math.log(0.6) + math.log(0.3)) / 4
    assert log_loss(Y, P) == pytest.approx(expected)
    y2, p2 = np.stack([Y, 1 - Y], 1), np.stack([P, 1 - P], 1)  # second label: same loss
    assert weighted_log_loss(y2, p2, ("any", "epidural")) == pytest.approx(expected)
    p3 = np.stack([P, np.full(4, 0.5)], 1)
    assert weighted_log_loss(y2, p3, ("any", "epidural")) == pytest.approx((2 * expected + math.log(2)) / 3)


def test_sensitivity_specificity_and_target_threshold():
    at = sens_spec(Y, P, 0.5)
    assert (at["threshold"], at["sensitivity"], at["specificity"]) == (0.5, 1.0, 0.5)
    assert threshold_for_sensitivity(Y, P, 0.5) == pytest.approx(0.9)
    assert threshold_for_sensitivity(Y, P, 1.0) == pytest.approx(0.6)


def test_calibration_error():
    cal = calibration(Y, P)
    assert cal["ece"] == pytest.approx((0.1 + 0.2 + 0.4 + 0.7) / 4)
    assert [b["bin"] for b in cal["bins"]] == [2, 6, 7, 9]


def test_study_level_takes_the_max_per_study():
    y = np.array([[0], [1], [0], [0]])
    p = np.array([[0.1], [0.8], [0.3], [0.2]])
    result = evaluate_arrays(y, p, ("any",), groups=np.array(["a", "a", "b", "b"]))
    assert result["study"]["n"] == 2 and result["study"]["labels"]["any"]["auc"] == pytest.approx(1.0)
    assert result["slice"]["labels"]["any"]["auc"] == pytest.approx(1.0)


def test_evaluate_command_with_rsna_labels(tmp_path):
    pd.DataFrame({"image_id": ["ID_a1", "ID_b2", "ID_c3", "ID_d4"], "prob_any": P}).to_csv(tmp_path / "p.csv", index=False)
    rows = [{"ID": f"{i}_any", "Label": int(y)} for i, y in zip(["ID_a1", "ID_b2", "ID_c3", "ID_d4"], Y)]
    pd.DataFrame(rows).to_csv(tmp_path / "stage_2_train.csv", index=False)
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "stage_2_train.csv"),
                                       "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert metrics["slice"]["labels"]["any"]["auc"] == pytest.approx(0.75) and metrics["matched"] == 4
    assert (tmp_path / "ev" / "slice_metrics.png").read_bytes()[:4] == b"\x89PNG"


def test_wilson_interval_matches_the_textbook_case():
    # 8 of 10: Wilson 95% interval 0.490-0.943 (Newcombe 1998, and any table of it).
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    at = sens_spec(np.array([1] * 10 + [0] * 4), np.array([0.9] * 8 + [0.1] * 2 + [0.1] * 4), 0.5)
    assert at["sensitivity"] == 0.8 and at["sensitivity_ci95"] == pytest.approx([low, high])
    assert wilson(0, 0) is None


def test_bootstrap_intervals_resample_studies_and_contain_the_estimate(monkeypatch):
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    p = np.clip(0.3 * y + rng.normal(0.35, 0.2, 400), 0, 1)
    low, high = bootstrap_ci(y, p, weighted_roc_auc)
    assert low < roc_auc(y, p) < high and 0.02 < high - low < 0.2
    monkeypatch.setattr("ichbatch.evaluate.RESAMPLE_CELLS", 1000)  # two resamples at a time: the same draws
    assert bootstrap_ci(y, p, weighted_roc_auc) == pytest.approx([low, high], abs=1e-12)
    monkeypatch.undo()
    low, high = bootstrap_ci(y, p, weighted_pr_auc)
    assert low < pr_auc(y, p) < high and 0.02 < high - low < 0.3
    assert bootstrap_ci(np.array([0, 0, 1, 1]), np.array([0.1, 0.2, 0.8, 0.9]), weighted_roc_auc) == [1.0, 1.0]
    # Whole studies resampled: two studies of identical slices give a degenerate, not a narrow, interval.
    groups = np.repeat(["a", "b"], 200)
    assert bootstrap_ci(y, p, weighted_roc_auc, groups) != bootstrap_ci(y, p, weighted_roc_auc)
    assert pr_auc(np.array([0, 1]), np.array([0.2, 0.9])) == pytest.approx(1.0)
    assert bootstrap_ci(np.array([1, 1, 1]), np.array([0.1, 0.5, 0.9]), weighted_pr_auc) is None  # no negatives


def test_weighted_metrics_equal_scikit_learn_on_the_rows_repeated():
    rng = np.random.default_rng(4)
    y = (rng.random(300) < 0.3).astype(int)
    p = np.round(np.clip(0.3 * y + rng.normal(0.35, 0.2, 300), 0, 1), 1)  # rounded: many tied scores
    counts = rng.integers(0, 3, (20, 300)).astype(float)  # 0, 1 or 2 copies of each row
    counts[0] = 1.0
    counts[1] = np.where(y == 1, 0.0, 1.0)  # positives all left out: undefined
    auc, ap = weighted_roc_auc(y, p, counts), weighted_pr_auc(y, p, counts)
    assert np.isnan(auc[1]) and np.isnan(ap[1])
    for b in (0, *range(2, 20)):
        rows = np.repeat(np.arange(300), counts[b].astype(int))
        assert auc[b] == pytest.approx(roc_auc(y[rows], p[rows]), abs=1e-12)
        assert ap[b] == pytest.approx(pr_auc(y[rows], p[rows]), abs=1e-12)


def test_evaluate_prints_intervals_and_refuses_bad_arguments_cleanly(tmp_path):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 60)
    pd.DataFrame({"image_id": [f"ID_{k:03x}" for k in range(60)], "prob_any": np.clip(0.5 * y + rng.random(60) * 0.6, 0, 1)}
                 ).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"image_id": [f"ID_{k:03x}" for k in range(60)], "any": y}).to_csv(tmp_path / "l.csv", index=False)
    result = CliRunner().invoke(main, ["evaluate", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "l.csv"),
                                       "--out", str(tmp_path / "ev")])
    assert result.exit_code == 0, result.output
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())["slice"]["labels"]["any"]
    low, high = metrics["auc_ci95"]
    assert low <= metrics["auc"] <= high and f"({low:.3f}-{high:.3f})" in result.output
    assert "Wilson" in result.output and metrics["pr_auc_ci95"] is not None
    for args, words in ((["--model", "nope"], "nope"), (["--target-sensitivity", "2"], "target-sensitivity")):
        bad = CliRunner().invoke(main, ["evaluate", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "l.csv"),
                                        "--out", str(tmp_path / "ev2"), *args])
        assert bad.exit_code == 2 and words in bad.output and "Traceback" not in bad.output
    pd.DataFrame({"image_id": [f"ID_{k:03x}" for k in range(60)], "any": 0.5}).to_csv(tmp_path / "soft.csv", index=False)
    bad = CliRunner().invoke(main, ["evaluate", str(tmp_path / "p.csv"), "--labels", str(tmp_path / "soft.csv"),
                                    "--out", str(tmp_path / "ev3")])
    assert bad.exit_code == 2 and "must be 0 or 1" in bad.output and "Traceback" not in bad.output
