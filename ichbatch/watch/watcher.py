"""Watch a PACS export folder: notice files, wait until each study is quiet and complete, process it
once, and remember everything in the ledger so a restart (or a crash) loses and repeats nothing.

Events come from watchdog's observer (or its polling observer for network shares, where events are
missed); a periodic rescan catches whatever events missed in any case.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..discover import examine, iter_files
from ..domain import FileIssue, InstanceRef, Status, StudyResult
from ..errors import DicomReadError, OutputError
from ..logs import outcome, study_tag
from ..net.deliver import DeliverySettings
from ..report.outputs import OutputSettings, OutputWriter
from ..series import choose_series, group_studies
from ..study import Engine, RunSettings, StudyPath
from .ledger import DONE, FAILED, Ledger

log = logging.getLogger(__name__)
LEDGER_NAME = "ichbatch-ledger.sqlite"
RESULTS_NAME = "results.csv"


class After(str, Enum):
    """What happens to a study's input files once its outputs are safely written."""

    LEAVE = "leave"
    MOVE = "move"
    DELETE = "delete"


AFTER_CHOICES = tuple(a.value for a in After)


@dataclass(frozen=True)
class WatchSettings:
    """Checked when built, so a script that builds one directly gets the same errors as the CLI."""

    incoming: Path
    out: Path
    run: RunSettings
    quiet_seconds: float = 30.0
    rescan_seconds: float = 10.0
    poll: bool = False
    max_attempts: int = 3
    backoff_seconds: float = 5.0
    after: After | str = After.LEAVE  # a str is turned into After when the settings are built
    archive: Path | None = None
    # With --after move/delete: how long a done study's inputs stay, so late slices join the study
    # and a new version is made from all of them, before the inputs go and the result is final.
    settle_seconds: float = 300.0
    dicom_out: Path | None = None
    log_uids: bool = False  # name studies by StudyInstanceUID in logs (off: a short hash)
    pseudonym_key: bytes | None = None
    delivery: DeliverySettings | None = None  # send the DICOM outputs (dicom_out) to the PACS

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "after", After(self.after))
        except ValueError:
            raise ValueError(f"after must be one of {list(AFTER_CHOICES)}. Received: {self.after!r}") from None
        if self.after == After.MOVE and self.archive is None:
            raise ValueError("after='move' needs an archive folder (--archive DIR)")
        if self.archive is not None and Path(self.archive).resolve().is_relative_to(Path(self.incoming).resolve()):
            # Its files would arrive again as new studies, again and again.
            raise ValueError(f"the archive folder {self.archive} is inside INCOMING; choose a folder outside it")
        for name in ("quiet_seconds", "backoff_seconds", "settle_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more. Received: {getattr(self, name)!r}")
        if self.rescan_seconds <= 0:
            raise ValueError(f"rescan_seconds must be more than 0. Received: {self.rescan_seconds!r}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1. Received: {self.max_attempts!r}")
        if self.delivery is not None and self.dicom_out is None:  # what is sent is written first
            object.__setattr__(self, "dicom_out", Path(self.out) / "dicom")

    @property
    def outputs(self) -> OutputSettings:
        # rebuild_seconds=0: a new version of a study (a late file) shows in the CSV at once; in watch
        # mode that is rare, unlike a batch re-run over a whole archive.
        return OutputSettings(csv=self.out / RESULTS_NAME, reports=self.out / "reports", dicom_out=self.dicom_out,
                              pseudonym_key=self.pseudonym_key, rebuild_seconds=0.0, delivery=self.delivery)


