"""What users touch: options where users put them, quiet start, logs, nothing-to-do, readable PDFs, the demo."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import pandas as pd
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid
from pypdf import PdfReader

from ichbatch.cli import EXIT_NOTHING, main
from ichbatch.report.csv_report import COLUMNS
from ichbatch.report.pdf_report import person_name, write_pdf

from .conftest import write_series
from .test_report import _images, _result

ISO_LINE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}[+-]\d\d:\d\d (INFO|WARNING|ERROR|DEBUG) ichbatch\.")


@pytest.fixture()
def small_study(tmp_path, phantom_hu):
    uid = generate_uid()
    write_series(tmp_path / "in", phantom_hu[:9], study_uid=uid, series_uid=generate_uid())
    return tmp_path / "in", uid


def test_logging_options_after_the_subcommand_with_iso_lines_and_no_uids(tmp_path, tiny_bundle, small_study):
    folder, uid = small_study
    log = tmp_path / "run.log"
    args = ["run", str(folder), "--out", str(tmp_path / "r.csv"), "--model", str(tiny_bundle), "--tta", "1",
            "--no-reports", "-v", "--log-file", str(log)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    lines = log.read_text().splitlines()
    assert lines and all(ISO_LINE.match(line) for line in lines), lines
    assert any(": ok, any " in line for line in lines)  # the per-study line says the outcome and flag
    assert uid not in log.read_text()  # studies are named by a short hash
    # Not on a terminal (nohup, a scheduler): progress is logged, the first step and the last at least.
    assert any(re.search(r"ichbatch\.progress: .*: 1 of 1$", line) for line in lines), lines

    json_log = tmp_path / "run.jsonl"
    again = CliRunner().invoke(main, ["--log-format", "json", *args[:-4], "--log-file", str(json_log), "-v"])
    assert again.exit_code == 0, again.output
    entries = [json.loads(line) for line in json_log.read_text().splitlines()]
    assert entries and {e["level"] for e in entries} == {"INFO"} and all(e["time"][10] == "T" for e in entries)


def test_every_option_shows_its_environment_variable():
    text = CliRunner().invoke(main, ["run", "--help"]).output
    for var in ("ICHBATCH_RUN_BATCH_SIZE", "ICHBATCH_RUN_MODEL", "ICHBATCH_RUN_RESUME", "ICHBATCH_RUN_LOG_FILE"):
        assert var in text, var
    watch_help = CliRunner().invoke(main, ["watch", "--help"]).output
    assert "ICHBATCH_WATCH_QUIET_SECONDS" in watch_help
    # run and watch share the study-path options
    for option in ("--pseudonymize", "--device", "--precision", "--aggregate", "--topk", "--min-slices", "--dicom-out"):
        assert option in watch_help and option in text, option


def test_start_up_is_quiet_unless_asked(tmp_path, tiny_bundle, small_study):
    folder, _ = small_study
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    cmd = [sys.executable, "-m", "ichbatch.cli", "run", str(folder), "--out", str(tmp_path / "r.csv"), "--model",
           str(tiny_bundle), "--tta", "1", "--no-reports"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("1 studies: 1 ok"), result.stderr  # only our summary


def test_bad_model_is_refused_before_any_input_is_read(tmp_path, small_study):
    folder, _ = small_study
    out = tmp_path / "o" / "r.csv"
    result = CliRunner().invoke(main, ["run", str(folder), "--out", str(out), "--model", "no-such-model"])
    assert result.exit_code == 2 and "--model" in result.output
    assert not out.parent.exists()  # nothing written, nothing discovered
    bad_reports = tmp_path / "file.txt"
    bad_reports.write_text("x")
    refused = CliRunner().invoke(main, ["run", str(folder), "--out", str(out), "--reports", str(bad_reports)])
    assert refused.exit_code == 2 and "--reports" in refused.output


def test_run_over_no_studies_writes_the_header_and_says_why(tmp_path, tiny_bundle):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "notes.txt").write_text("no DICOM here")
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_bundle)])
    assert result.exit_code == EXIT_NOTHING == 4, result.output
    assert "nothing to do: no DICOM study found" in result.output and "1 other file(s)" in result.output
    assert out.read_text().strip() == ",".join(COLUMNS)


def test_python_dash_m_is_the_same_command():
    from ichbatch import __version__

    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    version = subprocess.run([sys.executable, "-m", "ichbatch", "--version"], capture_output=True, text=True,
                             env=env, timeout=120)
    assert version.returncode == 0 and version.stdout.strip() == f"ichbatch, version {__version__}"
    usage = subprocess.run([sys.executable, "-m", "ichbatch", "run"], capture_output=True, text=True, env=env,
                           timeout=120)
    assert usage.returncode == 2 and "Usage: ichbatch run" in usage.stderr, usage.stderr


def test_evaluate_errors_are_messages_not_tracebacks(tmp_path):
    preds, labels = tmp_path / "p.csv", tmp_path / "l.csv"
    preds.write_text("study_uid,prob_any\n1.2,0.5\n")
    labels.write_text("study_uid,any\n1.2,1\n")
    bad_model = CliRunner().invoke(main, ["evaluate", str(preds), "--labels", str(labels), "--model", "nope"])
    assert bad_model.exit_code == 2 and "no model bundle named 'nope'" in bad_model.output
    assert bad_model.exc_info is None or bad_model.exc_info[0] is SystemExit
    labels.write_bytes(b"\xff\xfe\x00garbage")
    bad_labels = CliRunner().invoke(main, ["evaluate", str(preds), "--labels", str(labels)])
    assert bad_labels.exit_code == 2 and "Traceback" not in bad_labels.output, bad_labels.output


def test_names_are_for_people():
    assert person_name("DOE^JANE^^^") == "DOE, JANE"
    assert person_name("MÜLLER^ZOË^M^DR^JR") == "MÜLLER, ZOË M, DR, JR"
    assert person_name("ANON") == "ANON" and person_name("") == "-"
    assert person_name("YAMADA^TARO=山田^太郎") == "YAMADA, TARO"


def test_pdf_pages_carry_identifiers_and_numbers_and_long_text_wraps(tmp_path):
    long_description = "HEAD WITHOUT CONTRAST " + " ".join(f"RECON{k} STANDARD KERNEL 5MM AXIAL" for k in range(6))
    result = replace(_result(name="DOE^JANE^^^"), series_description=long_description)
    reader = PdfReader(write_pdf(result, _images(), tmp_path))
    texts = [page.extract_text() for page in reader.pages]
    assert len(texts) == 2
    for k, text in enumerate(texts, 1):
        assert f"Page {k} of 2" in text and "DOE, JANE" in text and "ID -PID7" in text and "1.2.3.4" in text
        assert "NOT FOR DIAGNOSIS" in text and "DOE^JANE" not in text
    assert " ".join(long_description.split()) in " ".join(texts[0].split())  # wrapped, every word present


def test_demo_lists_no_files_of_its_own_as_unused(tmp_path):
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out), "--studies", "1"])
    assert result.exit_code == 0, result.output
    assert "0 file(s) not used" in result.output
    assert len(pd.read_csv(out / "results_files.csv")) == 0
    assert (out / "manifest.json").is_file() and (out / "lesion_masks.npz").is_file()


def test_notice_column_is_not_cut():
    from ichbatch.report.csv_report import row

    trained_on = "generated phantom studies only; " * 8  # well past the 120 characters the column used to keep
    notice = row(replace(_result(), model_trained=True, model_trained_on=trained_on))["notice"]
    assert trained_on in notice and "NOT FOR DIAGNOSIS" in notice


def test_watch_log_line_for_a_finished_study_shows_its_flag(tmp_path, tiny_bundle, small_study, caplog):
    import logging

    from ichbatch.study import RunSettings
    from ichbatch.watch.watcher import Watcher, WatchSettings

    folder, uid = small_study
    watcher = Watcher(WatchSettings(incoming=folder, out=tmp_path / "w", quiet_seconds=0.0,
                                    run=RunSettings(model=str(tiny_bundle), tta=1)))
    try:
        with caplog.at_level(logging.INFO, logger="ichbatch"):
            watcher.scan()
            watcher.process_ready()
    finally:
        watcher.close()
    done = [r.getMessage() for r in caplog.records if r.name == "ichbatch.watch.watcher"]
    assert any(re.fullmatch(r"study-[0-9a-f]{10}: ok, any (FLAGGED|not flagged) \(attempt 1\)", m) for m in done), done
    assert uid not in caplog.text
