"""The PACS scenarios of tests/test_pacs.py: Orthanc, ichbatch listen and dcmtk, run only inside the
loopback-only network namespace that test makes (this file's name keeps pytest from collecting it
on its own; run directly outside the namespace, it skips).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from .conftest import LOOPBACK_ENV, free_port, write_series

if os.environ.get(LOOPBACK_ENV) != "1":
    pytest.skip("runs inside the loopback-only namespace that tests/test_pacs.py makes", allow_module_level=True)
ORTHANC = shutil.which("Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


class Orthanc:
    def __init__(self, root: Path) -> None:
        self.root, self.http, self.dicom = root, free_port(), free_port()
        root.mkdir(parents=True, exist_ok=True)
        config = {"Name": "ichbatch-test", "StorageDirectory": str(root / "db"), "IndexDirectory": str(root / "db"),
                  "HttpPort": self.http, "DicomPort": self.dicom, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
                  "AuthenticationEnabled": False, "DicomCheckCalledAet": True, "DicomAlwaysAllowStore": True,
                  "DicomAlwaysAllowEcho": True, "Plugins": [str(DICOMWEB_PLUGIN)],
                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "StableAge": 1}
        (root / "orthanc.json").write_text(json.dumps(config))
        self.proc: subprocess.Popen | None = None

    def start(self) -> Orthanc:
        self.proc = subprocess.Popen([str(ORTHANC), str(self.root / "orthanc.json")], stdout=subprocess.DEVNULL,
                                     stderr=open(self.root / "orthanc.log", "ab"))
        try:
            _wait(lambda: self.get("/system") is not None, 60, "Orthanc did not start")
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # by PID: never a pkill that could hit anything else
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=60)
            self.proc = None

    def get(self, path: str):  # type: ignore[no-untyped-def]
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=10) as r:
                data = r.read()
                return json.loads(data) if r.headers.get_content_type() == "application/json" else data
        except OSError:
            return None

    def post(self, path: str, body: bytes) -> object:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http}{path}", data=body, method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def study(self, study_uid: str) -> list[pydicom.Dataset]:
        """Every instance Orthanc has of the study, read back from its REST API."""
        found = self.post("/tools/lookup", study_uid.encode())
        ids = [f["ID"] for f in found if f["Type"] == "Study"]  # type: ignore[union-attr]
        if not ids:
            return []
        instances = self.get(f"/studies/{ids[0]}/instances") or []
        return [pydicom.dcmread(_bytes_io(self.get(f"/instances/{i['ID']}/file"))) for i in instances]


def _bytes_io(data: bytes):  # type: ignore[no-untyped-def]
    import io

    return io.BytesIO(data)


def _wait(check, seconds: float, message: str) -> None:  # type: ignore[no-untyped-def]
    end = time.time() + seconds
    while time.time() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(message)


@pytest.fixture()
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc").start()
    yield server
    server.stop()


@pytest.fixture()
def study(tmp_path, phantom_hu) -> tuple[str, list[Path]]:
    uid = generate_uid()
    return uid, write_series(tmp_path / "study", phantom_hu, study_uid=uid, series_uid=generate_uid())


STARTED: list[subprocess.Popen] = []  # listeners, stopped by their PID after each test whatever happened


@pytest.fixture(autouse=True)
def _no_listener_outlives_its_test():  # type: ignore[no-untyped-def]
    yield
    while STARTED:
        proc = STARTED.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)


def _listen(out: Path, port: int, bundle: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ichbatch.cli", "listen", "--out", str(out), "--port", str(port), "--aet", "ICHBATCH",
           "--bind", "127.0.0.1", "--allow", "STORESCU", "--model", str(bundle), "--tta", "1", "--rescan-seconds", "1",
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=open(out.parent / f"listen-{port}.log", "ab"))
    STARTED.append(proc)
    _wait(lambda: _echo(port), 120, "ichbatch listen did not answer C-ECHO")
    return proc


def _echo(port: int, aet: str = "STORESCU") -> bool:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", "ICHBATCH", "127.0.0.1", str(port)],
                          capture_output=True).returncode == 0


def _storescu(port: int, called: str, files: list[Path], aet: str = "STORESCU") -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", aet, "-aec", called, "127.0.0.1", str(port), *map(str, files)],
                          capture_output=True, text=True)


def _stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=120)


def _results_of(orthanc: Orthanc, study_uid: str) -> dict[str, list[pydicom.Dataset]]:
    by_modality: dict[str, list[pydicom.Dataset]] = {}
    for ds in orthanc.study(study_uid):
        by_modality.setdefault(ds.Modality, []).append(ds)
    return by_modality


def _check_results(orthanc: Orthanc, study_uid: str, source: list[Path]) -> None:
    got = _results_of(orthanc, study_uid)
    assert set(got) == {"CT", "SR", "KO", "OT", "DOC"}, sorted(got)
    (sr,), (kos,) = got["SR"], got["KO"]
    source_uids = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in source}
    assert {ds.SOPInstanceUID for ds in got["CT"]} == source_uids
    # Every image the SR's findings reference is an instance of the source series, in the PACS.
    measurements = next(i for i in sr.ContentSequence if i.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements")
    refs = {item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for group in measurements.ContentSequence
            for item in group.ContentSequence if item.ValueType == "IMAGE"}
    assert refs and refs <= source_uids
    kos_refs = {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in kos.ContentSequence if i.ValueType == "IMAGE"}
    assert kos_refs == refs and len(got["OT"]) == len(refs)
    assert got["DOC"][0].MIMETypeOfEncapsulatedDocument == "application/pdf"


def test_listen_receives_processes_after_a_restart_and_delivers_to_orthanc(tmp_path, orthanc, study, tiny_bundle):
    study_uid, files = study
    assert _storescu(orthanc.dicom, "ORTHANC", files).returncode == 0  # the PACS has the scan
    port, out = free_port(), tmp_path / "out"
    send = ("--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom}")
    listener = _listen(out, port, tiny_bundle, "--quiet-seconds", "600", *send)
    sent = _storescu(port, "ICHBATCH", files)
    assert sent.returncode == 0, sent.stderr
    assert len(list((out / "spool").rglob("*.dcm"))) == len(files)  # all received before C-STORE said success
    assert _stop(listener) == 0  # SIGTERM mid quiet period: a clean stop
    assert set(_results_of(orthanc, study_uid)) == {"CT"}  # nothing processed yet
    listener = _listen(out, port, tiny_bundle, "--quiet-seconds", "1", *send)  # the restart finds the spooled study
    try:
        _wait(lambda: "SR" in _results_of(orthanc, study_uid) and "DOC" in _results_of(orthanc, study_uid), 180,
              "results did not reach Orthanc")
        _wait(lambda: len(_results_of(orthanc, study_uid).get("OT", [])) >= 1, 30, "key images did not reach Orthanc")
        time.sleep(2)
        _check_results(orthanc, study_uid, files)
    finally:
        assert _stop(listener) == 0
    status = subprocess.run([sys.executable, "-m", "ichbatch.cli", "status", str(out)], capture_output=True, text=True)
    assert f"ORTHANC@127.0.0.1:{orthanc.dicom}: " in status.stdout and " 0 pending, 0 failed" in status.stdout
    log = (tmp_path / f"listen-{port}.log").read_text()
    assert "association from STORESCU" in log and study_uid not in log and "PHANTOM" not in log  # no PHI in the log


def test_a_calling_ae_title_that_is_not_allowed_is_rejected_and_nothing_is_written(tmp_path, study, tiny_bundle):
    _, files = study
    port, out = free_port(), tmp_path / "out"
    listener = _listen(out, port, tiny_bundle)
    try:
        refused = _storescu(port, "ICHBATCH", files[:3], aet="INTRUDER")
        assert refused.returncode != 0 and "Association Rejected" in refused.stdout + refused.stderr
        assert not _echo(port, "INTRUDER")
        assert not list((out / "spool").rglob("*")) and not list(out.glob(".spool-receiving/*"))
    finally:
        assert _stop(listener) == 0


def test_run_sends_by_stow_rs(tmp_path, orthanc, study, tiny_bundle):
    study_uid, files = study
    assert _storescu(orthanc.dicom, "ORTHANC", files).returncode == 0
    run = subprocess.run([sys.executable, "-m", "ichbatch.cli", "run", str(files[0].parent), "--out",
                          str(tmp_path / "r" / "results.csv"), "--model", str(tiny_bundle), "--tta", "1",
                          "--stow-url", f"http://127.0.0.1:{orthanc.http}/dicom-web"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    _check_results(orthanc, study_uid, files)


def test_results_for_a_pacs_that_is_down_are_kept_pending_and_delivered_when_it_is_back(tmp_path, orthanc, study,
                                                                                           tiny_bundle):
    study_uid, files = study
    assert _storescu(orthanc.dicom, "ORTHANC", files).returncode == 0
    orthanc.stop()
    out = tmp_path / "r" / "results.csv"
    run = subprocess.run([sys.executable, "-m", "ichbatch.cli", "run", str(files[0].parent), "--out", str(out),
                          "--model", str(tiny_bundle), "--tta", "1", "--send-to", f"ORTHANC@127.0.0.1:{orthanc.dicom}"],
                         capture_output=True, text=True)
    assert run.returncode == 1 and "not yet delivered" in run.stderr, run.stderr
    kept = sorted((tmp_path / "r" / "dicom").glob("*.dcm"))
    assert len(kept) >= 4  # SR, KOS, report and key images stay on disk
    status = subprocess.run([sys.executable, "-m", "ichbatch.cli", "status", str(out.parent)], capture_output=True, text=True)
    assert f"0 sent, {len(kept)} pending" in status.stdout and "association" in status.stdout, status.stdout
    orthanc.start()
    again = subprocess.run([sys.executable, "-m", "ichbatch.cli", "status", str(out.parent), "--retry"],
                           capture_output=True, text=True)
    assert f"retried: {len(kept)} sent, 0 not sent" in again.stdout, again.stdout + again.stderr
    assert f"{len(kept)} sent, 0 pending, 0 failed" in again.stdout
    _check_results(orthanc, study_uid, files)