class Watcher:
    def __init__(self, settings: WatchSettings) -> None:
        self.settings = settings
        settings.out.mkdir(parents=True, exist_ok=True)
        self.writer = OutputWriter(settings.outputs)  # takes the output lock and cleans stale temp files
        try:
            self.engine = Engine(settings.run)
        except BaseException:
            self.writer.close()
            raise
        self.ledger = Ledger(settings.out / LEDGER_NAME)
        self.path = StudyPath(self.engine, self.writer)
        self.stop_event = threading.Event()
        self.wake = threading.Event()
        self._last_scan = 0.0
        self._interrupted: str | None = None  # a study whose outputs a storage failure stopped half-way
        self._trouble_since: float | None = None

    def run(self) -> None:
        """Until SIGINT/SIGTERM: scan, process what is ready, sleep until an event or the next rescan."""
        recovered = self.ledger.recover()
        if recovered:
            log.warning("%d study(ies) were in progress when the watcher stopped; processing them again", recovered)
        observer = self._start_observer()
        self._install_signals()
        try:
            while not self.stop_event.is_set():
                self.step()
                self.wake.wait(timeout=min(1.0, self.settings.quiet_seconds / 2 or 0.1))
        finally:
            if observer is not None:
                observer.stop()
                observer.join(timeout=5)
            self.close()

    def step(self) -> None:
        """One round: scan when due, process what is ready, tidy the CSV when idle. A full disk or an
        unwritable output is logged, waited out and retried: never fatal, never a study's fault."""
        try:
            self._release_interrupted()
            if self.wake.is_set() or time.time() - self._last_scan >= self.settings.rescan_seconds:
                self.wake.clear()
                self.scan()
                self._last_scan = time.time()
            if not self.process_ready():
                self._flush_outputs()  # idle: bring a replaced row into the CSV, the index up to date
                self.writer.deliver()  # and resend what a PACS refused earlier, when due
        except OutputError as exc:
            if self._trouble_since is None:
                self._trouble_since = time.time()
                log.error("outputs or ledger cannot be written (%s); waiting and retrying", exc)
            self.stop_event.wait(self.settings.backoff_seconds)
            return
        if self._trouble_since is not None:
            log.warning("outputs writable again after %.0f s; carrying on", time.time() - self._trouble_since)
            self._trouble_since = None

    def _release_interrupted(self) -> None:
        """Give back the attempt of a study that a storage failure interrupted, once the ledger can be written."""
        if self._interrupted is not None:
            self.ledger.retry_later(self._interrupted, 0.0, "outputs not written (storage)", count_attempt=False)
            self._interrupted = None

    def close(self) -> None:
        try:
            self.writer.close()
        except OutputError as exc:
            log.error("results could not be brought up to date on exit (%s); the store keeps them", exc)
        self.engine.close()
        self.ledger.close()

    def _flush_outputs(self) -> None:
        try:
            self.writer.flush()
        except OutputError as exc:
            log.error("results CSV not rewritten (%s); will retry", exc)

    def stop(self, *_: object) -> None:
        self.stop_event.set()
        self.wake.set()

    def _install_signals(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.stop)
            signal.signal(signal.SIGTERM, self.stop)

    def _start_observer(self):  # type: ignore[no-untyped-def]
        from watchdog.events import FileSystemEventHandler
        from watchdog.observers import Observer
        from watchdog.observers.polling import PollingObserver

        watcher = self

        class Wake(FileSystemEventHandler):
            def on_any_event(self, event) -> None:  # type: ignore[no-untyped-def]
                watcher.wake.set()

        observer = PollingObserver(timeout=2) if self.settings.poll else Observer()
        try:
            observer.schedule(Wake(), str(self.settings.incoming), recursive=True)
            observer.start()
        except OSError as exc:  # e.g. inotify limits: the periodic rescan still works
            log.warning("file events unavailable (%s); relying on rescans every %.0f s", exc, self.settings.rescan_seconds)
            return None
        return observer

    def scan(self) -> int:
        """Record new or changed files; returns how many."""
        changed = 0
        for path in iter_files([self.settings.incoming]):
            try:
                st = path.stat()
            except OSError:
                continue
            state = (st.st_size, st.st_mtime)
            if self.ledger.file_state(str(path)) == state:
                continue
            changed += 1
            seen = examine(path, (self.settings.incoming,))
            if isinstance(seen, FileIssue):
                # Maybe still being written: recorded with its size, so it is read again when it changes.
                self.ledger.record_file(str(path), None, *state, problem=seen.message)
                self._record_issue(seen)
            else:
                problem = self.ledger.record_file(str(path), seen.study_uid, *state)
                if problem:
                    log.warning("a file arrived for a study whose result is final; kept aside, not processed")
                    self._record_issue(FileIssue(str(path), Status.SKIPPED, problem))
                else:
                    self._forget_issue(str(path))
        return changed

    def _record_issue(self, issue: FileIssue) -> None:
        try:
            self.writer.record_file_issue(issue)
        except OutputError as exc:
            log.error("file issue not recorded (%s)", exc)

    def _forget_issue(self, path: str) -> None:
        try:
            self.writer.forget_file_issue(path)
        except OutputError as exc:
            log.error("file issue not cleared (%s)", exc)

    def process_ready(self) -> int:
        """Process every ready, complete study, then close the settled ones; returns how many were processed."""
        done = 0
        for study_uid in self.ledger.ready(self.settings.quiet_seconds):
            if self.stop_event.is_set():
                break
            if self._complete(study_uid):
                self.process(study_uid)
                done += 1
        self.close_settled()
        return done

    def close_settled(self) -> None:
        """--after move/delete: inputs go only when a done study has had no new file for settle_seconds."""
        if self.settings.after == After.LEAVE:
            return
        for study_uid in self.ledger.settled(self.settings.settle_seconds):
            self._dispose_inputs(study_uid)
            self.ledger.close_study(study_uid)

    def _complete(self, study_uid: str) -> bool:
        """Every file of the study still has the size and time it had when recorded."""
        for path, size, mtime in self.ledger.study_files(study_uid):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self.ledger.forget_file(path)
                continue
            if (st.st_size, st.st_mtime) != (size, mtime):
                self.scan()  # re-records it, which restarts the quiet period
                return False
        return True

    def process(self, study_uid: str) -> None:
        tag = study_tag(study_uid, self.settings.log_uids)
        attempt = self.ledger.start(study_uid)
        if attempt is None:
            return  # no longer pending (a file arrived, or another step took it)
        try:
            self._process_claimed(study_uid, tag, attempt)
        except OutputError:
            self._interrupted = study_uid  # the ledger could not record the outcome either
            raise

    def _process_claimed(self, study_uid: str, tag: str, attempt: int) -> None:
        if attempt > self.settings.max_attempts:
            # Attempts are counted when they start, so one that never ended (the process died on this
            # study) still counts: a study that kills the watcher cannot be retried forever.
            self.ledger.finish(study_uid, FAILED, f"quarantined: all {self.settings.max_attempts} attempts used, the "
                               "last one ended with the watcher stopping (crash, out of memory or kill)", "")
            log.error("%s: quarantined after %d attempts", tag, attempt - 1)
            return
        try:
            result = self._run_study(study_uid)
        except OutputError as exc:
            # Full disk or unwritable folder: not the study's fault, so retry without using up attempts.
            log.error("%s: outputs could not be written (%s); will retry", tag, exc)
            self.ledger.retry_later(study_uid, self._backoff(attempt), f"outputs not written: {exc}", count_attempt=False)
            return
        except Exception as exc:  # one study must never stop the watcher
            log.exception("%s: attempt %d failed", tag, attempt)
            self._failed_attempt(study_uid, attempt, f"{type(exc).__name__}: {exc}")
            return
        if result.status == Status.FAILED and attempt < self.settings.max_attempts:
            self._failed_attempt(study_uid, attempt, result.message)
            return
        status = FAILED if result.status == Status.FAILED else DONE
        self.ledger.finish(study_uid, status, f"{result.status.value}: {result.message}", result.report_pdf,
                           dispose=status == DONE and self.settings.after != After.LEAVE)
        log.info("%s: %s (attempt %d)", tag, outcome(result), attempt)

    def _run_study(self, study_uid: str) -> StudyResult:
        instances: list[InstanceRef] = []
        for path, _, _ in self.ledger.study_files(study_uid):
            seen = examine(Path(path), (self.settings.incoming,))
            if isinstance(seen, InstanceRef):
                instances.append(seen)
            elif Path(path).exists():
                self._record_issue(seen)
        series = group_studies(instances).get(study_uid)
        if not series:
            raise DicomReadError("no readable DICOM files left for this study")
        return self.path.process(choose_series(series, self.settings.run.rules))

    def _failed_attempt(self, study_uid: str, attempt: int, message: str) -> None:
        if attempt >= self.settings.max_attempts:
            self.ledger.finish(study_uid, FAILED, f"failed after {attempt} attempts: {message}", "")
            log.error("%s: failed after %d attempts", study_tag(study_uid, self.settings.log_uids), attempt)
        else:
            self.ledger.retry_later(study_uid, self._backoff(attempt), message)

    def _backoff(self, attempt: int) -> float:
        return min(self.settings.backoff_seconds * 2 ** max(attempt - 1, 0), 300.0)

    def _dispose_inputs(self, study_uid: str) -> None:
        if self.settings.after == After.LEAVE:
            return
        incoming = self.settings.incoming.resolve()
        tag = study_tag(study_uid, self.settings.log_uids)
        for path, _, _ in self.ledger.study_files(study_uid):
            src = Path(path)
            real = src.resolve()
            if not real.is_relative_to(incoming):
                # Reached through a link to somewhere else: that is someone's original, not our inbox.
                log.warning("%s: an input file lies outside INCOMING through a link; left in place", tag)
                continue
            try:
                if self.settings.after == After.MOVE:
                    assert self.settings.archive is not None
                    dest = _free_name(self.settings.archive / real.relative_to(incoming))
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.move(str(src), dest)
                else:
                    src.unlink()
                self.ledger.forget_file(path)
            except OSError as exc:
                log.warning("%s: could not %s an input file (%s)", tag, After(self.settings.after).value, exc.strerror)


def _free_name(dest: Path) -> Path:
    """dest, or dest with -1, -2 ... before its suffix: an archived file is never overwritten."""
    candidate, n = dest, 0
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = dest.with_name(f"{dest.stem}-{n}{dest.suffix}")
    return candidate

