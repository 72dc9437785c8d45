"""DICOM outputs: Encapsulated PDF and Secondary Capture in the original study, valid per dciodvfy."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from ichbatch.report.dicom_out import ENCAPSULATED_PDF, SECONDARY_CAPTURE, write_dicom_outputs
from ichbatch.report.pdf_report import render_pdf

from .conftest import write_series
from .test_report import _images, _result


@pytest.fixture()
def outputs(tmp_path, phantom_hu):
    study = generate_uid()
    src = write_series(tmp_path / "src", phantom_hu[:2], study_uid=study, series_uid=generate_uid(),
                       patient_name="MÜLLER^ZOË", accession="ACC1")
    result = replace(_result(uid=study), source_path=str(src[0]),
                     heatmap="HiResCAM at pool1_pool, averaged over hflip")
    pdf = render_pdf(result, _images())
    return write_dicom_outputs(result, _images(), pdf, tmp_path / "dicom"), pdf, study


def test_outputs_join_the_original_study(outputs):
    paths, pdf, study = outputs
    report, *keys = [pydicom.dcmread(p) for p in paths]
    assert report.SOPClassUID == ENCAPSULATED_PDF and report.StudyInstanceUID == study
    assert report.EncapsulatedDocument[: len(pdf)] == pdf and report.MIMETypeOfEncapsulatedDocument == "application/pdf"
    assert str(report.PatientName) == "MÜLLER^ZOË" and report.AccessionNumber == "ACC1"
    assert len(keys) == 3 and all(k.SOPClassUID == SECONDARY_CAPTURE and k.StudyInstanceUID == study for k in keys)
    assert keys[0].SeriesInstanceUID != report.SeriesInstanceUID
    pixels = np.asarray(keys[0].pixel_array)
    # The 64 px key image, enlarged 4x so the notice burned in below it is legible, as
    # BurnedInAnnotation YES says: the notice and the model, in white on black.
    assert pixels.shape[1:] == (256, 3) and pixels.shape[0] > 256 and pixels[:256].max() > 0
    assert keys[0].BurnedInAnnotation == "YES" and (pixels[256:] > 200).sum() > 200
    for ds in (report, *keys):
        assert "NOT FOR DIAGNOSIS" in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
        assert ds.ManufacturerModelName == "tiny" and list(ds.SoftwareVersions)[1] == "0.1"
    assert "NOT FOR DIAGNOSIS" in report.DocumentTitle
    # Each key image names its source slice, so a viewer can jump to it.
    assert keys[0].SourceImageSequence[0].ReferencedSOPInstanceUID == "1.2.3.4.5.105"
    assert "Im 35, z 5.0 mm" in keys[0].ImageComments
    assert keys[0].ImageComments.endswith("heat map for 'any' x probability: HiResCAM at pool1_pool, averaged over hflip")


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dicom3tools (dciodvfy) not installed")
def test_outputs_are_valid_per_dciodvfy(outputs):
    paths, _, _ = outputs
    for path in paths:
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"
