"""The PDF's Grad-CAM overlay lands where the model's evidence is: a bundle whose head is built to
respond to a planted lesion must show its hottest area on that lesion, through the whole pipeline
(decode, resize, on-device windowing, CAM, upsampling, overlay, PDF)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from click.testing import CliRunner
from pydicom.uid import generate_uid
from pypdf import PdfReader

from ichbatch.cli import main
from ichbatch.config import DEFAULT_WINDOWS
from ichbatch.model.bundle import ModelCard, write_bundle
from ichbatch.model.resnet import FEATURE_LAYER, HEAD_LAYER, build_resnet50
from ichbatch.preprocess import resize_hu, windows_np
from ichbatch.synth import ct_slice_dataset, make_phantom


def test_pdf_overlay_is_hottest_on_the_planted_lesion(tmp_path):
    import keras

    hu = make_phantom(np.random.default_rng(8), n_slices=1, size=256).hu[0]
    yy, xx = np.mgrid[:256, :256]
    # A large hematoma centred where feature cell (2, 1) of the 4x4 grid looks: input pixel (64, 32) at 128 px.
    lesion = (yy - 128) ** 2 + (xx - 64) ** 2 < 22**2
    hu[lesion] = 75.0
    model = build_resnet50(128, 6, seed=5)
    x = windows_np(resize_hu(hu, 128), DEFAULT_WINDOWS)[None]
    feats = keras.Model(model.inputs, model.get_layer(FEATURE_LAYER).output).predict_on_batch(x)[0]
    kernel, bias = model.get_layer(HEAD_LAYER).get_weights()
    # Weight only the channels in which the lesion's cell exceeds every other cell: a detector of it.
    others = np.delete(feats.reshape(-1, feats.shape[-1]), 2 * 4 + 1, axis=0)
    kernel[:, 0] = np.maximum(feats[2, 1] - others.max(axis=0), 0)
    model.get_layer(HEAD_LAYER).set_weights([kernel, bias])
    bundle = write_bundle(tmp_path / "lesion-detector", ModelCard(name="lesion-detector", version="0", input_size=128,
                                                                  trained_on="constructed for this test"), model)
    (tmp_path / "study").mkdir()
    ct_slice_dataset(hu, z=0, study_uid=generate_uid(), series_uid=generate_uid()).save_as(
        tmp_path / "study" / "slice.dcm", enforce_file_format=True)
    out = tmp_path / "results.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "study"), "--out", str(out), "--model", str(bundle),
                                       "--tta", "1", "--min-slices", "1"])
    assert result.exit_code == 0, result.output
    pdf = pd.read_csv(out, dtype=str)["report_pdf"][0]
    # pypdf lists images in resource order, not drawing order: the overlay is the one image in colour.
    images = [np.asarray(im.image.convert("RGB")).astype(int) for im in PdfReader(pdf).pages[0].images]
    overlay = max((a for a in images if a.shape[1] > 50),  # not the narrow colour bar
                  key=lambda a: int((a[..., 0] - a[..., 2]).max()))
    assert overlay.shape[:2] == (256, 256)
    # JET runs blue -> red and saturates, so take the hottest area (red well above blue) and its centre.
    heat = overlay[..., 0] - overlay[..., 2]
    rows, cols = np.nonzero(heat >= 0.8 * heat.max())
    r, c = rows.mean(), cols.mean()
    # The map comes from a 4x4 feature grid (64 px cells at this size): the hot area must centre on the
    # lesion, and far from where a left-right flip or a transpose would put it (an up-down flip leaves
    # row 128 of 256 in place; test_model checks the vertical placement of feature cells).
    def dist(y: float, x: float) -> float:
        return float(np.hypot(r - y, c - x))

    assert lesion[int(round(r)), int(round(c))], (r, c)  # the hot area is centred on the lesion
    assert 2 * dist(128, 64) < min(dist(128, 192), dist(64, 128)), (r, c)
