"""Hostile input and conditions (part of #20): special files, crash loops, two writers, --after safety."""

from __future__ import annotations

import contextlib
import errno
import io
import os
import struct
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from ichbatch.cli import main
from ichbatch.errors import OutputLockedError
from ichbatch.study import RunSettings
from ichbatch.watch.ledger import FAILED
from ichbatch.watch.watcher import After, Watcher, WatchSettings

from .conftest import write_series


def _settings(tmp_path: Path, bundle: Path, incoming: Path, **kw) -> WatchSettings:  # type: ignore[no-untyped-def]
    kw.setdefault("settle_seconds", 0.0)
    return WatchSettings(incoming=incoming, out=tmp_path / "out", quiet_seconds=0.0, backoff_seconds=0.0,
                         run=RunSettings(model=str(bundle), tta=1, batch_size=8), **kw)


@pytest.mark.timeout(300)
def test_a_fifo_among_the_inputs_is_recorded_and_never_opened(tmp_path, tiny_bundle, phantom_hu):
    uid = generate_uid()
    write_series(tmp_path / "in", phantom_hu[:9], study_uid=uid, series_uid=generate_uid())
    os.mkfifo(tmp_path / "in" / "pipe")  # opening it for reading would block until someone writes
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_bundle),
                                       "--tta", "1", "--no-reports"])
    assert result.exit_code == 0, result.output
    assert list(pd.read_csv(out)["status"]) == ["ok"]
    files = pd.read_csv(tmp_path / "r_files.csv")
    assert list(files["status"]) == ["skipped"] and "not a regular file" in files["message"][0]
    watcher = Watcher(_settings(tmp_path, tiny_bundle, tmp_path / "in"))
    try:
        watcher.scan()  # the watcher's scan does not block on it either
        assert watcher.process_ready() == 1
    finally:
        watcher.close()


def test_a_study_that_keeps_killing_the_watcher_is_quarantined_behind_the_others(tmp_path, tiny_bundle, phantom_hu):
    deadly, later = generate_uid(), generate_uid()
    write_series(tmp_path / "in" / "a", phantom_hu[:9], study_uid=deadly, series_uid=generate_uid())
    settings = _settings(tmp_path, tiny_bundle, tmp_path / "in", max_attempts=2)
    for crash in range(2):  # the process dies while on the study, twice: no outcome is ever recorded
        watcher = Watcher(settings)
        watcher.ledger.recover()
        if crash == 0:
            watcher.scan()
        assert watcher.ledger.start(deadly) == crash + 1
        if crash == 1:  # meanwhile another study arrived
            write_series(tmp_path / "in" / "b", phantom_hu[:9], study_uid=later, series_uid=generate_uid())
            watcher.scan()
        watcher.writer.close()  # what the kernel does to the lock when the process dies
        watcher.ledger.close()
    watcher = Watcher(settings)
    try:
        watcher.ledger.recover()
        assert watcher.ledger.ready(0.0) == [later, deadly]  # the study that crashed is not first in the queue
        assert watcher.process_ready() == 2
        rows = {r.study_uid: r for r in watcher.ledger.studies()}
        assert rows[deadly].status == FAILED and "quarantined" in rows[deadly].message
        assert rows[deadly].attempts == 3  # counted when started, never more than one past the limit
        assert rows[later].status.value == "done"
    finally:
        watcher.close()
    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(csv["study_uid"]) == [later]  # the quarantined study was not run a third time


def test_a_second_writer_on_the_same_outputs_is_refused(tmp_path, tiny_bundle, phantom_hu):
    write_series(tmp_path / "in", phantom_hu[:9], study_uid=generate_uid(), series_uid=generate_uid())
    settings = _settings(tmp_path, tiny_bundle, tmp_path / "in")
    first = Watcher(settings)
    try:
        with pytest.raises(OutputLockedError, match=f"pid {os.getpid()}"):
            Watcher(settings)
        run = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(tmp_path / "out" / "results.csv"),
                                        "--model", str(tiny_bundle), "--tta", "1"])
        assert run.exit_code == 2 and "being written by another ichbatch process" in run.output
        first.scan()
        assert first.process_ready() == 1
    finally:
        first.close()
    second = Watcher(settings)  # free again once the first has stopped
    try:
        second.scan()
        assert second.process_ready() == 0  # nothing is processed twice
    finally:
        second.close()
    assert len(pd.read_csv(tmp_path / "out" / "results.csv")) == 1


