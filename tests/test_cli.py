"""The command line end to end: a mixed export folder, exit codes, help on every command."""

from __future__ import annotations

import json

import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from pypdf import PdfReader

from ichbatch.cli import main
from ichbatch.synth import synth_studies

from .conftest import write_series


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield prefix + (name,)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, prefix + (name,))


def test_every_command_has_help():
    runner = CliRunner()
    names = list(_commands(main))
    assert {("run",), ("demo",), ("synth",), ("models", "list"), ("models", "show"), ("models", "import")} <= set(names)
    for name in names:
        result = runner.invoke(main, [*name, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, name
        assert len(main.get_command(None, name[0]).help or "") > 10


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory, phantom_hu):
    root = tmp_path_factory.mktemp("export")
    manifest = synth_studies(root / "phantoms", 2, seed=11, n_slices=10, size=96)
    # One study with a soft and a bone series and a scout; an MR study; a study whose pixels are broken.
    study = generate_uid()
    write_series(root / "mixed" / "soft", phantom_hu, study_uid=study, series_uid=generate_uid(), patient_name="MÜLLER^ZOË")
    write_series(root / "mixed" / "bone", phantom_hu, study_uid=study, series_uid=generate_uid(), kernel="BONE",
                 patient_name="MÜLLER^ZOË")
    scout = write_series(root / "mixed" / "scout", phantom_hu[:1], study_uid=study, series_uid=generate_uid(),
                         patient_name="MÜLLER^ZOË")[0]
    ds = pydicom.dcmread(scout)
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.save_as(scout)
    mr = generate_uid()
    for p in write_series(root / "mr", phantom_hu, study_uid=mr, series_uid=generate_uid()):
        ds = pydicom.dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    broken = generate_uid()
    for p in write_series(root / "broken", phantom_hu, study_uid=broken, series_uid=generate_uid()):
        p.write_bytes(p.read_bytes()[:-4000])  # pixel data cut short on every slice
    (root / "Thumbs.db").write_bytes(b"\x00" * 64)
    first = next((root / "phantoms").rglob("*.dcm"))
    (root / "cut_header.dcm").write_bytes(first.read_bytes()[:400])  # truncated inside the header
    (root / "README.txt").write_text("export")
    return root, manifest, study, mr, broken


def test_run_on_mixed_folder(mixed_folder, tiny_bundle, tmp_path, monkeypatch):
    root, manifest, study, mr, broken = mixed_folder
    out = tmp_path / "out" / "results.csv"
    result = CliRunner().invoke(main, ["run", str(root), "--out", str(out), "--model", str(tiny_bundle),
                                       "--batch-size", "8", "--tta", "2", "--slices", str(tmp_path / "slices.csv")])
    assert result.exit_code == 1, result.output  # the broken study failed: partial failure
    assert "5 studies: 3 ok, 0 not assessed (outside the model's domain), 1 skipped, 1 failed" in result.output
    df = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("study_uid")
    phantom_uids = [s["study_uid"] for s in manifest["studies"]]
    assert set(df.index) == {*phantom_uids, study, mr, broken}
    assert (df.loc[phantom_uids, "status"] == "ok").all() and (df.loc[phantom_uids, "n_slices"] == "10").all()
    assert df.loc[study, "status"] == "ok" and df.loc[study, "n_slices"] == "12"
    assert df.loc[study, "series_description"] == "HEAD WO CONTRAST"  # not the bone kernel
    assert df.loc[mr, "status"] == "skipped" and "modality MR" in df.loc[mr, "message"]
    assert df.loc[broken, "status"] == "failed" and "could not be decoded" in df.loc[broken, "message"]
    for uid in df.index:
        pdf = df.loc[uid, "report_pdf"]
        assert pdf and PdfReader(pdf).pages, uid
    text = PdfReader(df.loc[study, "report_pdf"]).pages[0].extract_text()
    assert "MÜLLER, ZOË" in text and "NOT FOR DIAGNOSIS" in text, text[:400]
    assert "Heat map: CAM at conv5_block3_out" in text  # the tiny bundle's head: plain CAM
    probs = df.loc[phantom_uids[0], [f"prob_{x}" for x in ("any", "subdural")]].astype(float)
    assert ((probs >= 0) & (probs <= 1)).all()
    assert "5 studies (3 ok, 0 not assessed, 1 skipped, 1 failed)" in (out.parent / "results.html").read_text()
    index = (out.parent / "results_pages" / "page-00001.html").read_text()
    assert index.count("<tr>") == 6 and index.count(".pdf\">PDF</a>") == 5
    files = pd.read_csv(out.with_name("results_files.csv"))
    by_name = {p.rsplit("/", 1)[1]: (st, msg) for p, st, msg in files[["path", "status", "message"]].itertuples(index=False)}
    assert {"Thumbs.db", "README.txt", "manifest.json", "cut_header.dcm"} <= set(by_name)
    assert by_name["cut_header.dcm"][0] == "failed" and "truncated or corrupt" in by_name["cut_header.dcm"][1]
    assert by_name["Thumbs.db"][0] == "skipped"
    slices = pd.read_csv(tmp_path / "slices.csv")
    assert len(slices) == 10 + 10 + 12
    assert set(slices.columns) >= {"study_uid", "slice", "instance_number", "sop_uid", "z_mm", "prob_any"}
    one = slices[slices["study_uid"] == study].sort_values("slice")
    assert list(one["slice"]) == list(range(1, 13)) and one["z_mm"].is_monotonic_increasing

    # Re-running replaces rows rather than duplicating them. With --report-writers 0 the run's own thread
    # writes the DICOM objects: no writer process starts.
    def no_pool(*args, **kwargs):
        raise AssertionError("a report writer process was started")

    monkeypatch.setattr("ichbatch.report.outputs.IsolatedPool", no_pool)
    again = CliRunner().invoke(main, ["run", str(root / "phantoms"), "--out", str(out), "--model", str(tiny_bundle),
                                      "--no-reports", "--tta", "1", "--dicom-out", str(tmp_path / "pacs"),
                                      "--report-writers", "0"])
    assert again.exit_code == 0, again.output
    sent = sorted(p.name.rsplit("_", 1)[1] for p in (tmp_path / "pacs").glob("*.dcm"))
    assert sent == (["key1.dcm"] * 2 + ["key2.dcm"] * 2 + ["key3.dcm"] * 2 + ["kos.dcm"] * 2 + ["report.dcm"] * 2
                    + ["sr.dcm"] * 2)
    df2 = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert len(df2) == 5 and df2["study_uid"].is_unique
    assert set(df2.set_index("study_uid").loc[phantom_uids, "tta"]) == {"1"}


def test_usage_errors_exit_2(tmp_path, tiny_bundle):
    runner = CliRunner()
    assert runner.invoke(main, ["run", str(tmp_path / "missing"), "--out", "r.csv"]).exit_code == 2
    assert runner.invoke(main, ["run", str(tmp_path), "--out", "r.csv", "--tta", "9"]).exit_code == 2
    bad = runner.invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model", "no-such-model"])
    assert bad.exit_code == 2 and "no model bundle named 'no-such-model'" in bad.output
    ray_writers = runner.invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--engine", "ray",
                                       "--report-writers", "2"])
    assert ray_writers.exit_code == 2 and "is for the local engine" in ray_writers.output
    sheet = tmp_path / "budget.csv"
    sheet.write_text("item,cost\nscanner,1\n")
    foreign = runner.invoke(main, ["run", str(tmp_path), "--out", str(sheet), "--model", str(tiny_bundle)])
    assert foreign.exit_code == 2 and "not an ichbatch results CSV" in foreign.output
    assert sheet.read_text() == "item,cost\nscanner,1\n"  # never overwritten


def test_models_list_and_show():
    runner = CliRunner()
    listed = runner.invoke(main, ["models", "list"])
    assert listed.exit_code == 0 and "ich-resnet50-untrained" in listed.output and "UNTRAINED" in listed.output
    shown = runner.invoke(main, ["models", "show", "ich-resnet50-untrained"])
    card = json.loads(shown.output)
    assert card["trained"] is False and card["input_size"] == 224 and len(card["labels"]) == 6


def test_synth_writes_manifest(tmp_path):
    result = CliRunner().invoke(main, ["synth", str(tmp_path / "p"), "--studies", "2", "--seed", "3", "--slices", "8", "--size", "64"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "p" / "manifest.json").read_text())
    assert len(manifest["studies"]) == 2
    n_files = sum(1 for p in (tmp_path / "p").rglob("*.dcm"))
    assert n_files == 16
    for s in manifest["studies"]:
        assert s["labels"]["any"] == int(bool(s["lesion_slices"]))
