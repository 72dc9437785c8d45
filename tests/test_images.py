"""Plain images (PNG, JPEG, TIFF) as inputs: each its own study, named by its relative path, never
read as Hounsfield units, and run only when the model's card accepts windowed images."""

from __future__ import annotations

import json
import shutil

import cv2
import numpy as np
import pandas as pd
from click.testing import CliRunner
from pydicom.uid import generate_uid

from ichbatch.cli import main
from ichbatch.config import BRAIN
from ichbatch.images import load_image_hu
from ichbatch.preprocess import to_uint8

from .conftest import write_series


def _inputs(root, phantom_hu):  # type: ignore[no-untyped-def]
    """A DICOM study, a colour PNG that is not square (a screenshot with a border) and a grey JPEG."""
    write_series(root / "dicom", phantom_hu, study_uid=generate_uid(), series_uid=generate_uid())
    grey = to_uint8(phantom_hu[6], BRAIN)
    shot = cv2.copyMakeBorder(cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR), 4, 4, 30, 30, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    (root / "scans").mkdir(parents=True)
    (root / "web").mkdir()
    cv2.imwrite(str(root / "scans" / "head.png"), shot)
    cv2.imwrite(str(root / "web" / "ich.jpg"), grey, [cv2.IMWRITE_JPEG_QUALITY, 70])


def test_images_are_studies_named_by_relative_path_and_not_assessed_by_a_model_not_made_for_them(tmp_path, phantom_hu,
                                                                                                  tiny_bundle):
    _inputs(tmp_path / "in", phantom_hu)
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_bundle),
                                       "--tta", "1", "--dicom-out", str(tmp_path / "pacs")])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("source")
    assert set(df.index) == {"", "scans/head.png", "web/ich.jpg"}
    assert df.loc["", "status"] == "ok"
    for source in ("scans/head.png", "web/ich.jpg"):
        row = df.loc[source]
        assert row["status"] == "not_assessed" and "plain image" in row["message"] and "Hounsfield" in row["message"]
        assert row["prob_any"] == "" and row["flag_any"] == "not_assessed"
    assert df.loc["scans/head.png", "study_uid"] != df.loc["web/ich.jpg", "study_uid"]
    # Only the DICOM study joins a study in the PACS.
    assert len({p.name.split("_")[1] for p in (tmp_path / "pacs").glob("*.dcm")}) == 1


def test_a_card_that_accepts_windowed_images_runs_them(tmp_path, phantom_hu, tiny_bundle):
    bundle = tmp_path / "tiny-images"
    shutil.copytree(tiny_bundle, bundle)
    card = json.loads((bundle / "model.json").read_text())
    card["eligibility"] = {**card.get("eligibility", {}), "windowed_images": True}
    (bundle / "model.json").write_text(json.dumps(card))
    _inputs(tmp_path / "in", phantom_hu)
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(bundle), "--tta", "1"])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("source")
    for source in ("scans/head.png", "web/ich.jpg"):
        row = df.loc[source]
        assert row["status"] == "ok" and row["n_slices"] == "1" and 0 <= float(row["prob_any"]) <= 1
        assert "not Hounsfield units" in row["message"]
        report = json.loads((tmp_path / "reports" / f"{row['report_pdf'].rsplit('/', 1)[1][:-4]}.json").read_text())
        assert report["input"] == {"source": source, "hounsfield_units": False}
    assert df.loc["", "status"] == "ok" and json.loads(next((tmp_path / "reports").glob("*.json")).read_text())


def test_image_pixels_are_read_as_a_brain_window_rendering_padded_to_a_square(tmp_path):
    grey = np.tile(np.linspace(0, 255, 40).astype(np.uint8), (20, 1))  # 20 rows x 40 columns
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    cv2.imwrite(str(tmp_path / "c.png"), cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(tmp_path / "g16.tif"), grey.astype(np.uint16) * 257)
    hu = load_image_hu(str(tmp_path / "g.png"))
    assert hu.shape == (40, 40) and hu[10, 0] == 0 and abs(hu[10, -1] - 80) < 1e-3  # 0 -> 0 HU, 255 -> 80 HU
    assert np.all(hu[:10] == 0) and np.all(hu[30:] == 0)  # padded with black above and below
    assert np.allclose(load_image_hu(str(tmp_path / "c.png")), hu, atol=0.5)
    assert np.allclose(load_image_hu(str(tmp_path / "g16.tif")), hu, atol=0.5)
