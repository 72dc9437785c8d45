"""The Ray engine scenarios of tests/test_ray.py, run only inside the loopback-only network namespace
that test makes (this file's name keeps pytest from collecting it on its own; run directly, it skips).

A real local Ray cluster (`ray start --head`, 2 CPUs, node IP 127.0.0.1, no dashboard, no usage stats)
runs `ichbatch run --engine ray` on generated studies and one study whose pixel data is broken.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pydicom
import pytest
from pypdf import PdfReader

from ichbatch.report.store import files_csv_path
from ichbatch.synth import synth_studies

from .conftest import LOOPBACK_ENV, free_port

if os.environ.get(LOOPBACK_ENV) != "1":
    pytest.skip("runs inside the loopback-only namespace that tests/test_ray.py makes", allow_module_level=True)
RAY = Path(sys.executable).with_name("ray")
TIMING = ("seconds", "report_pdf")  # how long a study took; where its report is (each run has its own folder)
N_STUDIES = 6


@pytest.fixture(scope="module")
def cluster():
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit in 107 bytes
    port = free_port()
    # Token authentication on, as Ray does by default for clusters from 2.61: the cluster and every
    # ichbatch driver run here get the token from the environment.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16), RAY_USAGE_STATS_ENABLED="0")
    head = subprocess.Popen([str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                             "--num-cpus=2", "--num-gpus=0", "--include-dashboard=false", "--disable-usage-stats",
                             f"--temp-dir={temp}"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        wait_for_port(port, head)
        yield f"127.0.0.1:{port}"
    finally:
        stop_cluster(head, temp)
        shutil.rmtree(temp, ignore_errors=True)


def wait_for_port(port: int, head: subprocess.Popen, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert head.poll() is None, head.stderr.read().decode()[-3000:] if head.stderr else "ray start exited"
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError(f"the Ray head did not listen on 127.0.0.1:{port} within {seconds} s")


def cluster_pids(temp: str) -> list[int]:
    """This cluster's processes: every Ray process names its session folder, under our temp dir."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if temp in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    pids.append(int(proc.name))
            except OSError:
                continue
    return pids


