"""Checks that need the shipped demo weights (trained on anatomy phantoms); skipped when they are absent.

The thresholds here sit below the held-out figures in the card's metrics.holdout_anatomy (60 studies),
so that a handful of studies of another seed pass on a model that meets its own card."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ichbatch.anatomy import anatomy_phantom
from ichbatch.cli import main
from ichbatch.evaluate import roc_auc
from ichbatch.synth import load_masks, synth_studies

DEMO = Path(__file__).resolve().parents[1] / "models" / "ich-resnet50-demo"
pytestmark = pytest.mark.skipif(not (DEMO / "model.json").exists(), reason="demo weights not present")


def test_demo_model_ranks_bleeds_above_normal_heads_and_shows_them(tmp_path):
    """Ten anatomy studies as the held-out benchmark makes them (24 slices, half with one to three kinds of
    bleed): 'any' ranks them (study AUC), and the top key slice of the most confident positive shows
    its bleed."""
    manifest = synth_studies(tmp_path / "in", 10, seed=4, phantoms="anatomy")
    masks = load_masks(tmp_path / "in")
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(DEMO),
                                       "--tta", "1", "--no-reports"])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("study_uid")
    assert (rows["status"] == "ok").mean() >= 0.8, rows[["status", "domain_score"]]
    score = rows["prob_any"].where(rows["prob_any"] != "", rows["unassessed_prob_any"]).astype(float)
    truth = {s["study_uid"]: bool(s["labels"]["any"]) for s in manifest["studies"]}
    positive = np.array([truth[uid] for uid in score.index])
    assert 0 < positive.sum() < len(positive)
    assert roc_auc(positive, score.to_numpy()) >= 0.75, score
    best = score[positive].idxmax()
    key = int(rows.loc[best, "key_slices"].split()[0]) - 1
    assert masks[best][key].any(), "the top key slice should show the bleed"
    notice = rows.loc[best, "notice"]
    assert "ich-resnet50-demo" in notice and "NOT FOR DIAGNOSIS" in notice and "synthetic phantoms" in notice


def test_demo_report_maps_peak_inside_the_lesion():
    """The card's heat map (method, layer, flips) peaks inside the planted lesion on at least half of the
    slices the model flags (the held-out rate is in the card's metrics.holdout_anatomy)."""
    from ichbatch.pipeline import Engine, RunSettings
    from ichbatch.preprocess import resize_hu, windows_np

    engine = Engine(RunSettings(model=str(DEMO), tta=1))
    card, rng = engine.bundle.card, np.random.default_rng(8)
    hits: list[bool] = []
    for subtype in ("epidural", "intraparenchymal", "subdural", "intraventricular") * 2:
        ph = anatomy_phantom(rng, 20, 256, (subtype,))
        lesion = [k for k in range(20) if ph.masks.get(subtype, np.zeros((20, 1, 1), bool))[k].any()]
        if not lesion:
            continue
        x = np.stack([windows_np(resize_hu(ph.hu[k], card.input_size), card.windows) for k in lesion])
        flagged = engine.bundle.model.predict(x, verbose=0)[:, 0] >= card.thresholds["any"]
        scale = 256 // card.input_size
        for k, heat in zip(np.array(lesion)[flagged], engine.explainer.maps(x[flagged], 0) if flagged.any() else []):
            row, col = np.unravel_index(np.argmax(heat), heat.shape)
            hits.append(bool(ph.masks[subtype][k][row * scale, col * scale]))
    assert len(hits) >= 8, hits  # the model flags bleeds at all
    assert np.mean(hits) >= 0.5, hits


def test_heat_maps_use_bfloat16_only_where_the_cpu_has_it_and_keep_their_peaks(monkeypatch):
    """Scores stay float32 on a CPU; the maps that explain them run in bfloat16 where the CPU computes it
    natively (study.heatmap_precision), and peak where the float32 maps do."""
    from ichbatch import study
    from ichbatch.model.gradcam import CamExplainer
    from ichbatch.pipeline import Engine, RunSettings
    from ichbatch.preprocess import resize_hu, windows_np

    for native in (True, False):
        monkeypatch.setattr(study, "cpu_has_bfloat16", lambda native=native: native)
        assert study.heatmap_precision("auto", "cpu") == ("bfloat16" if native else "float32")
        assert study.heatmap_precision("float32", "cpu") == "float32"  # asked for: kept
        assert study.heatmap_precision("auto", "gpu") == "bfloat16"  # the run's own
    monkeypatch.setattr(study, "cpu_has_bfloat16", lambda: True)
    engine = Engine(RunSettings(model=str(DEMO), tta=1, device="cpu", runtime="keras"))
    assert engine.precision == "float32" and engine.predictor.bundle.model.layers[2].compute_dtype == "float32"
    half = engine.explainer
    assert half.model.layers[2].compute_dtype == "bfloat16"
    exact = CamExplainer(engine.bundle.model, half.layer, half.augment, half.method)
    card = engine.bundle.card
    ph = anatomy_phantom(np.random.default_rng(11), 20, 256, ("intraparenchymal", "subdural"))
    lesion = [k for k in range(20) if any(m[k].any() for m in ph.masks.values())]
    x = np.stack([windows_np(resize_hu(ph.hu[k], card.input_size), card.windows) for k in lesion])
    a, b = half.maps(x, 0), exact.maps(x, 0)
    assert len(lesion) >= 4 and np.abs(a - b).max() < 0.15
    peaks = [np.unravel_index(np.argmax(m), m.shape) for m in (*a, *b)]
    moved = [np.hypot(p[0] - q[0], p[1] - q[1]) for p, q in zip(peaks[:len(a)], peaks[len(a):])]
    assert np.mean(np.array(moved) <= 2) >= 0.8, moved  # pixels at the card's input size
