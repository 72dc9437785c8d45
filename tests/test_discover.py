"""Discovery: content-based recognition, junk recorded not fatal, UID grouping across folders."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from pydicom.uid import generate_uid

from ichbatch.discover import discover, examine, iter_files, pooled_examiner
from ichbatch.domain import Status
from ichbatch.series import group_studies

from .conftest import write_series


def test_junk_is_recorded_and_good_files_found(tmp_path, phantom_hu):
    study, series = generate_uid(), generate_uid()
    good = write_series(tmp_path / "a", phantom_hu[:4], study_uid=study, series_uid=series)
    (tmp_path / "Thumbs.db").write_bytes(b"\x00" * 100)
    (tmp_path / ".DS_Store").write_bytes(b"Bud1" + b"\x00" * 50)
    (tmp_path / "notes.txt").write_text("radiology export log\n")
    (tmp_path / "empty.dcm").write_bytes(b"")
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(good[0].read_bytes()[:300])  # cut inside the header

    found = discover([tmp_path])

    assert len(found.instances) == 4
    issues = {os.path.basename(i.path): i for i in found.issues}
    assert set(issues) == {"Thumbs.db", ".DS_Store", "notes.txt", "empty.dcm", "truncated.dcm"}
    assert issues["empty.dcm"].status == Status.SKIPPED and "empty file" in issues["empty.dcm"].message
    assert issues["notes.txt"].status == Status.SKIPPED and "not a DICOM file" in issues["notes.txt"].message
    assert issues["truncated.dcm"].status == Status.FAILED
    assert "truncated or corrupt" in issues["truncated.dcm"].message


def test_preambleless_dicom_is_recognised(tmp_path, phantom_hu):
    path = write_series(tmp_path, phantom_hu[:1], study_uid=generate_uid(), series_uid=generate_uid())[0]
    raw = path.read_bytes()
    # Strip preamble and file meta: what old PACS write as "DICOM without Part 10 header".
    from pydicom import dcmread

    ds = dcmread(path)
    bare = tmp_path / "bare"
    del ds.file_meta
    ds.preamble = None
    ds.save_as(bare, enforce_file_format=False, implicit_vr=True, little_endian=True)
    assert bare.read_bytes()[128:132] != b"DICM" and raw[128:132] == b"DICM"
    found = discover([bare])
    assert [i.sop_uid for i in found.instances] == [ds.SOPInstanceUID]


def test_symlink_loop_is_safe_and_files_counted_once(tmp_path, phantom_hu):
    write_series(tmp_path / "s", phantom_hu[:3], study_uid=generate_uid(), series_uid=generate_uid())
    os.symlink(tmp_path, tmp_path / "s" / "loop")
    os.symlink(tmp_path / "s", tmp_path / "again")
    found = discover([tmp_path])
    assert len(found.instances) == 3 and not found.issues


def test_grouping_by_uid_not_folder(tmp_path, phantom_hu):
    s1, s2, series1, series2 = generate_uid(), generate_uid(), generate_uid(), generate_uid()
    # Study 1 split across two folders; study 2 shares a folder with part of study 1.
    write_series(tmp_path / "x", phantom_hu[:3], study_uid=s1, series_uid=series1, names=["a1", "a2", "a3"])
    write_series(tmp_path / "y", phantom_hu[3:6], study_uid=s1, series_uid=series1, names=["b1", "b2", "b3"])
    write_series(tmp_path / "y", phantom_hu[:4], study_uid=s2, series_uid=series2, names=["c1", "c2", "c3", "c4"])
    studies = group_studies(discover([tmp_path]).instances)
    assert set(studies) == {s1, s2}
    assert [len(g.instances) for g in studies[s1]] == [6]
    assert [len(g.instances) for g in studies[s2]] == [4]


def test_dicomdir_is_skipped(tmp_path, phantom_hu):
    from pydicom import dcmread
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.1.3.10"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.FileSetID = "EXPORT"
    ds.DirectoryRecordSequence = []
    ds.save_as(tmp_path / "DICOMDIR", enforce_file_format=True)
    assert dcmread(tmp_path / "DICOMDIR").file_meta.MediaStorageSOPClassUID == "1.2.840.10008.1.3.10"
    found = discover([tmp_path])
    assert not found.instances
    assert "DICOMDIR" in found.issues[0].message and found.issues[0].status == Status.SKIPPED


def _spawned_children() -> list[int]:
    """This process's children started by multiprocessing's spawn (not its resource tracker)."""
    pids = []
    for task in Path(f"/proc/{os.getpid()}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            if "spawn_main" in cmdline and "resource_tracker" not in cmdline:
                pids.append(int(pid))
    return pids


def test_headers_read_in_worker_processes_are_those_read_here_even_when_a_reader_is_killed(tmp_path, phantom_hu):
    """A local run reads the headers of a large archive in processes (pooled_examiner): the same results
    in the walk's order, junk included; a reader killed mid-run loses no file (its files are read again)."""
    write_series(tmp_path / "a", phantom_hu[:2], study_uid=generate_uid(), series_uid=generate_uid())
    template = next((tmp_path / "a").iterdir()).read_bytes()
    for n in range(600):
        (tmp_path / "b" / f"{n // 100}").mkdir(parents=True, exist_ok=True)
        (tmp_path / "b" / f"{n // 100}" / f"{n:04d}.dcm").write_bytes(template)
    (tmp_path / "b" / "3" / "notes.txt").write_text("export log\n")
    (tmp_path / "b" / "4" / "empty.dcm").write_bytes(b"")
    (tmp_path / "b" / "5" / "truncated.dcm").write_bytes(template[:300])
    os.mkfifo(tmp_path / "b" / "2" / "pipe")
    files = list(iter_files([tmp_path]))
    expected = [examine(path, [tmp_path]) for path in files]

    stream = pooled_examiner(2, pool_from=50)(iter(files), [tmp_path])
    got = [next(stream) for _ in range(150)]  # the readers have started and hold messages of files
    readers = _spawned_children()
    assert len(readers) == 2, readers
    os.kill(readers[0], signal.SIGKILL)
    got += list(stream)
    assert got == expected
    assert {os.path.basename(i.path) for i in got if hasattr(i, "message")} == {"notes.txt", "empty.dcm",
                                                                                "truncated.dcm", "pipe"}
    deadline = time.monotonic() + 10
    while _spawned_children() and time.monotonic() < deadline:  # the readers stop with the stream
        time.sleep(0.1)
    assert not _spawned_children()

    found = discover([tmp_path], examiner=pooled_examiner(2, pool_from=0))
    assert found.instances == [seen for seen in expected if not hasattr(seen, "message")]


def test_the_header_index_shares_what_files_repeat(tmp_path, phantom_hu):
    """One record per file is held until its study runs (4 million in a large archive): what a study's
    or series' files repeat is held once, and a record keeps no per-instance dictionary."""
    study, series = generate_uid(), generate_uid()
    write_series(tmp_path / "a", phantom_hu[:3], study_uid=study, series_uid=series)
    write_series(tmp_path / "b", phantom_hu[:2], study_uid=generate_uid(), series_uid=generate_uid())
    first, *rest = [ref for ref in discover([tmp_path]).instances if ref.series_uid == series]
    assert len(rest) == 2
    for ref in rest:
        assert ref.study is first.study and ref.series_uid is first.series_uid
        assert ref.orientation is first.orientation and ref.image_type is first.image_type
        assert ref.position != first.position and ref.path != first.path
    assert not hasattr(first, "__dict__") and not hasattr(first.study, "__dict__")
