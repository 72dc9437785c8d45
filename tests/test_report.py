"""CSV read back with pandas, PDF read back with pypdf and rendered with pdftoppm."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pandas as pd
import pytest
from pypdf import PdfReader

from ichbatch.config import LABELS
from ichbatch.domain import Status, StudyMeta, StudyResult
from ichbatch.report.csv_report import COLUMNS, write_results
from ichbatch.report.pdf_report import render_pdf, write_pdf


def _result(uid: str = "1.2.3.4", name: str = "MÜLLER^ZOË", accession: str = "=HYPERLINK(1)") -> StudyResult:
    n = 6
    probs = np.tile(np.linspace(0.1, 0.9, n)[:, None], (1, 6)).astype(np.float32)
    brain = np.zeros((64, 64), np.uint8)
    brain[20:40, 20:40] = 200
    rgb = np.repeat(brain[..., None], 3, axis=2)
    return StudyResult(
        study=StudyMeta(uid, accession=accession, patient_id="-PID7", patient_name=name, study_date="20260102"),
        status=Status.OK, message="gap in slices: 10.00 mm", series_uid="1.2.3.4.5", series_description="HEAD",
        n_slices=n, labels=LABELS, outputs=LABELS, slice_probs=probs, smoothed_probs=probs,
        study_probs={label: 0.9 for label in LABELS}, flags={label: True for label in LABELS}, key_slices=(5, 4, 3),
        slice_z=tuple(float(5 * k) for k in range(n)), thumbnails=[brain] * n,
        key_images={k: {"brain": brain, "gradcam": rgb, "subdural": brain, "bone": brain} for k in (5, 4, 3)},
        model="tiny", model_version="0.1", model_trained=False, tta=2, seconds=1.5,
    )


def test_csv_schema_neutralisation_and_replacement(tmp_path):
    path = tmp_path / "results.csv"
    write_results(path, [_result("1.2.3.4"), _result("1.2.3.5")])
    again = _result("1.2.3.4")
    again.study_probs = {label: 0.25 for label in LABELS}
    write_results(path, [again])  # a re-run replaces the study's row
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert tuple(df.columns) == COLUMNS
    assert sorted(df["study_uid"]) == ["1.2.3.4", "1.2.3.5"]
    row = df.set_index("study_uid").loc["1.2.3.4"]
    assert float(row["prob_any"]) == 0.25 and row["status"] == "ok" and row["flag_subdural"] == "1"
    assert row["accession"] == "'=HYPERLINK(1)" and row["patient_id"] == "'-PID7"
    assert row["key_slices"] == "6 5 4" and row["model"] == "tiny" and row["tta"] == "2"
    assert "NOT FOR DIAGNOSIS" in row["notice"] and "UNTRAINED" in row["notice"]
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_pseudonymized_identifiers(tmp_path):
    path = tmp_path / "r.csv"
    write_results(path, [_result()], pseudonym_key=b"k" * 16)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert df["patient_id"][0].startswith("PSN-") and "PID7" not in path.read_text()


def test_pdf_says_what_a_trained_model_was_trained_on(tmp_path):
    result = _result()
    result.model_trained, result.model_trained_on = True, "140 generated phantom studies - synthetic phantoms"
    text = PdfReader(write_pdf(result, tmp_path)).pages[0].extract_text()
    assert "Model trained on: 140 generated phantom studies - synthetic phantoms" in text and "UNTRAINED" not in text


def test_pdf_text_has_identifiers_scores_and_notice(tmp_path):
    path = write_pdf(_result(), tmp_path)
    assert path.name == "study_1.2.3.4.pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(path).pages)
    for expected in ("NOT FOR DIAGNOSIS", "MÜLLER^ZOË", "1.2.3.4", "tiny 0.1", "0.900", "FLAGGED", "UNTRAINED", "2026-01-02"):
        assert expected in text, expected
    fonts = PdfReader(path).pages[0]["/Resources"]["/Font"]
    base_fonts = [str(fonts[f].get_object()["/BaseFont"]) for f in fonts]
    assert any(b.endswith("+BitstreamVeraSans-Roman") for b in base_fonts), base_fonts  # an embedded TTF subset


def test_pdf_names_never_come_from_header_text(tmp_path):
    path = write_pdf(_result(uid="../../etc/passwd"), tmp_path)
    assert path.parent == tmp_path and path.name.startswith("study_h") and "/" not in path.name[6:]


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils (pdftoppm) not installed")
def test_pdf_key_image_area_is_not_blank(tmp_path):
    (tmp_path / "r.pdf").write_bytes(render_pdf(_result()))
    subprocess.run(["pdftoppm", "-r", "40", "-gray", "-f", "1", "-l", "1", str(tmp_path / "r.pdf"), str(tmp_path / "p")],
                   check=True)
    page = _read_pgm(next(tmp_path.glob("p*.pgm")))
    lower = page[page.shape[0] // 2 :]  # key images fill the lower half of page 1
    assert lower.std() > 20 and (lower < 30).mean() > 0.05


def _read_pgm(path) -> np.ndarray:
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    w, h = int(parts[1]), int(parts[2])
    return np.frombuffer(parts[4][-w * h :], np.uint8).reshape(h, w)


def test_html_index_lists_every_study_with_thumbnail_and_link(tmp_path):
    from ichbatch.report.html_index import write_index, write_thumbnail

    reports = tmp_path / "reports"
    results = [_result("1.2.3.4"), _result("1.2.3.5", name="<script>x</script>")]
    for r in results:
        r.report_pdf = str(write_pdf(r, reports))
        write_thumbnail(r, reports)
    write_results(tmp_path / "results.csv", results)
    page = write_index(tmp_path / "results.csv").read_text()
    assert page.count("<tr>") == 3 and "NOT FOR DIAGNOSIS" in page
    assert 'href="reports/study_1.2.3.4.pdf"' in page and 'src="reports/study_1.2.3.5.png"' in page
    assert (reports / "study_1.2.3.5.png").read_bytes()[:4] == b"\x89PNG"
    assert "<script>" not in page
