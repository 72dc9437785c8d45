"""Metrics against values computed by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ichbatch.cli import main
from ichbatch.evaluate import (calibration, evaluate_arrays, log_loss, roc_auc, sens_spec,
                               threshold_for_sensitivity, weighted_log_loss)

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
    assert sens_spec(Y, P, 0.5) == {"threshold": 0.5, "sensitivity": 1.0, "specificity": 0.5}
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
