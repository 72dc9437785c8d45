"""Slice -> study rule, against values computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from ichbatch.aggregate import aggregate, smooth_z, study_score
from ichbatch.config import LABELS


def test_smoothing_is_121_with_repeated_edges():
    p = np.array([[0.0], [1.0], [0.0], [0.0]])
    assert np.allclose(smooth_z(p)[:, 0], [0.25, 0.5, 0.25, 0.0])


def test_max_and_topk_scores():
    curve = np.array([0.1, 0.9, 0.5, 0.7])
    assert study_score(curve, "max") == pytest.approx(0.9)
    assert study_score(curve, "topk", 2) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="Received: 'median'"):
        study_score(curve, "median")


def test_flags_key_slices_and_missing_labels():
    probs = np.zeros((5, 2))
    probs[2, 0], probs[3, 0] = 0.9, 0.8  # "any" high on slices 3 and 4
    probs[:, 1] = 0.1
    agg = aggregate(probs, ("any", "subdural"), LABELS, {"any": 0.5, "subdural": 0.5})
    # smoothed any: [0, .225, .65, .625, .2]
    assert agg.scores["any"] == pytest.approx(0.65)
    assert agg.flags["any"] is True and agg.flags["subdural"] is False
    assert agg.scores["epidural"] is None and agg.flags["epidural"] is None
    assert agg.key_slices == (2, 3, 1)