def stop_cluster(head: subprocess.Popen, temp: str) -> None:
    """By PID: the blocking `ray start` and its process group, then any process of this cluster's session."""
    for sig, wait in ((signal.SIGTERM, 20.0), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(head.pid, sig)
        for pid in cluster_pids(temp):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while (head.poll() is None or cluster_pids(temp)) and time.monotonic() < deadline:
            time.sleep(0.2)
    head.wait(timeout=10)
    assert not cluster_pids(temp), "Ray processes of the test cluster are still running"


@pytest.fixture(scope="module")
def studies(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("studies")
    synth_studies(root, N_STUDIES - 1, seed=5, n_slices=12, size=96)
    broken = root / "broken"
    synth_studies(broken, 1, seed=6, n_slices=12, size=96)
    for path in broken.glob("study_*/*"):  # headers fine, pixel data cut short: fails at decoding
        ds = pydicom.dcmread(path)
        ds.PixelData = ds.PixelData[:64]
        ds.save_as(path)
    # Files that are not instances, found by the header-reading tasks: skipped and failed in the files CSV.
    (root / "notes.txt").write_text("not DICOM")
    (root / "cut.dcm").write_bytes(next(root.glob("study_*/*")).read_bytes()[:300])
    return root


def ichbatch_run(studies: Path, out: Path, bundle: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "ichbatch.cli", "run", str(studies), "--out", str(out), "--model", str(bundle), *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc: subprocess.Popen, timeout: int = 600) -> str:
    """The run's messages; its exit status is 1, partial failure, for the broken study."""
    stdout, stderr = proc.communicate(timeout=timeout)
    assert proc.returncode == 1 and "1 failed" in stderr, stdout[-2000:] + stderr[-4000:]
    return stderr


def rows(csv_path: Path) -> list[dict[str, str]]:
    with csv_path.open(newline="") as f:
        return [{k: v for k, v in row.items() if k not in TIMING} for row in csv.DictReader(f)]


def file_rows(csv_path: Path) -> list[dict[str, str]]:
    """The files CSV beside the results (files not used, and why), in a fixed order."""
    with files_csv_path(csv_path).open(newline="") as f:
        return sorted(csv.DictReader(f), key=lambda row: row["path"])


@pytest.fixture(scope="module")
def local_run(studies, tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local") / "results.csv"
    finished(ichbatch_run(studies, out, tiny_bundle))
    return out


@pytest.fixture(scope="module")
def local_rows(local_run) -> list[dict[str, str]]:
    return rows(local_run)


# Groups of 4 and 2 (the default without GPUs is 4 a model call), and one study a call: the slices of a
# group's studies share the model's batches, and each study's file issues must still come back with it.
@pytest.mark.parametrize("per_call", [None, 1])
def test_ray_engine_writes_the_local_engines_csv_row_for_row_and_the_reports(cluster, studies, tiny_bundle,
                                                                               local_run, local_rows, tmp_path,
                                                                               per_call):
    out = tmp_path / "results.csv"
    grouped = ("--studies-per-call", str(per_call)) if per_call else ()
    stderr = finished(ichbatch_run(studies, out, tiny_bundle, "--engine", "ray", "--address", cluster, "-v", *grouped))
    files = sum(1 for path in studies.rglob("*") if path.is_file())
    assert f"the headers of {files} files read in 1 task(s)" in stderr, stderr[-3000:]  # not on the driver
    assert f"{per_call or 4} studies per model call" in stderr
    got = rows(out)
    assert got == local_rows
    assert file_rows(out) == file_rows(local_run), stderr[-2000:]
    assert {row["status"] for row in file_rows(out)} == {"skipped", "failed"}  # the two files, the broken slices
    statuses = sorted(row["status"] for row in got)
    assert statuses == ["failed"] + ["ok"] * (N_STUDIES - 1)
    failed = next(row for row in got if row["status"] == "failed")
    assert "could not be decoded" in failed["message"]
    with (tmp_path / "results.csv").open(newline="") as f:
        pdfs = [Path(row["report_pdf"]) for row in csv.DictReader(f) if row["status"] == "ok"]
    assert len(pdfs) == N_STUDIES - 1
    for pdf in pdfs:
        text = "".join(page.extract_text() for page in PdfReader(pdf).pages)
        assert "tiny" in text and "NOT FOR DIAGNOSIS" in text.upper()


def busy_scorer() -> int | None:
    """The process of a model replica (Ray actor) while it is scoring a study."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            title = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if title.startswith("ray::StudyScorer.score"):
            return int(proc.name)
    return None


def test_a_worker_killed_mid_run_leaves_every_study_with_exactly_one_row(cluster, studies, tiny_bundle, local_rows,
                                                                          tmp_path):
    """In groups of three studies a call: the killed replica's whole group is redone."""
    out = tmp_path / "results.csv"
    proc = ichbatch_run(studies, out, tiny_bundle, "--engine", "ray", "--address", cluster, "--studies-per-call", "3")
    killed = None
    deadline = time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        killed = busy_scorer()
        time.sleep(0.02)
    assert killed is not None, "no model replica was seen scoring a study"
    os.kill(killed, signal.SIGKILL)
    finished(proc)
    got = rows(out)
    assert len(got) == N_STUDIES and len({row["study_uid"] for row in got}) == N_STUDIES
    assert got == local_rows  # the study under the killed worker was redone, with the same result


def test_a_header_task_whose_worker_dies_fails_only_the_file_that_killed_it(cluster, studies):
    """Headers are read in Ray tasks of many files. One file that kills its worker (here on purpose)
    fails that task for good; its files are then read one a task, and only that file is recorded."""
    import ray

    from ichbatch.discover import examine, iter_files
    from ichbatch.distributed import header_reader
    from ichbatch.domain import FileIssue

    def examine_or_die(paths, roots):  # defined here, so Ray ships it by value to its workers
        import os as worker_os

        from ichbatch.discover import examine as worker_examine

        if any(path.name == "cut.dcm" for path in paths):
            worker_os._exit(3)
        return [worker_examine(path, roots) for path in paths]

    ray.init(address=cluster, log_to_driver=False, configure_logging=False,
             _node_ip_address="127.0.0.1")
    try:
        files = list(iter_files([studies]))
        seen = list(header_reader(ray, 0, examine_or_die)(iter(files), [studies]))
    finally:
        ray.shutdown()
    assert len(seen) == len(files) > 2
    lost = [s for s in seen if isinstance(s, FileIssue) and "could not be read on a Ray worker" in s.message]
    assert [issue.path for issue in lost] == [str(studies / "cut.dcm")]
    for path, got in zip(files, seen):
        if path.name != "cut.dcm":
            assert got == examine(path, [studies])


def test_a_study_whose_decoding_kills_its_worker_fails_alone_in_its_group(cluster, studies, tiny_bundle, tmp_path,
                                                                          monkeypatch):
    """The driver in this process, with a decoding task that kills its worker on one study (on purpose)
    and no retries: that study is recorded as failed with the reason, and the other studies of its
    model call are scored."""
    import ray

    import ichbatch.distributed as distributed
    from ichbatch.report.outputs import OutputSettings, OutputWriter
    from ichbatch.study import RunSettings

    original = distributed.decode_study
    doomed = str(pydicom.dcmread(sorted(studies.glob("study_*/*"))[0], stop_before_pixels=True).StudyInstanceUID)

    def decode_or_die(choice, size):  # defined here, so Ray ships it by value; `original` goes by name
        import os as worker_os

        if choice.study.study_uid == doomed:
            worker_os._exit(3)
        return original(choice, size)

    monkeypatch.setattr(distributed, "decode_study", decode_or_die)
    out = tmp_path / "results.csv"
    try:
        with OutputWriter(OutputSettings(csv=out, reports=tmp_path / "reports")) as writer:
            one_call = distributed.RaySettings(address=cluster, attempts=1, group=N_STUDIES)
            summary = distributed.process_folder_ray([studies], RunSettings(model=str(tiny_bundle), tta=1), one_call,
                                                     sink=writer)
    finally:
        ray.shutdown()
    got = {row["study_uid"]: row for row in rows(out)}
    assert len(got) == N_STUDIES and summary.studies == N_STUDIES
    assert got[doomed]["status"] == "failed"
    assert got[doomed]["message"].startswith("failed on a Ray worker while decoding"), got[doomed]["message"]
    others = sorted(row["status"] for uid, row in got.items() if uid != doomed)
    assert others == ["failed"] + ["ok"] * (N_STUDIES - 2)  # the study with broken pixel data, as before
