"""The one study path: resume after SIGKILL, run and watch agree, slice identity, the ledger's transactions."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import generate_uid

from ichbatch.cli import main
from ichbatch.discover import discover
from ichbatch.report.store import store_path
from ichbatch.series import choose_series, group_studies, order_slices
from ichbatch.synth import Encoding, synth_studies

from .conftest import write_series

TIMING = ["seconds", "report_pdf"]


def _env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONUNBUFFERED": "1"}


def _committed(csv: Path) -> dict[str, tuple[str, float]]:
    """study_uid -> (run_id, finished_at) as the store holds them."""
    db = store_path(csv)
    if not db.exists():
        return {}
    try:
        with sqlite3.connect(db, timeout=5) as con:
            return {u: (r, f) for u, r, f in con.execute("SELECT study_uid, run_id, finished_at FROM studies")}
    except sqlite3.OperationalError:
        return {}


def test_sigkill_halfway_then_resume_gives_one_row_per_study_and_redoes_nothing(tmp_path, tiny_bundle):
    n = 8
    synth_studies(tmp_path / "in", n, seed=21, n_slices=12, size=96, encoding=Encoding())
    csv = tmp_path / "out" / "results.csv"
    cmd = [sys.executable, "-m", "ichbatch.cli", "run", str(tmp_path / "in"), "--out", str(csv), "--model",
           str(tiny_bundle), "--tta", "1", "--batch-size", "4"]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while len(_committed(csv)) < 2:
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else "run exited"
        assert time.time() < deadline, "no study finished in time"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = _committed(csv)
    assert 2 <= len(before) < n, "the run finished before it could be killed halfway"
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert set(rows["study_uid"]) <= set(before)  # the CSV never shows a study the store does not hold

    result = subprocess.run(cmd + ["--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} already complete (--resume)" in result.stderr
    after = _committed(csv)
    assert len(after) == n
    assert {u: after[u] for u in before} == before  # finished studies were not processed again
    rows = pd.read_csv(csv, dtype=str, keep_default_na=False)
    assert len(rows) == n and rows["study_uid"].is_unique and set(rows["study_uid"]) == set(after)
    assert (rows["status"] == "ok").all()
    assert not list(csv.parent.rglob(".*.tmp"))


def test_resume_redoes_a_study_whose_instances_changed(tmp_path, tiny_bundle, phantom_hu):
    study = generate_uid()
    write_series(tmp_path / "in" / "a", phantom_hu[:10], study_uid=study, series_uid=generate_uid())
    csv = tmp_path / "results.csv"
    args = ["run", str(tmp_path / "in"), "--out", str(csv), "--model", str(tiny_bundle), "--tta", "1", "--no-reports"]
    assert CliRunner().invoke(main, args).exit_code == 0
    first = _committed(csv)[study]
    assert "1 already complete" in CliRunner().invoke(main, [*args, "--resume"]).output
    assert _committed(csv)[study] == first
    # A late slice arrives: same study, new set of instances, so --resume runs it again.
    write_series(tmp_path / "in" / "b", phantom_hu[10:11], study_uid=study, series_uid=generate_uid())
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert "0 already complete" in result.output and _committed(csv)[study] != first


def _export(root: Path, phantom_hu: np.ndarray) -> Path:
    synth_studies(root / "phantoms", 2, seed=5, n_slices=10, size=96, encoding=Encoding())
    broken = write_series(root / "one_bad_slice", phantom_hu, study_uid=generate_uid(), series_uid=generate_uid())
    broken[3].write_bytes(broken[3].read_bytes()[:-3000])  # pixel data cut short
    (root / "notes.txt").write_text("not dicom")
    first = next((root / "phantoms").rglob("*.dcm"))
    (root / "cut_header.dcm").write_bytes(first.read_bytes()[:400])
    return root


def test_run_and_watch_write_the_same_rows_and_file_issues(tmp_path, tiny_bundle, phantom_hu):
    from ichbatch.study import RunSettings
    from ichbatch.watch.watcher import Watcher, WatchSettings

    incoming = _export(tmp_path / "incoming", phantom_hu)
    run_csv = tmp_path / "run" / "results.csv"
    result = CliRunner().invoke(main, ["run", str(incoming), "--out", str(run_csv), "--model", str(tiny_bundle),
                                       "--tta", "1", "--batch-size", "8"])
    assert result.exit_code == 0, result.output
    watch_out = tmp_path / "watch"
    watcher = Watcher(WatchSettings(incoming=incoming, out=watch_out, quiet_seconds=0.0,
                                    run=RunSettings(model=str(tiny_bundle), tta=1, batch_size=8)))
    try:
        watcher.scan()
        assert watcher.process_ready() == 3
    finally:
        watcher.close()
    ran = pd.read_csv(run_csv, dtype=str, keep_default_na=False).sort_values("study_uid").reset_index(drop=True)
    watched = pd.read_csv(watch_out / "results.csv", dtype=str, keep_default_na=False)
    watched = watched.sort_values("study_uid").reset_index(drop=True)
    assert len(ran) == 3 and (ran["status"] == "ok").all()
    pd.testing.assert_frame_equal(ran.drop(columns=TIMING), watched.drop(columns=TIMING))
    assert [Path(p).name for p in ran["report_pdf"]] == [Path(p).name for p in watched["report_pdf"]]
    files_run = pd.read_csv(tmp_path / "run" / "results_files.csv", dtype=str).sort_values("path")
    files_watch = pd.read_csv(watch_out / "results_files.csv", dtype=str).sort_values("path")
    pd.testing.assert_frame_equal(files_run.reset_index(drop=True), files_watch.reset_index(drop=True))
    names = {Path(p).name: st for p, st in zip(files_run["path"], files_run["status"])}
    assert names.pop("notes.txt") == names.pop("manifest.json") == names.pop("lesion_masks.npz") == "skipped"
    assert names.pop("cut_header.dcm") == "failed"  # DICOM whose header cannot be read
    assert list(names.values()) == ["failed"]  # the slice whose pixels were cut short
    assert "1 slice(s) could not be decoded" in ran.loc[ran["n_slices"] == "11", "message"].iloc[0]


def test_ledger_interrupted_while_recording_a_file_loses_nothing(tmp_path, tiny_bundle, phantom_hu, monkeypatch):
    from ichbatch.study import RunSettings
    from ichbatch.watch.ledger import Ledger
    from ichbatch.watch.watcher import Watcher, WatchSettings

    study = generate_uid()
    write_series(tmp_path / "in", phantom_hu[:9], study_uid=study, series_uid=generate_uid())
    settings = WatchSettings(incoming=tmp_path / "in", out=tmp_path / "out", quiet_seconds=0.0,
                             run=RunSettings(model=str(tiny_bundle), tta=1, batch_size=8))
    watcher = Watcher(settings)

    def interrupted(self, study_uid, now):  # type: ignore[no-untyped-def]
        raise KeyboardInterrupt  # Ctrl-C after the file row was written, before its study was

    monkeypatch.setattr(Ledger, "_mark_pending", interrupted)
    with pytest.raises(KeyboardInterrupt):
        watcher.scan()
    assert all(watcher.ledger.file_state(str(p)) is None for p in (tmp_path / "in").iterdir())  # rolled back
    watcher.close()
    monkeypatch.undo()
    restarted = Watcher(settings)
    try:
        restarted.scan()
        assert restarted.process_ready() == 1
    finally:
        restarted.close()
    rows = pd.read_csv(tmp_path / "out" / "results.csv", dtype=str)
    assert list(rows["study_uid"]) == [study] and rows["status"][0] == "ok"


def test_watch_settings_check_their_own_values(tmp_path):
    from ichbatch.study import RunSettings
    from ichbatch.watch.watcher import After, WatchSettings

    base = {"incoming": tmp_path, "out": tmp_path / "o", "run": RunSettings(model="x")}
    assert WatchSettings(**base, after="delete").after is After.DELETE
    with pytest.raises(ValueError, match="after must be one of"):
        WatchSettings(**base, after="remove")
    with pytest.raises(ValueError, match="archive"):
        WatchSettings(**base, after=After.MOVE)
    with pytest.raises(ValueError, match="max_attempts"):
        WatchSettings(**base, max_attempts=0)


def test_feet_first_series_is_ordered_inferior_to_superior(tmp_path, phantom_hu):
    paths = write_series(tmp_path, phantom_hu[:8], study_uid=generate_uid(), series_uid=generate_uid())
    for p in paths:  # the same slices as a feet-first acquisition: flipped rows, normal pointing to the feet
        ds = pydicom.dcmread(p)
        ds.PatientPosition = "FFS"
        ds.ImageOrientationPatient = [-1, 0, 0, 0, 1, 0]
        ds.save_as(p)
    instances = discover([tmp_path]).instances
    slices, _ = order_slices(instances)
    z_patient = [s.position[2] for s in slices]
    assert z_patient == sorted(z_patient)  # inferior (lowest patient z) first
    assert [s.z for s in slices] == sorted(s.z for s in slices) and slices[0].z == pytest.approx(z_patient[0])


def test_a_slice_that_fails_to_decode_shifts_no_other_slice(tmp_path, tiny_bundle, phantom_hu):
    from ichbatch.study import Engine, RunSettings, StudyPath

    paths = write_series(tmp_path, phantom_hu, study_uid=generate_uid(), series_uid=generate_uid())
    choice = choose_series(next(iter(group_studies(discover([tmp_path]).instances).values())))
    engine = Engine(RunSettings(model=str(tiny_bundle), tta=1, batch_size=4))
    whole = StudyPath(engine).process(choice)
    bad = choice.slices[2]  # the third slice from inferior
    Path(bad.path).write_bytes(Path(bad.path).read_bytes()[:-3000])
    assert len(paths) == len(whole.slices) == 12
    partial = StudyPath(engine).process(choice)
    assert partial.n_slices == 11
    assert [s.index for s in partial.slices] == [1, 2, *range(4, 13)]
    kept = {s.sop_uid: s for s in partial.slices}
    for s in whole.slices:
        if s.sop_uid != bad.sop_uid:
            assert kept[s.sop_uid] == s  # same index, Instance Number and position as without the failure
    assert whole.slices[0].instance_number == 12 and whole.slices[0].z_mm == 0.0  # write_series numbers top down
    for s, probs in zip(partial.slices, partial.slice_probs):  # scores follow their slice
        np.testing.assert_allclose(probs, whole.slice_probs[s.index - 1], atol=1e-5)


def test_a_study_is_finished_on_its_own_thread_while_the_next_is_scored_and_results_keep_their_order(
        tmp_path, tiny_bundle):
    """The model does not wait for a study's heat maps and key images; outputs still come in input order,
    and a study whose finishing fails is one failed row."""
    import threading

    from ichbatch.pipeline import Engine, RunSettings, process_studies, select

    synth_studies(tmp_path / "in", 4, seed=5, n_slices=12, size=96, encoding=Encoding())
    engine = Engine(RunSettings(model=str(tiny_bundle), tta=1, batch_size=4, workers=1))
    events: list[tuple[str, float]] = []
    run, maps_calls = engine.predictor._run, []

    def scored(hu):  # type: ignore[no-untyped-def]
        events.append(("model", time.perf_counter()))
        return run(hu)

    class SlowMaps:  # a heat map that takes a while, on whatever thread it runs
        def describe(self) -> str:
            return "slow"

        def maps(self, inputs, output_index):  # type: ignore[no-untyped-def]
            maps_calls.append(threading.current_thread().name)
            if len(maps_calls) == 1:
                raise RuntimeError("planted heat-map failure")
            events.append(("maps start", time.perf_counter()))
            time.sleep(0.4)
            events.append(("maps end", time.perf_counter()))
            return np.zeros(inputs.shape[:3], np.float32)

    engine.predictor._run = scored
    engine.explainer = SlowMaps()
    # Every label flagged, so that every study gets heat maps.
    engine.bundle.card.thresholds.update({label: 0.0 for label in engine.bundle.card.thresholds})
    choices = select(discover([tmp_path / "in"]), engine.settings.rules)
    results = []
    try:
        process_studies(choices, engine, on_result=results.append)
    finally:
        engine.close()
    assert [r.study.study_uid for r in results] == [c.study.study_uid for c in choices]
    assert [r.status.value for r in results] == ["failed", "ok", "ok", "ok"]
    assert "planted heat-map failure" in results[0].message
    assert maps_calls and all(name.startswith("ichbatch-finish") for name in maps_calls)
    spans = [(t, next(u for e, u in events if e == "maps end" and u > t)) for e, t in events if e == "maps start"]
    model_times = [t for e, t in events if e == "model"]
    assert any(start < t < end for start, end in spans for t in model_times), events  # scored meanwhile


def test_key_slices_are_drawn_where_the_reports_are_written_and_a_vanished_key_slice_fails_only_its_study(
        tmp_path, tiny_bundle):
    """The study path hands on its key slices undrawn, each with its heat map; the report writer (a
    process of its own) reads them again at full size and draws them. A run that writes no reports never
    reads them again, and a key slice whose file is gone by the time reports are written fails only its
    study, with the reason."""
    import pypdf

    from ichbatch.pipeline import Engine, RunSettings, select
    from ichbatch.report.outputs import OutputSettings, OutputWriter
    from ichbatch.study import StudyPath

    synth_studies(tmp_path / "in", 3, seed=8, n_slices=10, size=96, encoding=Encoding())
    engine = Engine(RunSettings(model=str(tiny_bundle), tta=1, batch_size=4, workers=1))
    engine.bundle.card.thresholds.update({label: 0.0 for label in engine.bundle.card.thresholds})
    choices = select(discover([tmp_path / "in"]), engine.settings.rules)

    class Kept:  # the sink: what a report writer would get
        def __init__(self) -> None:
            self.studies: list[tuple[object, object]] = []

        def write(self, result, images):  # type: ignore[no-untyped-def]
            self.studies.append((result, images))
            return result

        def record_file_issue(self, issue) -> None:  # type: ignore[no-untyped-def]
            pass

    kept = Kept()
    try:
        list(StudyPath(engine, kept).process_many(choices))
    finally:
        engine.close()
    for result, images in kept.studies:
        assert result.status.value == "ok" and not images.key_images  # type: ignore[attr-defined]
        keys = images.to_draw  # type: ignore[attr-defined]
        assert [k.slice for k in keys] == list(result.key_slices) and len(keys) == 3  # type: ignore[attr-defined]
        assert all(k.heat_label == "any" and k.heat is not None and 0 <= k.heat.min() <= k.heat.max() <= 1
                   for k in keys)
    # CSV only: nothing reads the key slices again, so their files may be gone.
    gone = {k.ref.path: Path(k.ref.path).read_bytes() for k in kept.studies[1][1].to_draw}  # type: ignore[attr-defined]
    for path in gone:
        Path(path).unlink()
    with OutputWriter(OutputSettings(csv=tmp_path / "only.csv", writers=1)) as writer:
        assert [r.status.value for r in writer.write_many(kept.studies)] == ["ok"] * 3  # type: ignore[arg-type]
    settings = OutputSettings(csv=tmp_path / "r.csv", reports=tmp_path / "reports", writers=1)
    with OutputWriter(settings) as writer:
        written = list(writer.write_many(kept.studies))  # type: ignore[arg-type]
    assert [r.status.value for r in written] == ["ok", "failed", "ok"]
    assert "key image could not be made" in written[1].message and "DecodeError" in written[1].message
    for result in (written[0], written[2]):  # drawn: the first page shows the top key slice with its map
        assert pypdf.PdfReader(result.report_pdf).pages[0].images
    for path, data in gone.items():  # back again: the same study is drawn and written
        Path(path).write_bytes(data)
    with OutputWriter(settings) as writer:
        again, = writer.write_many([kept.studies[1]])  # type: ignore[list-item]
    assert again.status.value == "ok" and pypdf.PdfReader(again.report_pdf).pages[0].images


def test_two_studies_are_finished_at_a_time_beside_many_decoders_and_results_keep_their_order(
        tmp_path, tiny_bundle):
    """With 8 decoder processes two finishing threads work side by side: the first two studies' heat
    maps meet at a barrier, which one thread alone could never pass. Results still come in input order,
    each with its own key images."""
    import threading

    from ichbatch.pipeline import Engine, RunSettings, select
    from ichbatch.study import StudyPath

    synth_studies(tmp_path / "in", 4, seed=12, n_slices=10, size=96, encoding=Encoding())
    engine = Engine(RunSettings(model=str(tiny_bundle), tta=1, batch_size=4, workers=8))
    engine.bundle.card.thresholds.update({label: 0.0 for label in engine.bundle.card.thresholds})
    assert engine.finishers == 2
    meet = threading.Barrier(2, timeout=60)
    maps, calls, threads = engine.explainer.maps, [], set()

    def side_by_side(images, index):  # type: ignore[no-untyped-def]
        calls.append(len(images))
        threads.add(threading.current_thread().name)
        if len(calls) <= 2:
            meet.wait()  # raises BrokenBarrierError (a failed study) if the other study is not being finished
        return maps(images, index)

    engine.explainer.maps = side_by_side  # type: ignore[method-assign]
    choices = select(discover([tmp_path / "in"]), engine.settings.rules)
    try:
        results = list(StudyPath(engine).process_many(choices))
    finally:
        engine.close()
    assert [r.study.study_uid for r in results] == [c.study.study_uid for c in choices]
    assert [r.status.value for r in results] == ["ok"] * 4, [r.message for r in results]
    assert len(threads) == 2 and not meet.broken
    assert sum(calls) == 4 * 3  # every key slice's map made once, alone or with another study's
    assert all(len(r.key_slices) == 3 for r in results)


def test_finishing_threads_take_the_studies_that_queued_while_they_were_busy_as_one_group():
    """GroupThreads: an idle thread takes an item at once; what queues meanwhile is taken together, up
    to the limit; results come back per item; close cancels what no thread took; a failed group's
    items all hear of it."""
    import threading

    from ichbatch.study import GroupThreads

    gate, calls = threading.Event(), []

    def work(items):  # type: ignore[no-untyped-def]
        calls.append(list(items))
        assert gate.wait(30)
        if -1 in items:
            raise RuntimeError("planted")
        return [2 * i for i in items]

    threads = GroupThreads(work, 1, 2)
    first = threads.submit(0)
    while not calls:
        time.sleep(0.01)
    later = [threads.submit(i) for i in (1, 2, 3)]
    gate.set()
    assert [f.result(30) for f in [first, *later]] == [0, 2, 4, 6]
    assert calls == [[0], [1, 2], [3]]
    gate.clear()
    calls.clear()
    busy = threads.submit(5)
    while not calls:
        time.sleep(0.01)
    failing = [threads.submit(-1), threads.submit(7)]
    closing = threading.Thread(target=threads.close)
    closing.start()
    time.sleep(0.2)
    gate.set()
    closing.join(30)
    assert busy.result(1) == 10 and all(f.cancelled() for f in failing) and calls == [[5]]
    again = GroupThreads(work, 1, 8)  # the gate stays open: both items may come in one group or two
    failed = again.submit(-1)
    with pytest.raises(RuntimeError, match="planted"):
        failed.result(30)
    assert again.submit(4).result(30) == 8
    again.close()


def test_studies_finished_together_get_the_heat_maps_they_get_alone_in_one_call_and_a_failure_stays_their_own(
        tmp_path, tiny_bundle):
    """Four flagged studies finished as one group: one explainer call for all their key slices, and the
    same results and heat maps as each finished alone. If the joint call fails, each study's maps are
    made alone, and a study whose own call fails is the only one that fails."""
    from ichbatch.pipeline import Engine, RunSettings, select
    from ichbatch.study import StudyPath

    synth_studies(tmp_path / "in", 4, seed=14, n_slices=10, size=96, encoding=Encoding())
    engine = Engine(RunSettings(model=str(tiny_bundle), tta=1, batch_size=4, workers=1))
    engine.bundle.card.thresholds.update({label: 0.0 for label in engine.bundle.card.thresholds})
    path = StudyPath(engine)
    try:
        scored = [(*study, 0.25) for study in path._score(select(discover([tmp_path / "in"]), engine.settings.rules))]
    finally:
        engine.close()
    alone = [path._finish_group([study])[0] for study in scored]
    maps, sizes = engine.explainer.maps, []

    def counted(images, index):  # type: ignore[no-untyped-def]
        sizes.append(len(images))
        if planted and (len(images) > 3 or len(sizes) == 3):  # the joint call, then the second study's own
            raise RuntimeError("planted heat-map failure")
        return maps(images, index)

    engine.explainer.maps = counted  # type: ignore[method-assign]
    planted = False
    together = path._finish_group(scored)
    assert sizes == [12]
    for (a, a_images), (t, t_images) in zip(alone, together):
        assert t.status.value == a.status.value == "ok" and t.key_slices == a.key_slices
        assert t.study_probs == a.study_probs and t.seconds > 0.25
        for ka, kt in zip(a_images.to_draw, t_images.to_draw):
            assert kt.heat_label == ka.heat_label == "any"
            np.testing.assert_allclose(kt.heat, ka.heat, atol=1e-5)
    sizes.clear()
    planted = True
    again = path._finish_group(scored)
    assert sizes == [12, 3, 3, 3, 3]
    assert [r.status.value for r, _ in again] == ["ok", "failed", "ok", "ok"]
    assert "planted heat-map failure" in again[1][0].message and not again[1][1].to_draw
    for n in (0, 2, 3):
        np.testing.assert_allclose(again[n][1].to_draw[0].heat, alone[n][1].to_draw[0].heat, atol=1e-5)


def test_report_files_are_written_in_writer_processes_and_a_dead_or_starved_writer_fails_only_its_study(
        tmp_path, tiny_bundle, monkeypatch):
    """PDF, JSON and thumbnails are written in processes of their own (rendering a PDF would hold the
    model's interpreter lock), under the decoders' memory cap (they read the key slices again),
    committed in input order; a writer that dies fails that study's reports."""
    import pypdf

    from ichbatch.pipeline import RunSettings, process_folder
    from ichbatch.report import outputs
    from ichbatch.report.outputs import OutputSettings, OutputWriter

    from . import pool_tasks

    synth_studies(tmp_path / "in", 4, seed=11, n_slices=10, size=96, encoding=Encoding())
    uids = sorted({pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID for p in (tmp_path / "in").rglob("*.dcm")})
    monkeypatch.setattr(outputs, "write_files_job", pool_tasks.write_files_or_die)
    monkeypatch.setenv("ICHBATCH_TEST_WRITER_DIES_ON", uids[1])
    monkeypatch.setenv("ICHBATCH_TEST_WRITER_OOM_ON", uids[2])
    monkeypatch.setenv("ICHBATCH_DECODE_MEMORY_MB", "3000")  # the writers read DICOM again: the decoders' cap
    seen: list[str] = []
    settings = OutputSettings(csv=tmp_path / "r.csv", reports=tmp_path / "reports", writers=2)
    with OutputWriter(settings) as writer:
        process_folder([tmp_path / "in"], RunSettings(model=str(tiny_bundle), tta=1, batch_size=4, workers=1),
                       sink=writer, on_result=lambda r: seen.append(r.study.study_uid))
    rows = pd.read_csv(tmp_path / "r.csv", dtype=str, keep_default_na=False).set_index("study_uid")
    assert sorted(seen) == uids and len(rows) == 4
    dead = rows.loc[uids[1]]
    assert dead["status"] == "failed" and dead["report_pdf"] == ""
    assert "report not written: the report writer process exited (139) on this study" in dead["message"]
    starved = rows.loc[uids[2]]
    assert starved["status"] == "failed" and starved["report_pdf"] == ""
    assert "report not written: it needed more memory than a report writer may use (3000 MB" in starved["message"]
    writers = set()
    for uid in (uids[0], uids[3]):
        row = rows.loc[uid]
        assert row["status"] == "ok", row["message"]
        pid, cap = row["message"].removeprefix("written by ").split(" within ")
        writers.add(int(pid))
        assert int(cap) == 3000 << 20
        text = "".join(page.extract_text() for page in pypdf.PdfReader(row["report_pdf"]).pages)
        assert "not for diagnosis" in text.lower()
    assert os.getpid() not in writers
    assert len(list((tmp_path / "reports").glob("*.pdf"))) == 2
