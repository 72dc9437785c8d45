"""Isolation and decode checks (#20): decoder processes with a memory cap and a time limit, HU histogram
checks whatever decoder ran, and a study's inputs kept until its result is final."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import RLELossless, generate_uid

from ichbatch.domain import SliceRef
from ichbatch.errors import DecodeError
from ichbatch.pixels import load_hu
from ichbatch.synth import ct_slice_dataset
from ichbatch.workers import IsolatedPool, WorkerLimits

from . import pool_tasks
from .conftest import write_series
from .test_hostile import _peak_rss_gb_of, _settings


@pytest.mark.timeout(300)
def test_a_worker_that_dies_fails_only_its_own_item_and_order_is_kept():
    with IsolatedPool(pool_tasks.square_or_die, pool_tasks.crashed, workers=2, limits=WorkerLimits(0, 0)) as pool:
        items = [1, 2, -1, 3, 4, 5, -1, 6]
        out = list(pool.map(items, depth=4))
        assert out[:2] == [1, 4] and out[3:6] == [9, 16, 25] and out[7] == 36
        assert out[2].startswith("crashed: the decoder process exited (139)") and out[6] == out[2]
        assert pool.crashes == 2
        assert list(pool.map([7, 8], depth=4)) == [49, 64]  # the pool carries on after crashes
    with IsolatedPool(pool_tasks.square_or_die, pool_tasks.crashed, workers=1, limits=WorkerLimits(0, 0)) as pool:
        # One worker holds two items: the one queued behind the item that kills it is decoded by its successor.
        out = list(pool.map([-1, 5, -1, 6], depth=4))
        assert out[1] == 25 and out[3] == 36 and out[0].startswith("crashed:") and out[2] == out[0]
        assert pool.crashes == 2


@pytest.mark.timeout(300)
def test_items_sent_several_a_message_still_fail_alone_when_one_kills_its_worker_or_hangs():
    with IsolatedPool(pool_tasks.square_or_die, pool_tasks.crashed, workers=2, limits=WorkerLimits(0, 0),
                      chunk=4) as pool:
        out = list(pool.map([1, 2, -1, 3, 4, 5, -1, 6, 7, 8], depth=8))
        assert out[:2] == [1, 4] and out[3:6] == [9, 16, 25] and out[7:] == [36, 49, 64]
        assert out[2].startswith("crashed: the decoder process exited (139)") and out[6] == out[2]
        # Each bad item killed a worker twice: in its message of several, then tried alone.
        assert pool.crashes == 4
    with IsolatedPool(pool_tasks.sleep_for, pool_tasks.crashed, 1, WorkerLimits(memory_mb=0, seconds=2),
                      chunk=3) as pool:
        start = time.monotonic()
        out = list(pool.map([0.1, 60.0, 0.1, 0.1], depth=4))
        assert out[0] == out[2] == out[3] == "woke"
        assert "ran past the time limit of 2 s (ICHBATCH_DECODE_TIMEOUT_S)" in out[1]
        assert pool.crashes == 2 and time.monotonic() - start < 40


@pytest.mark.skipif(not hasattr(os, "memfd_create"), reason="shared reply memory needs memfd (Linux)")
@pytest.mark.timeout(300)
def test_arrays_come_back_through_shared_memory_intact_and_what_does_not_fit_through_the_pipe():
    from ichbatch.workers import SharedSlots

    slots = SharedSlots.make()
    assert slots is not None
    try:  # in one process first: what goes where
        big = np.arange(1 << 20, dtype=np.int16)
        sent = slots.put(0, [(0, True, {"a": big, "b": big[:10]})])
        assert not isinstance(sent, list) and len(sent.data) < 1000  # only the arrays' description in the pipe
        ((_, _, got),) = slots.take(sent)
        assert np.array_equal(got["a"], big) and got["a"].flags.writeable
        slots.put(1, [(1, True, {"a": -big})])  # the other slot: the first reply's arrays were copied out
        assert np.array_equal(got["a"], big)
        assert isinstance(slots.put(0, [(0, True, big[::2])]), list)  # strided: through the pipe
        assert isinstance(slots.put(0, [(0, True, np.zeros(SharedSlots.SLOT_BYTES + 2, np.uint8))]), list)
    finally:
        slots.close()
    specs = [(100_000, "contiguous"), (2_000_000, "contiguous"), (100_000, "strided"), (0, "contiguous")] * 6
    for shared in (True, False):
        with IsolatedPool(pool_tasks.arrays, pool_tasks.crashed, 2, WorkerLimits(0, 0), chunk=4,
                          shared_memory=shared) as pool:
            out = list(pool.map(specs, depth=16))
            assert (pool._workers[0].slots is not None) == shared
        for (n, layout), got in zip(specs, out):
            expected = np.arange(n, dtype=np.int16)
            assert np.array_equal(got["array"], expected[::2] if layout == "strided" else expected)
            assert np.array_equal(got["thumb"], (expected[:64] % 251).astype(np.uint8))
        assert len({got["pid"] for got in out}) == 2  # both workers answered


@pytest.mark.timeout(300)
def test_workers_keep_working_while_the_caller_is_busy_and_an_abandoned_map_does_not_stop_the_next():
    with IsolatedPool(pool_tasks.sleep_for, pool_tasks.crashed, workers=2, limits=WorkerLimits(0, 0)) as pool:
        assert list(pool.map([0.0, 0.0], depth=2)) == ["woke", "woke"]  # the workers are started
        results = pool.map([0.2] * 8, depth=8)
        assert next(results) == "woke"
        time.sleep(1.5)  # the caller is busy (as with the model); the other seven take 0.8 s on two workers
        start = time.monotonic()
        assert list(results) == ["woke"] * 7
        assert time.monotonic() - start < 0.3  # they were decoded meanwhile, not when asked for

        abandoned = pool.map([0.3] * 6, depth=6)
        next(abandoned)
        later = pool.map([0.0, 0.1, 0.2], depth=3)  # takes the workers over from the unfinished map
        assert next(later) == "woke"
        del abandoned  # closing the old map must not stop the new one
        assert list(later) == ["woke", "woke"]


@pytest.mark.timeout(300)
def test_memory_cap_and_time_limit_hold_inside_the_workers():
    with IsolatedPool(pool_tasks.allocate_gb, pool_tasks.crashed, 1, WorkerLimits(memory_mb=1024, seconds=0)) as pool:
        assert list(pool.map([4.0, 0.1], depth=2)) == ["MemoryError", "allocated 0 GiB"]
    with IsolatedPool(pool_tasks.sleep_for, pool_tasks.crashed, 2, WorkerLimits(memory_mb=0, seconds=2)) as pool:
        start = time.monotonic()
        out = list(pool.map([60.0, 0.1], depth=2))
        assert out[1] == "woke" and "ran past the time limit of 2 s (ICHBATCH_DECODE_TIMEOUT_S)" in out[0]
        assert time.monotonic() - start < 30


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_DATA counts mappings as Linux does")
@pytest.mark.timeout(300)
def test_the_memory_cap_counts_memory_written_and_libraries_load_with_one_thread(monkeypatch):
    """On a 16-core H200 machine every report writer failed: numpy, loaded with the task, had started a
    BLAS thread per core (2.7 GB written, 3 GB of address space) before the worker's code set one thread.
    The variables are now in the worker's environment from its start, and the parent's own are put back.
    The cap is on writable memory: 3 GiB of address space reserved and never written (threads' heap
    arenas and stacks) leave room to write; 4 GiB written still do not fit."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    with IsolatedPool(pool_tasks.reserve_then_allocate, pool_tasks.crashed, 1,
                      WorkerLimits(memory_mb=1024, seconds=0)) as pool:
        assert list(pool.map([3.0], depth=1)) == ["reserved 3 GiB, wrote 256 MiB"]
    with IsolatedPool(pool_tasks.allocate_gb, pool_tasks.crashed, 1, WorkerLimits(memory_mb=1024, seconds=0)) as pool:
        assert list(pool.map([4.0], depth=1)) == ["MemoryError"]
    with IsolatedPool(pool_tasks.square_or_die, pool_tasks.crashed, 1, WorkerLimits(memory_mb=1024, seconds=0)) as pool:
        crashed, = pool.map([-1], depth=1)  # a crash's reason names the cap as what it counts
        assert crashed.endswith("(limits: 1024 MB written (ICHBATCH_DECODE_MEMORY_MB), no time limit)"), crashed
    with IsolatedPool(pool_tasks.blas_threads, pool_tasks.crashed, 2, WorkerLimits()) as pool:
        one = (1, {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"})
        assert list(pool.map([0, 1], depth=2)) == [one, one]
    assert os.environ["OPENBLAS_NUM_THREADS"] == "2" and "OMP_NUM_THREADS" not in os.environ


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mallopt and minor-fault counts as glibc has them")
@pytest.mark.timeout(300)
def test_a_decoder_process_serves_the_next_slice_from_the_memory_the_last_one_freed(tmp_path, monkeypatch):
    """Each 512 x 512 slice makes 1 MB float arrays. Unmapped when freed, as glibc does by default for
    blocks over 128 kB, every slice faults its pages in afresh; kept (the default), none after the first."""
    from ichbatch.discover import discover
    from ichbatch.pipeline import select
    from ichbatch.series import DEFAULT_RULES
    from ichbatch.study import decode_jobs
    from ichbatch.synth import make_phantom

    hu = make_phantom(np.random.default_rng(3), n_slices=8, size=512).hu
    write_series(tmp_path / "s", hu, study_uid=generate_uid(), series_uid=generate_uid())
    (choice,) = select(discover([str(tmp_path)]), DEFAULT_RULES)
    jobs = list(decode_jobs(0, choice, 128))
    monkeypatch.setenv("ICHBATCH_DECODE_KEEP_FREED_MB", "0")
    faults = []
    for limits in (WorkerLimits(), WorkerLimits.from_env()):
        with IsolatedPool(pool_tasks.decode_and_count_faults, pool_tasks.crashed, 1, limits) as pool:
            out = list(pool.map(jobs, depth=2))
        assert [error for error, _ in out] == [""] * len(jobs)
        faults.append([count for _, count in out[2:]])  # the first two grow the heap to its size
    kept, unmapped = faults
    assert max(kept) <= 16, kept  # 4 kB pages: nothing of a slice's arrays is faulted in again
    assert min(unmapped) >= 256, unmapped  # at least one 1 MB array's pages, every slice
    # More than glibc's 32 MB ceiling for the mmap threshold is taken, not refused (in a process of its own).
    code = "from ichbatch.workers import keep_freed_memory as k; assert k(256) and not k(0)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def _rle_bomb(path: Path, like: Path, frames: int) -> None:
    """A valid RLE file of `frames` 4096 x 4096 frames: each frame is 0.5 MB compressed, 32 MB decoded.
    Compressed data gives no size to check before decoding; only the decoder's memory cap stops it."""
    ds = pydicom.dcmread(like)
    segment = b"\x81\x00" * (4096 * 4096 // 128)  # runs of 128 zero bytes
    header = struct.pack("<16L", 2, 64, 64 + len(segment), *([0] * 13))
    ds.Rows = ds.Columns = 4096
    ds.NumberOfFrames = frames
    ds.PixelData = encapsulate([header + segment + segment] * frames)
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = RLELossless
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.timeout(600)
def test_a_decode_that_needs_gigabytes_is_one_slice_failure_within_the_memory_cap(tmp_path, tiny_bundle, phantom_hu):
    uid = generate_uid()
    paths = write_series(tmp_path / "in", phantom_hu[:10], study_uid=uid, series_uid=generate_uid())
    bomb = next(p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber == 5)
    _rle_bomb(bomb, bomb, frames=120)  # 63 MB on disk, 4 GB decoded
    assert bomb.stat().st_size < 80 << 20
    out = tmp_path / "r.csv"
    peak_gb, done = _peak_rss_gb_of([sys.executable, "-m", "ichbatch.cli", "run", str(tmp_path / "in"), "--out",
                                     str(out), "--model", str(tiny_bundle), "--tta", "1", "--no-reports"])
    assert done.returncode == 0, done.stderr
    assert peak_gb < 3.0, peak_gb
    (row,) = pd.read_csv(out, dtype=str, keep_default_na=False).to_dict("records")
    assert row["status"] == "ok" and row["n_slices"] == "9" and "1 slice(s) could not be decoded" in row["message"]
    files = pd.read_csv(tmp_path / "r_files.csv", dtype=str).set_index("path")
    assert "more memory than a decoder process may use" in files.loc[str(bomb), "message"]


def _slice_file(tmp_path: Path, hu: np.ndarray, **header: object) -> SliceRef:
    ds = ct_slice_dataset(hu, z=0.0)
    for key, value in header.items():
        setattr(ds, key, value)
    path = tmp_path / f"{generate_uid()}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return SliceRef(str(path), None, (0.0, 0.0, 0.0), 0.0)


@pytest.mark.parametrize("case, expected", [
    ("all air", "all air"),
    ("intercept 0", "rescale intercept looks wrong"),
    ("slope 10", "implausible|denser than 300 HU"),
    ("all bone", "no soft tissue|denser than 300 HU"),
])
def test_decodes_that_do_not_look_like_ct_are_refused(tmp_path, phantom_hu, case, expected):
    hu = phantom_hu[6].astype(np.float32)
    assert load_hu(_slice_file(tmp_path, hu)).hu.shape == hu.shape  # the unchanged slice passes
    if case == "all air":
        ref = _slice_file(tmp_path, np.random.default_rng(0).normal(-1000, 20, hu.shape))
    elif case == "intercept 0":  # the header lost its intercept: air reads as ~0 HU, brain as ~1000 HU
        ref = _slice_file(tmp_path, hu, RescaleIntercept=0)
    elif case == "slope 10":
        ref = _slice_file(tmp_path, hu, RescaleSlope=10)
    else:
        ref = _slice_file(tmp_path, np.where(hu > -500, 1500.0, 900.0))
    with pytest.raises(DecodeError, match=expected):
        load_hu(ref)


def test_real_decode_with_a_missing_intercept_is_caught_and_the_other_decoder_used():
    """A real Enhanced CT frame whose intercept lives only in its functional groups: read without it,
    pydicom's HU look wrong and the check catches it; GDCM applies the functional groups and passes."""
    path = Path(__file__).resolve().parents[2] / "shared" / "realdata" / "pydicom_data" / "eCT_Supplemental.dcm"
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared/realdata)")
    result = load_hu(SliceRef(str(path), 0, (0.0, 0.0, 0.0), 0.0))
    assert any("rescale intercept looks wrong" in w and "SimpleITK" in w for w in result.warnings)
    assert np.percentile(result.hu, 5) < -900 and 0 < np.median(result.hu[result.hu > -500]) < 200


@pytest.mark.timeout(600)
def test_late_slices_join_the_study_until_its_result_is_final_then_are_kept_aside(tmp_path, tiny_bundle, phantom_hu):
    from ichbatch.watch.watcher import Watcher

    uid, series = generate_uid(), generate_uid()
    staged = write_series(tmp_path / "staging", phantom_hu[:12], study_uid=uid, series_uid=series)
    incoming = tmp_path / "in"
    incoming.mkdir()
    for p in staged[:10]:
        shutil.copy(p, incoming / p.name)
    settling = _settings(tmp_path, tiny_bundle, incoming, after="delete", settle_seconds=3600)
    watcher = Watcher(settling)
    try:
        watcher.scan()
        assert watcher.process_ready() == 1
        assert len(list(incoming.iterdir())) == 10  # done, but the result is not final yet: inputs stay
        shutil.copy(staged[10], incoming / staged[10].name)  # a late slice
        watcher.scan()
        assert watcher.process_ready() == 1
        (row,) = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str).to_dict("records")
        assert row["n_slices"] == "11"  # a new version from all eleven files, not from the late one alone
    finally:
        watcher.close()
    final = Watcher(_settings(tmp_path, tiny_bundle, incoming, after="delete", settle_seconds=0))
    try:
        final.process_ready()
        assert list(incoming.iterdir()) == []  # settled: now the inputs go
        late = incoming / staged[11].name
        shutil.copy(staged[11], late)  # later still: the study's other files are gone
        final.scan()
        assert final.process_ready() == 0
        assert late.exists()  # kept, not processed, not deleted
        (row,) = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str).to_dict("records")
        assert row["n_slices"] == "11" and row["status"] == "ok"
        files = pd.read_csv(tmp_path / "out" / "results_files.csv", dtype=str).set_index("path")
        assert "arrived after this study's result was final" in files.loc[str(late), "message"]
        assert final.ledger.studies()[0].version == 2
    finally:
        final.close()


@pytest.mark.timeout(300)
def test_map_ready_hands_over_every_result_that_is_ready_in_order_and_each_once():
    """Results that came while the first was awaited arrive with it, as one group; none is held back to
    fill a group, and a dead worker's item still fails alone."""
    with IsolatedPool(pool_tasks.sleep_for, pool_tasks.crashed, 3, WorkerLimits(0, 0)) as pool:
        groups = list(pool.map_ready([3.0, 0.05, 0.05, 0.05, 0.05, 0.05], depth=6))
        assert [r for g in groups for r in g] == ["woke"] * 6
        assert len(groups[0]) >= 3  # the short sleeps ended while the long one was awaited
    with IsolatedPool(pool_tasks.square_or_die, pool_tasks.crashed, 2, WorkerLimits(0, 0)) as pool:
        groups = list(pool.map_ready([1, 2, -1, 3, 4], depth=2))
        out = [r for g in groups for r in g]
        assert out[:2] == [1, 4] and out[3:] == [9, 16] and out[2].startswith("crashed:")
        assert all(groups)