def test_after_delete_never_reaches_through_a_link_out_of_incoming(tmp_path, tiny_bundle, phantom_hu):
    originals = write_series(tmp_path / "elsewhere", phantom_hu[:9], study_uid=generate_uid(), series_uid=generate_uid())
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    own = write_series(tmp_path / "in" / "own", phantom_hu[:9], study_uid=generate_uid(), series_uid=generate_uid())
    watcher = Watcher(_settings(tmp_path, tiny_bundle, tmp_path / "in", after="delete"))
    try:
        watcher.scan()
        assert watcher.process_ready() == 2
    finally:
        watcher.close()
    assert all(p.exists() for p in originals)  # processed, but not deleted: they are not in INCOMING
    assert not any(p.exists() for p in own)


def test_after_move_never_overwrites_an_archived_file(tmp_path, tiny_bundle, phantom_hu):
    names = [f"IM{k:04d}" for k in range(9)]  # a PACS that reuses file names for every study
    settings = _settings(tmp_path, tiny_bundle, tmp_path / "in", after=After.MOVE, archive=tmp_path / "archive")
    uids = []
    for _ in range(2):
        uids.append(generate_uid())
        write_series(tmp_path / "in" / "export", phantom_hu[:9], study_uid=uids[-1], series_uid=generate_uid(),
                     names=names)
        watcher = Watcher(settings)
        try:
            watcher.scan()
            assert watcher.process_ready() == 1
        finally:
            watcher.close()
    archived = sorted((tmp_path / "archive").rglob("IM*"))
    assert len(archived) == 18 and not list((tmp_path / "in").rglob("IM*"))
    assert {pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in archived} == set(uids)


def test_an_archive_inside_incoming_is_refused_at_start(tmp_path, tiny_bundle):
    (tmp_path / "in").mkdir()
    with pytest.raises(ValueError, match="inside INCOMING"):
        _settings(tmp_path, tiny_bundle, tmp_path / "in", after="move", archive=tmp_path / "in" / "done")
    result = CliRunner().invoke(main, ["watch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--after",
                                       "move", "--archive", str(tmp_path / "in" / "done"), "--model", str(tiny_bundle)])
    assert result.exit_code == 2 and "inside INCOMING" in result.output


def test_temp_files_of_a_killed_run_are_removed_by_the_next(tmp_path, tiny_bundle, phantom_hu):
    write_series(tmp_path / "in", phantom_hu[:9], study_uid=generate_uid(), series_uid=generate_uid())
    (tmp_path / "reports").mkdir()
    stale = [tmp_path / ".results.csv.k3j4.tmp", tmp_path / "reports" / ".study_1.2.3.pdf.x9.tmp"]
    for path in stale:
        path.write_bytes(b"half a file")
    unrelated = tmp_path / ".notes.tmp"
    unrelated.write_text("not ours")
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(tmp_path / "results.csv"),
                                       "--model", str(tiny_bundle), "--tta", "1"])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in stale) and unrelated.exists()


