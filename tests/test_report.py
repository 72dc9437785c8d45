"""CSV read back with pandas, PDF read back with pypdf and rendered with pdftoppm."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import replace

import cv2
import numpy as np
import pandas as pd
import pytest
from pypdf import PdfReader

from ichbatch.config import LABELS
from ichbatch.domain import KeyImage, SliceId, Status, StudyImages, StudyMeta, StudyResult
from ichbatch.report.csv_report import COLUMNS
from ichbatch.report.outputs import OutputSettings, OutputWriter
from ichbatch.report.pdf_report import render_pdf, write_pdf

N_SLICES = 6
# Instance Numbers run against the z order (as in many exports); slice index counts from inferior.
SLICES = tuple(SliceId(k + 1, f"1.2.3.4.5.{100 + k}", 40 - k, 5.0 * k - 20) for k in range(N_SLICES))


def _result(uid: str = "1.2.3.4", name: str = "MÜLLER^ZOË", accession: str = "=HYPERLINK(1)") -> StudyResult:
    probs = np.tile(np.linspace(0.1, 0.9, N_SLICES)[:, None], (1, 6)).astype(np.float32)
    return StudyResult(
        study=StudyMeta(uid, accession=accession, patient_id="-PID7", patient_name=name, study_date="20260102"),
        status=Status.OK, message="gap in slices: 10.00 mm", series_uid="1.2.3.4.5", series_description="HEAD",
        n_slices=N_SLICES, labels=LABELS, outputs=LABELS, slices=SLICES, slice_probs=probs, smoothed_probs=probs,
        study_probs={label: 0.9 for label in LABELS}, flags={label: True for label in LABELS},
        key_slices=(SLICES[5], SLICES[4], SLICES[3]), model="tiny", model_version="0.1", model_trained=False, tta=2,
        seconds=1.5, instances_digest="d1",
    )


def _images() -> StudyImages:
    brain = np.zeros((64, 64), np.uint8)
    brain[20:40, 20:40] = 200
    rgb = np.repeat(brain[..., None], 3, axis=2)
    keys = tuple(KeyImage(SLICES[k], brain, rgb, brain, brain, "any") for k in (5, 4, 3))
    return StudyImages(thumbnails=(brain,) * N_SLICES, key_images=keys)


def write_results(path, results, pseudonym_key=None, reports=None):  # type: ignore[no-untyped-def]
    with OutputWriter(OutputSettings(csv=path, reports=reports, pseudonym_key=pseudonym_key)) as writer:
        return [writer.write(r, _images()) for r in results]


def test_csv_schema_neutralisation_and_replacement(tmp_path):
    path = tmp_path / "results.csv"
    write_results(path, [_result("1.2.3.4"), _result("1.2.3.5")])
    again = replace(_result("1.2.3.4"), study_probs={label: 0.25 for label in LABELS})
    write_results(path, [again])  # a re-run replaces the study's row
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert tuple(df.columns) == COLUMNS
    assert list(df["study_uid"]) == ["1.2.3.4", "1.2.3.5"]  # replaced in place, not moved or duplicated
    row = df.set_index("study_uid").loc["1.2.3.4"]
    assert float(row["prob_any"]) == 0.25 and row["status"] == "ok" and row["flag_subdural"] == "1"
    assert row["accession"] == "'=HYPERLINK(1)" and row["patient_id"] == "'-PID7"
    assert row["key_slices"] == "6 5 4" and row["model"] == "tiny" and row["tta"] == "2"
    assert row["key_instance_numbers"] == "35 36 37" and row["key_z_mm"] == "5.0 0.0 -5.0"
    assert row["key_sop_uids"].split() == ["1.2.3.4.5.105", "1.2.3.4.5.104", "1.2.3.4.5.103"]
    assert "NOT FOR DIAGNOSIS" in row["notice"] and "UNTRAINED" in row["notice"]
    assert not list(tmp_path.glob(".*tmp"))  # no temp files left behind


def test_line_breaks_in_header_text_stay_inside_one_row(tmp_path):
    path = tmp_path / "results.csv"
    evil = replace(_result("1.2.3.9"), series_description="HEAD\r=cmd|' /C calc'!A0\nSECOND")
    write_results(path, [_result("1.2.3.4"), evil])
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert list(df["study_uid"]) == ["1.2.3.4", "1.2.3.9"]
    assert df["series_description"][1].startswith("HEAD\r=cmd")


def test_outputs_honour_the_umask(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        write_results(tmp_path / "results.csv", [_result()], reports=tmp_path / "reports")
    finally:
        os.umask(old)
    for path in (tmp_path / "results.csv", tmp_path / "reports" / "study_1.2.3.4.pdf", tmp_path / "results.html"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path
    assert stat.S_IMODE((tmp_path / "reports").stat().st_mode) == 0o755


def test_pseudonymized_identifiers(tmp_path):
    path = tmp_path / "r.csv"
    write_results(path, [_result()], pseudonym_key=b"k" * 16)
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    assert df["patient_id"][0].startswith("PSN-") and "PID7" not in path.read_text()


def test_pdf_says_what_a_trained_model_was_trained_on(tmp_path):
    result = replace(_result(), model_trained=True, model_trained_on="140 generated phantom studies - synthetic phantoms")
    text = PdfReader(write_pdf(result, _images(), tmp_path)).pages[0].extract_text()
    assert "Model trained on: 140 generated phantom studies - synthetic phantoms" in text and "UNTRAINED" not in text


def test_pdf_text_has_identifiers_scores_and_notice(tmp_path):
    path = write_pdf(_result(), _images(), tmp_path)
    assert path.name == "study_1.2.3.4.pdf"
    text = "\n".join(page.extract_text() for page in PdfReader(path).pages)
    for expected in ("NOT FOR DIAGNOSIS", "MÜLLER, ZOË", "1.2.3.4", "tiny 0.1", "0.900", "FLAGGED", "UNTRAINED", "2026-01-02"):
        assert expected in text, expected
    # Key slices are named as the viewer shows them (Instance Number) with their position, not by index.
    assert "Im 35, z 5.0 mm" in text and "inferior: Im 40, z -20.0 mm" in text and "slice 6" not in text
    fonts = PdfReader(path).pages[0]["/Resources"]["/Font"]
    base_fonts = [str(fonts[f].get_object()["/BaseFont"]) for f in fonts]
    assert any(b.endswith("+BitstreamVeraSans-Roman") for b in base_fonts), base_fonts  # an embedded TTF subset


def test_pdf_names_never_come_from_header_text(tmp_path):
    path = write_pdf(_result(uid="../../etc/passwd"), _images(), tmp_path)
    assert path.parent == tmp_path and path.name.startswith("study_h") and "/" not in path.name[6:]


@pytest.mark.skipif(shutil.which("pdftoppm") is None, reason="poppler-utils (pdftoppm) not installed")
def test_pdf_key_image_area_is_not_blank(tmp_path):
    pdf = render_pdf(_result(), _images())
    # Binary streams: ASCII85 on top ran in pure Python (most of a report's time). Key slices are JPEG
    # (flate-compressing them was half of what remained), the thumbnails flate.
    assert b"/FlateDecode" in pdf and b"/DCTDecode" in pdf and b"/ASCII85Decode" not in pdf
    (tmp_path / "r.pdf").write_bytes(pdf)
    subprocess.run(["pdftoppm", "-r", "40", "-gray", "-f", "1", "-l", "1", str(tmp_path / "r.pdf"), str(tmp_path / "p")],
                   check=True)
    page = _read_pgm(next(tmp_path.glob("p*.pgm")))
    lower = page[page.shape[0] // 2 :]  # key images fill the lower half of page 1
    assert lower.std() > 20 and (lower < 30).mean() > 0.05
    if shutil.which("pdfimages"):  # the key slices as stored: JPEG, and close to the pixels given
        listing = subprocess.run(["pdfimages", "-list", str(tmp_path / "r.pdf")], capture_output=True, text=True,
                                 check=True).stdout.splitlines()[2:]
        encodings = {(int(row.split()[3]), int(row.split()[4]), row.split()[5], row.split()[8]) for row in listing}
        assert (64, 64, "gray", "jpeg") in encodings and (64, 64, "rgb", "jpeg") in encodings, encodings
        subprocess.run(["pdfimages", "-png", "-f", "1", "-l", "1", str(tmp_path / "r.pdf"), str(tmp_path / "img")],
                       check=True)
        brain = _images().key_images[0].brain.astype(float)
        gray = [im for im in (cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in tmp_path.glob("img-*.png"))
                if im.shape == brain.shape]
        assert gray and all(np.abs(im - brain).mean() < 2 for im in gray)


@pytest.mark.skipif(shutil.which("pdfimages") is None, reason="poppler-utils (pdfimages) not installed")
def test_each_key_picture_is_embedded_once_as_its_own_jpeg(tmp_path):
    """reportlab names an embedded image by a hash; the key slices' JPEGs are named by their bytes (not
    decoded again to hash their pixels). Distinct pictures must stay distinct images, and the top key
    slice's brain window, shown on both pages, must be stored once."""
    rng = np.random.default_rng(3)
    keys = []
    for k in (5, 4, 3):
        brain = cv2.GaussianBlur(rng.integers(0, 256, (64, 64), dtype=np.uint8), (5, 5), 0)
        overlay = np.dstack([brain, 255 - brain, brain // 2])
        keys.append(KeyImage(SLICES[k], brain, overlay, 255 - brain, brain // 3, "any"))
    images = StudyImages(thumbnails=_images().thumbnails, key_images=tuple(keys))
    (tmp_path / "r.pdf").write_bytes(render_pdf(_result(), images))
    listing = subprocess.run(["pdfimages", "-list", str(tmp_path / "r.pdf")], capture_output=True, text=True,
                             check=True).stdout.splitlines()[2:]
    objects: dict[str, set[int]] = {}
    for line in listing:
        cols = line.split()
        if cols[8] == "jpeg":
            objects.setdefault(cols[10], set()).add(int(cols[0]))  # object id -> pages it is shown on
    # Page 1: three brain windows and three overlays; page 2: the top slice's brain, subdural and bone
    # windows. Each its own image, the top brain window stored once for both pages.
    assert len(objects) == 8, listing
    assert sorted(len(pages) for pages in objects.values()) == [1] * 7 + [2], listing
    subprocess.run(["pdfimages", "-png", "-f", "1", "-l", "1", str(tmp_path / "r.pdf"), str(tmp_path / "img")],
                   check=True)
    shown = [cv2.imread(str(p), cv2.IMREAD_UNCHANGED) for p in sorted(tmp_path.glob("img-*.png"))]
    for key in keys:  # each key slice's own pixels, not another's
        assert any(im.shape == key.brain.shape and np.abs(im.astype(float) - key.brain).mean() < 3 for im in shown)


def _read_pgm(path) -> np.ndarray:
    data = path.read_bytes()
    parts = data.split(maxsplit=4)
    w, h = int(parts[1]), int(parts[2])
    return np.frombuffer(parts[4][-w * h :], np.uint8).reshape(h, w)


def test_the_index_kept_study_by_study_equals_the_index_rendered_whole_and_counts_stay_exact(tmp_path):
    """The index keeps its newest pages' rows and the counts by status between studies, instead of
    reading them back from the store each time; what it shows must be what the store holds."""
    csv = tmp_path / "results.csv"

    def shown() -> dict[str, str]:
        return {p.name: p.read_text() for p in [tmp_path / "results.html", *sorted((tmp_path / "results_pages").glob("*"))]}

    with OutputWriter(OutputSettings(csv=csv, reports=tmp_path / "reports", index_page_size=3, writers=0)) as writer:
        for k in range(7):
            writer.write(_result(f"1.2.3.{k}"), _images())
        # A re-run of a study on the first page (no longer among the kept ones) and of one on the last.
        writer.write(replace(_result("1.2.3.1"), status=Status.FAILED, message="run again: failed"), _images())
        writer.write(replace(_result("1.2.3.6"), status=Status.SKIPPED, message="run again: skipped"), _images())
        assert writer.store.counts() == {"ok": 5, "failed": 1, "skipped": 1} and writer.store.count() == 7
        writer.flush()  # the pages held back (written at most every index_seconds)
        kept = shown()
        writer.index.render_all()  # from the store alone
        assert shown() == kept and "run again: failed" in kept["page-00001.html"]
        assert "7 studies (5 ok, 0 not assessed, 1 skipped, 1 failed)" in kept["results.html"]
    with OutputWriter(OutputSettings(csv=csv, writers=0)) as writer:  # counted afresh from the store
        assert writer.store.counts() == {"ok": 5, "failed": 1, "skipped": 1} and writer.store.count("ok") == 5


def test_the_index_is_written_at_most_every_few_seconds_and_a_killed_run_leaves_it_whole(tmp_path):
    """Pages written after every study, with their fsyncs, were 60 % of a commit: they are written at
    most every index_seconds and at the end. A run killed between leaves the store saying the index is
    behind, and the next writer renders it whole."""
    csv, landing = tmp_path / "results.csv", tmp_path / "results.html"
    settings = OutputSettings(csv=csv, reports=tmp_path / "reports", index_page_size=2, writers=0,
                              index_seconds=3600)
    writer = OutputWriter(settings)
    for k in range(5):
        writer.write(_result(f"1.2.3.{k}"), _images())
    assert "1 studies" in landing.read_text()  # the first study's pages at once, the rest held back
    assert not (tmp_path / "results_pages" / "page-00003.html").exists()
    assert writer.store.is_behind("index")
    writer.flush()
    assert "5 studies" in landing.read_text() and "1.2.3.4" in (tmp_path / "results_pages" / "page-00003.html").read_text()
    assert not writer.store.is_behind("index")
    writer.write(_result("1.2.3.5"), _images())
    writer.write(_result("1.2.3.6"), _images())
    # Killed here: no flush, no close. The lock and the database go with the process.
    writer.lock.release()
    writer.store.db.close()
    assert "5 studies" in landing.read_text()
    with OutputWriter(settings) as again:  # renders the index whole as it opens: which pages were held is not known
        assert "7 studies" in landing.read_text() and not again.store.is_behind("index")
        assert "1.2.3.6" in (tmp_path / "results_pages" / "page-00004.html").read_text()
        again.write(replace(_result("1.2.3.0"), status=Status.FAILED, message="run again"), _images())
    assert "run again" in (tmp_path / "results_pages" / "page-00001.html").read_text()


def test_html_index_lists_every_study_with_thumbnail_and_link(tmp_path):
    reports = tmp_path / "reports"
    results = [_result("1.2.3.4"), _result("1.2.3.5", name="<script>x</script>"), _result("1.2.3.6")]
    with OutputWriter(OutputSettings(csv=tmp_path / "results.csv", reports=reports, index_page_size=2)) as writer:
        for r in results:
            writer.write(r, _images())
    landing = (tmp_path / "results.html").read_text()
    assert "3 studies (3 ok, 0 not assessed, 0 skipped, 0 failed)" in landing and "NOT FOR DIAGNOSIS" in landing
    page1 = (tmp_path / "results_pages" / "page-00001.html").read_text()
    page2 = (tmp_path / "results_pages" / "page-00002.html").read_text()
    assert page1.count("<tr>") == 3 and page2.count("<tr>") == 2  # two studies a page, plus the header
    assert 'href="../reports/study_1.2.3.4.pdf"' in page1 and 'src="../reports/study_1.2.3.5.png"' in page1
    assert 'href="page-00002.html">next' in page1 and "previous" in page2  # the page before got its link
    assert (reports / "study_1.2.3.5.png").read_bytes()[:4] == b"\x89PNG"
    assert "<script>" not in page1


def test_studies_ready_together_are_committed_in_one_transaction_and_one_csv_write(tmp_path, monkeypatch):
    """A group's commit waits for the disk once, not once a study; the CSV and the store hold the same
    rows, in order, as one commit a study gives, a study processed again keeps its place, and a group
    that cannot be committed leaves nothing of it behind."""
    import os

    from ichbatch.report.outputs import StudyFiles

    syncs = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (syncs.append(os.readlink(f"/proc/self/fd/{fd}")), real_fsync(fd))[1])
    uids = [f"1.2.3.{k}" for k in range(1, 9)]
    csvs = {}
    for way in ("alone", "together"):
        csvs[way] = tmp_path / way / "results.csv"
        with OutputWriter(OutputSettings(csv=csvs[way], writers=0, index_seconds=3600)) as writer:
            written = [StudyFiles(_result(uid), ()) for uid in uids]
            before = len(syncs)
            got = [writer.commit(f) for f in written] if way == "alone" else writer.commit_many(written)
            assert [r.study.study_uid for r in got] == uids
            csv_syncs = syncs[before:].count(str(csvs[way]))
            assert csv_syncs == (len(uids) if way == "alone" else 1)  # the CSV's fsync: once a study, once a group
            assert writer.store.counts() == {"ok": 8}
    alone, together = (pd.read_csv(csvs[w], dtype=str, keep_default_na=False) for w in ("alone", "together"))
    assert list(together["study_uid"]) == uids
    pd.testing.assert_frame_equal(alone.drop(columns=["run_id"], errors="ignore"),
                                  together.drop(columns=["run_id"], errors="ignore"))

    with OutputWriter(OutputSettings(csv=csvs["together"], writers=0)) as writer:
        again = replace(_result(uids[2]), status=Status.FAILED, message="again")
        writer.commit_many([StudyFiles(_result("1.2.3.99"), ()), StudyFiles(again, ())])
        broken = replace(_result("1.2.3.100"), study=StudyMeta("1.2.3.100"))
        rows = [StudyFiles(_result("1.2.3.101"), ()), StudyFiles(broken, ())]
        monkeypatch.setattr("ichbatch.report.outputs.slice_rows",
                            lambda r: 1 / 0 if r.study.study_uid == "1.2.3.100" else [])
        with pytest.raises(ZeroDivisionError):
            writer.commit_many(rows)
        assert writer.store.study("1.2.3.101") is None  # all or none
        assert writer.store.counts() == {"ok": 8, "failed": 1}
    df = pd.read_csv(csvs["together"], dtype=str, keep_default_na=False)
    assert list(df["study_uid"]) == uids + ["1.2.3.99"]  # replaced in place, the new one appended
    assert df.set_index("study_uid").loc[uids[2], "status"] == "failed"
