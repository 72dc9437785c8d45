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
    sr, kos, report, *keys = [pydicom.dcmread(p) for p in paths]
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
    assert len({ds.SeriesInstanceUID for ds in (sr, kos, report, keys[0])}) == 4  # a series has one modality
    assert len({k.SeriesInstanceUID for k in keys}) == 1
    for ds in (sr, kos, report, *keys):
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
        run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, errors="replace")
        errors = [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
        assert not errors, f"{path.name}: {errors}"


def _sr_findings(path) -> dict[str, dict]:  # type: ignore[no-untyped-def]
    """Per finding of a TID 1500 SR read back: presence, numbers, algorithm, source images, reason."""
    out = {}
    for group in _groups(pydicom.dcmread(path)):
        items = {item.ConceptNameCodeSequence[0].CodeMeaning: item for item in group.ContentSequence}

        def number(name: str) -> float | None:
            return float(items[name].MeasuredValueSequence[0].NumericValue) if name in items else None

        out[items["Finding"].ConceptCodeSequence[0].CodeValue] = {
            "presence": items["Presence at the model's threshold"].ConceptCodeSequence[0].CodeMeaning,
            "probability": number("Calibrated probability"), "threshold": number("Decision threshold"),
            "reason": items["Reason not assessed"].TextValue if "Reason not assessed" in items else None,
            "algorithm": (items["Algorithm Name"].TextValue, items["Algorithm Version"].TextValue),
            "sources": [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in group.ContentSequence
                        if i.ValueType == "IMAGE"],
        }
    return out


def _groups(sr):  # type: ignore[no-untyped-def]
    """The measurement groups of TID 1500: root > Imaging Measurements > Measurement Group."""
    root = sr.ContentSequence
    measurements = next(i for i in root if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements")
    return [g for g in measurements.ContentSequence if g.ConceptNameCodeSequence[0].CodeMeaning == "Measurement Group"]


def test_the_sr_has_one_finding_per_label_with_probability_threshold_model_and_key_slices(outputs):
    paths, _, study = outputs
    sr, kos = pydicom.dcmread(paths[0]), pydicom.dcmread(paths[1])
    assert sr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34" and sr.StudyInstanceUID == study  # Comprehensive 3D SR
    assert sr.ContentQualification == "RESEARCH" and str(sr.PatientName) == "MÜLLER^ZOË"
    findings = _sr_findings(paths[0])
    assert set(findings) == {"ICH-ANY", "ICH-EDH", "ICH-IPH", "ICH-IVH", "ICH-SAH", "ICH-SDH"}
    keys = ["1.2.3.4.5.105", "1.2.3.4.5.104", "1.2.3.4.5.103"]
    for finding in findings.values():
        assert finding["presence"] == "Present" and finding["probability"] == 0.9 and finding["threshold"] == 0.5
        assert finding["sources"] == keys and finding["algorithm"] == ("tiny", "0.1")
    # The KOS lists the same key slices, and its description carries the notice.
    refs = [i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence if i.ValueType == "IMAGE"]
    assert refs == keys and kos.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert any("NOT FOR DIAGNOSIS" in str(i.get("TextValue", "")) for i in kos.ContentSequence)


def test_a_study_that_was_not_assessed_gets_an_sr_saying_so_and_why(tmp_path, phantom_hu):
    from ichbatch.domain import Status

    study = generate_uid()
    src = write_series(tmp_path / "src", phantom_hu[:2], study_uid=study, series_uid=generate_uid())
    reason = "not assessed: outside what model tiny 0.1 is made for (slice thickness 0.5)"
    result = replace(_result(uid=study), source_path=str(src[0]), status=Status.NOT_ASSESSED, message=reason,
                     key_slices=(), flags={})
    paths = write_dicom_outputs(result, _images(), None, tmp_path / "dicom")
    assert [p.name.rsplit("_", 1)[1] for p in paths] == ["sr.dcm"]  # no key slices: no KOS, no key images
    findings = _sr_findings(paths[0])
    source_uid = pydicom.dcmread(src[0]).SOPInstanceUID
    assert len(findings) == 6
    for finding in findings.values():
        assert finding["presence"] == "Not assessed" and finding["reason"] == reason
        assert finding["probability"] is None and finding["sources"] == [source_uid]
    if shutil.which("dciodvfy"):
        run = subprocess.run(["dciodvfy", str(paths[0])], capture_output=True, text=True, errors="replace")
        assert not [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]