def _peak_rss_gb_of(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:  # type: ignore[type-arg]
    """Run cmd in a child of a small Python wrapper and return the child's peak RSS in GB."""
    wrapper = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(r.returncode)")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, "-c", wrapper, *cmd], capture_output=True, text=True, env=env, timeout=600)
    return int(done.stdout.strip().splitlines()[-1]) / (1 << 20), done


def _deflate_bomb(path: Path, inflated_gib: float) -> None:
    """A Part 10 file whose deflated dataset inflates to `inflated_gib` GiB (a private OB of zeros)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = io.BytesIO()
    write_file_meta_info(head, meta)

    def element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        value += b"\0" * (len(value) % 2)
        return struct.pack("<HH", group, elem) + vr + struct.pack("<H", len(value)) + value

    size = int(inflated_gib * (1 << 30)) // 2 * 2
    body = (element(0x0008, 0x0016, b"UI", b"1.2.840.10008.5.1.4.1.1.2")
            + element(0x0020, 0x000D, b"UI", generate_uid().encode())
            + element(0x0020, 0x000E, b"UI", generate_uid().encode())
            + element(0x0009, 0x0010, b"LO", b"BOMB")
            + struct.pack("<HH", 0x0009, 0x1010) + b"OB\0\0" + struct.pack("<I", size))
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 24)
    with open(path, "wb") as fh:
        fh.write(b"\0" * 128 + b"DICM" + head.getvalue())
        fh.write(deflate.compress(body))
        for _ in range(size // len(zeros)):
            fh.write(deflate.compress(zeros))
        fh.write(deflate.compress(bytes(size % len(zeros))) + deflate.flush())


def test_memory_bombs_are_refused_before_allocation(tmp_path, tiny_bundle, phantom_hu):
    good, bomb = generate_uid(), generate_uid()
    write_series(tmp_path / "in" / "good", phantom_hu[:9], study_uid=good, series_uid=generate_uid())
    for p in write_series(tmp_path / "in" / "bomb", phantom_hu[:9], study_uid=bomb, series_uid=generate_uid()):
        ds = pydicom.dcmread(p)
        ds.Rows = ds.Columns = 65535  # 8 GiB of pixels claimed over 32 KiB of data
        ds.PixelData = bytes(32768)
        ds.save_as(p)
    _deflate_bomb(tmp_path / "in" / "deflated.dcm", 1.5)
    assert (tmp_path / "in" / "deflated.dcm").stat().st_size < 5 << 20
    out = tmp_path / "r.csv"
    peak_gb, done = _peak_rss_gb_of([sys.executable, "-m", "ichbatch.cli", "run", str(tmp_path / "in"), "--out",
                                     str(out), "--model", str(tiny_bundle), "--tta", "1", "--no-reports"])
    assert done.returncode == 1, done.stderr  # the bomb study failed, the run went on
    assert peak_gb < 3.0, peak_gb
    rows = pd.read_csv(out, dtype=str, keep_default_na=False).set_index("study_uid")
    assert rows.loc[good, "status"] == "ok"
    assert rows.loc[bomb, "status"] == "failed" and "exceed the limit" in rows.loc[bomb, "message"]
    assert "SimpleITK" not in rows.loc[bomb, "message"]  # malformed data never reaches the fallback decoder
    files = pd.read_csv(tmp_path / "r_files.csv", dtype=str).set_index("path")
    assert "inflates to more than 512 MiB" in files.loc[str(tmp_path / "in" / "deflated.dcm"), "message"]


def test_card_values_are_checked_with_one_message_per_problem(tmp_path, tiny_bundle):
    import json
    import shutil

    from ichbatch.errors import BundleError
    from ichbatch.model.bundle import read_card

    folder = tmp_path / "bad"
    shutil.copytree(tiny_bundle, folder)
    card = json.loads((folder / "model.json").read_text())
    card.update(input_size=60000, thresholds={"any": 50}, windows=[{"name": "brain", "center": 40, "width": 0},
                {"name": "subdural", "center": 80, "width": 200}, {"name": "bone", "center": 600, "width": 2800}])
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError) as err:
        read_card(folder)
    message = str(err.value)
    assert "input_size must be a whole number from 32 to 1024. Received: 60000" in message
    assert "threshold for 'any' must be a number between 0 and 1" in message and "Received: 50" in message
    assert "window 'brain' needs a number center and a width above 0" in message
    card["windows"][0]["width"] = 80
    card.update(input_size=64, thresholds={"any": 0.5}, version=3)  # every value fixed but one
    (folder / "model.json").write_text(json.dumps(card))
    with pytest.raises(BundleError, match="version must be text. Received: 3"):
        read_card(folder)
    result = CliRunner().invoke(main, ["run", str(tmp_path), "--out", str(tmp_path / "r.csv"), "--model", str(folder)])
    assert result.exit_code == 2 and "version must be text" in result.output and "Traceback" not in result.output


def test_files_csv_cells_are_neutralised(tmp_path, tiny_bundle, monkeypatch):
    evil = tmp_path / "=HYPERLINK(1)"
    evil.mkdir()
    (evil / "+note.txt").write_text("not DICOM")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(main, ["run", "=HYPERLINK(1)", "--out", "r.csv", "--model", str(tiny_bundle)])
    assert result.exit_code == 4, result.output
    files = pd.read_csv(tmp_path / "r_files.csv", dtype=str)
    assert files["path"][0] == "'=HYPERLINK(1)/+note.txt" and files["message"][0].startswith("'=")


@contextlib.contextmanager
def small_tmpfs(folder: Path, size_mb: int) -> Iterator[Path]:
    """A small file system mounted at folder (skip where mounting is not allowed); unmounted after."""
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def fill(folder: Path) -> Path:
    """Write a file until the file system says it is full; returns the file (delete it to free the space)."""
    filler = folder / "filler"
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(bytes(1 << 16))
                fh.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


def test_a_full_disk_under_the_watcher_is_waited_out(tmp_path, tiny_bundle, phantom_hu, caplog):
    import logging

    with small_tmpfs(tmp_path / "out", 8) as out:
        uids = [generate_uid(), generate_uid()]
        for k, uid in enumerate(uids):
            write_series(tmp_path / "in" / f"s{k}", phantom_hu[:9], study_uid=uid, series_uid=generate_uid())
        watcher = Watcher(WatchSettings(incoming=tmp_path / "in", out=out, quiet_seconds=0.0, backoff_seconds=0.0,
                                        rescan_seconds=0.1, run=RunSettings(model=str(tiny_bundle), tta=1)))
        filler = fill(out)  # the disk fills up
        try:
            with caplog.at_level(logging.WARNING, logger="ichbatch"):
                for _ in range(4):
                    watcher.step()  # logs and waits; never raises
                assert not any(r.status.value == "done" for r in watcher.ledger.studies())
                filler.unlink()  # space returns
                for _ in range(10):
                    watcher.step()
                    if sum(r.status.value == "done" for r in watcher.ledger.studies()) == 2:
                        break
            rows = {r.study_uid: r for r in watcher.ledger.studies()}
            assert {u: rows[u].status.value for u in uids} == {u: "done" for u in uids}
            assert all(rows[u].attempts == 1 for u in uids)  # the full disk used up no attempt
            assert "waiting and retrying" in caplog.text and "writable again" in caplog.text
        finally:
            watcher.close()
        csv = pd.read_csv(out / "results.csv")
        assert sorted(csv["study_uid"]) == sorted(uids) and (csv["status"] == "ok").all()  # each once


def test_a_header_that_understates_the_bit_depth_is_not_trusted(tmp_path, tiny_bundle, phantom_hu):
    uid = generate_uid()
    for p in write_series(tmp_path / "in", phantom_hu[:9], study_uid=uid, series_uid=generate_uid()):
        ds = pydicom.dcmread(p)
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7  # 16-bit pixel data labelled 8-bit
        ds.save_as(p)
    out = tmp_path / "r.csv"
    result = CliRunner().invoke(main, ["run", str(tmp_path / "in"), "--out", str(out), "--model", str(tiny_bundle),
                                       "--tta", "1", "--no-reports"])
    assert result.exit_code == 1, result.output
    row = pd.read_csv(out, dtype=str, keep_default_na=False).iloc[0]
    assert row["status"] == "failed" and "twice or more" in row["message"] and row["prob_any"] == ""


def test_a_full_disk_stops_run_with_exit_3_and_resume_finishes(tmp_path, tiny_bundle, phantom_hu):
    with small_tmpfs(tmp_path / "out", 4) as out:
        write_series(tmp_path / "in", phantom_hu[:9], study_uid=generate_uid(), series_uid=generate_uid())
        filler = fill(out)
        args = ["run", str(tmp_path / "in"), "--out", str(out / "results.csv"), "--model", str(tiny_bundle), "--tta", "1"]
        full = CliRunner().invoke(main, args)
        assert full.exit_code == 3 and "No space left" in full.output, full.output
        filler.unlink()
        again = CliRunner().invoke(main, [*args, "--resume"])
        assert again.exit_code == 0, again.output
        assert list(pd.read_csv(out / "results.csv")["status"]) == ["ok"]


def test_library_warnings_quote_no_uid_at_default_verbosity(tmp_path, tiny_bundle, phantom_hu):
    import warnings

    uid = "1.2.03.004.77"  # not conformant: pydicom warns, quoting the value, each time it reads one
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        write_series(tmp_path / "in", phantom_hu[:9], study_uid=uid, series_uid=generate_uid())
    cmd = [sys.executable, "-m", "ichbatch.cli", "run", str(tmp_path / "in"), "--out", str(tmp_path / "r.csv"),
           "--model", str(tiny_bundle), "--tta", "1", "--no-reports"]
    quiet = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0, quiet.stderr
    assert "03.004" not in quiet.stderr, quiet.stderr
    loud = subprocess.run([*cmd, "-vv"], capture_output=True, text=True, timeout=300)
    assert "Invalid value for VR UI" in loud.stderr  # still there for whoever asks for library messages
