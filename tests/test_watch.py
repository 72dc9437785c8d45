"""Watch mode: files trickled in by another process, SIGKILL at random moments, broken studies."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from pypdf import PdfReader

from ichbatch.synth import Encoding, synth_studies

WRITER = r"""
import os, sys, time, random
src, dst, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
files = sorted(os.path.join(d, f) for d, _, fs in os.walk(src) for f in fs if f.endswith(".dcm"))
for path in files:
    out = os.path.join(dst, os.path.relpath(path, src))
    os.makedirs(os.path.dirname(out), exist_ok=True)
    data = open(path, "rb").read()
    with open(out, "wb") as fh:
        if rng.random() < 0.3:  # written slowly, in pieces, as a network copy does
            for i in range(0, len(data), 4096):
                fh.write(data[i:i + 4096]); fh.flush(); time.sleep(0.01)
        else:
            fh.write(data)
    time.sleep(rng.uniform(0, 0.05))
"""


def _watch_cmd(incoming: Path, out: Path, bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ichbatch.cli", "watch", str(incoming), "--out", str(out), "--model", str(bundle),
            "--quiet-seconds", "1.5", "--rescan-seconds", "0.5", "--tta", "1", "--batch-size", "8", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def _done_count(out: Path) -> int:
    db = out / "ichbatch-ledger.sqlite"
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return con.execute("SELECT COUNT(*) FROM studies WHERE status IN ('done', 'failed')").fetchone()[0]
    except sqlite3.OperationalError:
        return 0


def _wait_done(out: Path, n: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.time() + timeout
    while _done_count(out) < n:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else "watcher exited"
        assert time.time() < deadline, f"only {_done_count(out)} of {n} studies finished"
        time.sleep(0.5)


def _check_outputs(out: Path, uids: list[str]) -> pd.DataFrame:
    df = pd.read_csv(out / "results.csv", dtype=str, keep_default_na=False)
    assert sorted(df["study_uid"]) == sorted(uids) and df["study_uid"].is_unique
    assert (df["status"] == "ok").all(), df[["status", "message"]]
    for pdf in df["report_pdf"]:
        data = Path(pdf).read_bytes()
        assert data.rstrip().endswith(b"%%EOF") and len(PdfReader(pdf).pages) == 2
    assert not list(out.rglob(".*.tmp"))
    return df


def test_trickled_studies_are_each_processed_once(tmp_path, tiny_bundle):
    src, incoming, out = tmp_path / "src", tmp_path / "incoming", tmp_path / "out"
    manifest = synth_studies(src, 4, seed=21, n_slices=8, size=64)
    incoming.mkdir()
    watcher = subprocess.Popen(_watch_cmd(incoming, out, tiny_bundle), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        writer = subprocess.run([sys.executable, "-c", WRITER, str(src), str(incoming), "1"], timeout=120)
        assert writer.returncode == 0
        _wait_done(out, 4, watcher, timeout=120)
        time.sleep(2)  # nothing more may happen once everything is done
    finally:
        watcher.send_signal(signal.SIGTERM)
        stderr = watcher.communicate(timeout=30)[1]
    assert watcher.returncode == 0, stderr
    assert "PHANTOM" not in stderr and "1.2.826" not in stderr  # no identifiers in the log
    _check_outputs(out, [s["study_uid"] for s in manifest["studies"]])
    with sqlite3.connect(out / "ichbatch-ledger.sqlite") as con:
        assert con.execute("SELECT DISTINCT version, status FROM studies").fetchall() == [(1, "done")]
    status = subprocess.run([sys.executable, "-m", "ichbatch.cli", "status", str(out)], capture_output=True, text=True, env=_env())
    assert "studies: 4 done" in status.stdout and "1.2.826" not in status.stdout
    with_uids = subprocess.run([sys.executable, "-m", "ichbatch.cli", "status", str(out), "--uids"],
                               capture_output=True, text=True, env=_env())
    assert all(s["study_uid"] in with_uids.stdout for s in manifest["studies"])


def test_sigkill_at_random_moments_loses_and_duplicates_nothing(tmp_path, tiny_bundle):
    src, incoming, out = tmp_path / "src", tmp_path / "incoming", tmp_path / "out"
    manifest = synth_studies(src, 20, seed=22, n_slices=8, size=64)
    incoming.mkdir()
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(src), str(incoming), "2"])
    rng = __import__("random").Random(5)
    kills = 0
    while kills < 4:
        watcher = subprocess.Popen(_watch_cmd(incoming, out, tiny_bundle), env=_env(), stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(4, 9))  # model loading takes a few seconds; kills land during work too
        watcher.kill()  # SIGKILL: no cleanup, possibly mid-write
        watcher.wait()
        kills += 1
    assert writer.wait(timeout=120) == 0
    watcher = subprocess.Popen(_watch_cmd(incoming, out, tiny_bundle), env=_env(), stderr=subprocess.PIPE, text=True)
    try:
        _wait_done(out, 20, watcher, timeout=240)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.communicate(timeout=30)
    _check_outputs(out, [s["study_uid"] for s in manifest["studies"]])


def _settle(watcher, rounds: int = 3) -> None:  # type: ignore[no-untyped-def]
    """One scan, then enough processing rounds for retries with zero backoff to run out."""
    watcher.scan()
    for _ in range(rounds):
        watcher.process_ready()


def test_broken_study_and_unwritable_reports_get_clear_statuses(tmp_path, tiny_bundle):
    from ichbatch.pipeline import RunSettings
    from ichbatch.watch.watcher import Watcher, WatchSettings

    incoming, out = tmp_path / "incoming", tmp_path / "out"
    # Uncompressed storage, so cutting the end off a file cuts its pixel data, not its header.
    manifest = synth_studies(incoming, 2, seed=23, n_slices=8, size=64, encoding=Encoding())
    broken_uid = manifest["studies"][1]["study_uid"]
    for p in sorted((incoming / "study_0023_0001").rglob("*.dcm")):
        p.write_bytes(p.read_bytes()[:-2000])  # every slice's pixel data cut short
    settings = WatchSettings(incoming=incoming, out=out, run=RunSettings(model=str(tiny_bundle), tta=1),
                             quiet_seconds=0, max_attempts=2, backoff_seconds=0)
    watcher = Watcher(settings)
    _settle(watcher)
    rows = {r.study_uid: r for r in watcher.ledger.studies()}
    good_uid = manifest["studies"][0]["study_uid"]
    assert rows[good_uid].status == "done" and rows[good_uid].version == 1
    assert rows[broken_uid].status == "failed" and rows[broken_uid].attempts == 2
    assert "could not be decoded" in rows[broken_uid].message

    # An unwritable reports folder: the study gets a clear status, the watcher keeps going.
    synth_studies(incoming / "more", 1, seed=24, n_slices=8, size=64)
    (out / "reports").rename(out / "reports.bak")
    (out / "reports").write_text("not a folder")
    _settle(watcher)
    new = [r for r in watcher.ledger.studies() if r.study_uid not in (good_uid, broken_uid)]
    assert new[0].status == "failed" and "report not written" in new[0].message
    watcher.close()


def test_late_file_makes_a_new_version_and_move_archives_after_outputs(tmp_path, tiny_bundle):
    import shutil

    from ichbatch.pipeline import RunSettings
    from ichbatch.watch.watcher import Watcher, WatchSettings

    src, incoming, out, archive = tmp_path / "src", tmp_path / "in", tmp_path / "out", tmp_path / "archive"
    manifest = synth_studies(src, 1, seed=25, n_slices=10, size=64)
    uid = manifest["studies"][0]["study_uid"]
    files = sorted(src.rglob("*.dcm"))
    incoming.mkdir()
    for f in files[:-1]:  # the last slice is late
        shutil.copy(f, incoming / f.name)
    leave = WatchSettings(incoming=incoming, out=out, run=RunSettings(model=str(tiny_bundle), tta=1), quiet_seconds=0)
    watcher = Watcher(leave)
    watcher.scan()
    watcher.process_ready()
    first = pd.read_csv(out / "results.csv", dtype=str)
    assert first["n_slices"].tolist() == ["9"]
    shutil.copy(files[-1], incoming / files[-1].name)
    watcher.scan()
    watcher.process_ready()
    again = pd.read_csv(out / "results.csv", dtype=str)
    assert again["study_uid"].tolist() == [uid] and again["n_slices"].tolist() == ["10"]
    assert watcher.ledger.studies()[0].version == 2
    watcher.close()

    # A second study, with --after move: inputs leave the folder only once outputs are written.
    synth_studies(incoming / "next", 1, seed=26, n_slices=8, size=64)
    moving = WatchSettings(incoming=incoming, out=out, run=RunSettings(model=str(tiny_bundle), tta=1),
                           quiet_seconds=0, after="move", archive=archive, settle_seconds=0)
    watcher = Watcher(moving)
    watcher.scan()
    watcher.process_ready()
    assert len(pd.read_csv(out / "results.csv")) == 2
    assert len(list(archive.rglob("*.dcm"))) == 8 and not list((incoming / "next").rglob("*.dcm"))
    assert len(list(incoming.glob("*.dcm"))) == 10  # the first study was done before: untouched
    watcher.close()


def test_unwritable_csv_is_retried_without_using_up_attempts(tmp_path, tiny_bundle):
    from ichbatch.pipeline import RunSettings
    from ichbatch.watch.watcher import Watcher, WatchSettings

    incoming, out = tmp_path / "in", tmp_path / "out"
    synth_studies(incoming, 1, seed=27, n_slices=8, size=64)
    settings = WatchSettings(incoming=incoming, out=out, run=RunSettings(model=str(tiny_bundle), tta=1),
                             quiet_seconds=0, max_attempts=1, backoff_seconds=0)
    watcher = Watcher(settings)
    (out / "results.csv").unlink()
    (out / "results.csv").mkdir()  # the CSV path is blocked once the watcher runs: every write fails
    _settle(watcher)
    (row,) = watcher.ledger.studies()
    assert row.status == "pending" and row.attempts == 0 and "outputs not written" in row.message
    (out / "results.csv").rmdir()  # the disk is writable again: the study goes through
    watcher.process_ready()
    (row,) = watcher.ledger.studies()
    assert row.status == "done" and len(pd.read_csv(out / "results.csv")) == 1
    watcher.close()
