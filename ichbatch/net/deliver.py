"""Sending results to the PACS: DICOM C-STORE (pynetdicom) or DICOMweb STOW-RS (dicomweb-client).

Every DICOM output of a study is queued, per destination, in a small SQLite table beside the results
(`<csv stem>_deliveries.sqlite`) before anything is sent, so nothing is lost when the PACS is down or
ichbatch stops: a failed send stays pending with its error and is retried with exponential backoff by
later rounds of the same run, by `watch`/`listen`, by the next run on the same output, or by
`ichbatch status DIR --retry`. After `max_attempts` a delivery is marked failed (kept, listed, and
retried only when asked). The files themselves are never removed by delivery.
"""

from __future__ import annotations

import logging
import re
import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)
PENDING, SENT, FAILED = "pending", "sent", "failed"
MAX_BACKOFF_S = 600.0
_SEND_TO = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[A-Za-z0-9.\-\[\]:]+):(?P<port>\d{1,5})$")


@dataclass(frozen=True)
class Destination:
    """A C-STORE SCP (AET@HOST:PORT) or a STOW-RS URL."""

    ae_title: str = ""
    host: str = ""
    port: int = 0
    url: str = ""

    @classmethod
    def dimse(cls, text: str) -> Destination:
        match = _SEND_TO.match(text.strip())
        if not match or not 0 < int(match["port"]) < 65536 or not match["aet"].strip():
            raise ValueError(f"--send-to takes AET@HOST:PORT (an AE title of up to 16 characters). Received: {text!r}")
        return cls(ae_title=match["aet"].strip(), host=match["host"], port=int(match["port"]))

    @classmethod
    def stow(cls, url: str) -> Destination:
        if not re.match(r"^https?://", url):
            raise ValueError(f"--stow-url takes an http:// or https:// URL of a DICOMweb service. Received: {url!r}")
        return cls(url=url.rstrip("/"))

    @classmethod
    def from_label(cls, label: str) -> Destination:
        """The destination a queue row names (its label)."""
        return cls.stow(label) if label.startswith(("http://", "https://")) else cls.dimse(label)

    @property
    def label(self) -> str:
        return self.url or f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class DeliverySettings:
    destinations: tuple[Destination, ...]
    calling_aet: str = "ICHBATCH"
    max_attempts: int = 10
    backoff_seconds: float = 5.0
    timeout_seconds: float = 30.0


class Deliveries:
    """The delivery queue of one output folder."""

    def __init__(self, db: Path, settings: DeliverySettings) -> None:
        self.settings = settings
        self.db = sqlite3.connect(str(db), timeout=30)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("""CREATE TABLE IF NOT EXISTS deliveries (
            path TEXT NOT NULL, destination TEXT NOT NULL, study_uid TEXT NOT NULL, state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0, next_try REAL NOT NULL DEFAULT 0, last_error TEXT NOT NULL DEFAULT '',
            updated REAL NOT NULL, PRIMARY KEY (path, destination))""")
        self.db.execute("CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_try)")
        self.db.commit()

    def close(self) -> None:
        self.db.close()

    def enqueue(self, study_uid: str, paths: Iterable[str | Path]) -> None:
        """Queue files for every destination; a file queued again (a new version) is sent again."""
        now = time.time()
        with self.db:
            for path in paths:
                for dest in self.settings.destinations:
                    self.db.execute(
                        "INSERT INTO deliveries (path, destination, study_uid, state, updated) VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT (path, destination) DO UPDATE SET state = ?, attempts = 0, next_try = 0, "
                        "last_error = '', updated = ?",
                        (str(path), dest.label, study_uid, PENDING, now, PENDING, now))

    def retry_now(self) -> int:
        """Make every undelivered file due now; failed ones get their attempts back."""
        with self.db:
            self.db.execute("UPDATE deliveries SET attempts = 0 WHERE state = ?", (FAILED,))
            return self.db.execute("UPDATE deliveries SET state = ?, next_try = 0 WHERE state != ?",
                                   (PENDING, SENT)).rowcount

    def deliver_due(self) -> tuple[int, int]:
        """Send what is due, one association or request batch per destination; returns (sent, not sent)."""
        sent = unsent = 0
        now = time.time()
        for dest in self.settings.destinations:
            rows = self.db.execute("SELECT path, attempts FROM deliveries WHERE destination = ? AND state = ? "
                                   "AND next_try <= ? ORDER BY updated, path", (dest.label, PENDING, now)).fetchall()
            if not rows:
                continue
            results = self._send(dest, [Path(p) for p, _ in rows])
            with self.db:
                for (path, attempts), error in zip(rows, results):
                    if error is None:
                        sent += 1
                        self.db.execute("UPDATE deliveries SET state = ?, attempts = ?, last_error = '', updated = ? "
                                        "WHERE path = ? AND destination = ?", (SENT, attempts + 1, time.time(), path, dest.label))
                    else:
                        unsent += 1
                        self._failed_attempt(path, dest, attempts + 1, error)
            if sent or unsent:
                log.info("deliveries to %s: %d sent, %d not sent", dest.label, sent, unsent)
        return sent, unsent

    def _failed_attempt(self, path: str, dest: Destination, attempts: int, error: str) -> None:
        final = attempts >= self.settings.max_attempts
        wait = min(self.settings.backoff_seconds * 2 ** (attempts - 1), MAX_BACKOFF_S)
        self.db.execute("UPDATE deliveries SET state = ?, attempts = ?, next_try = ?, last_error = ?, updated = ? "
                        "WHERE path = ? AND destination = ?",
                        (FAILED if final else PENDING, attempts, time.time() + wait, error[:500], time.time(), path,
                         dest.label))
        if final:
            log.error("giving up sending %s to %s after %d attempts: %s", Path(path).name, dest.label, attempts, error)

    def _send(self, dest: Destination, paths: list[Path]) -> list[str | None]:
        """One error message (None: sent) per file; never raises."""
        try:
            return _stow(dest, paths, self.settings) if dest.url else _c_store(dest, paths, self.settings)
        except Exception as exc:  # a library or network failure is every file's failure, kept for later
            return [f"{type(exc).__name__}: {exc}"] * len(paths)

    def counts(self) -> dict[tuple[str, str], int]:
        """(destination, state) -> number of files."""
        rows = self.db.execute("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY destination, state")
        return {(d, s): n for d, s, n in rows}

    def unsent(self, limit: int = 1000) -> list[tuple[str, str, str, str, int, str]]:
        """(destination, state, study, path, attempts, last error) of every file not yet delivered."""
        return self.db.execute("SELECT destination, state, study_uid, path, attempts, last_error FROM deliveries "
                               "WHERE state != ? "
                               "ORDER BY destination, state, path LIMIT ?", (SENT, limit)).fetchall()

    def pending(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM deliveries WHERE state = ?", (PENDING,)).fetchone()[0])


def _read(paths: list[Path]):  # type: ignore[no-untyped-def]
    import pydicom

    return [pydicom.dcmread(p) for p in paths]


def _c_store(dest: Destination, paths: list[Path], settings: DeliverySettings) -> list[str | None]:
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    datasets = _read(paths)
    ae = AE(ae_title=settings.calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = settings.timeout_seconds
    ae.connection_timeout = min(settings.timeout_seconds, 10.0)
    for sop_class in sorted({str(ds.SOPClassUID) for ds in datasets}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "not established (refused, timed out or aborted)"
        return [f"association with {dest.label} {why}"] * len(paths)
    out: list[str | None] = []
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            out.append(None if code is not None and (code == 0 or 0xB000 <= code <= 0xBFFF)
                       else f"C-STORE status {code if code is None else hex(code)}")
    finally:
        assoc.release() if assoc.is_established else None
    return out


def _stow(dest: Destination, paths: list[Path], settings: DeliverySettings) -> list[str | None]:
    from dicomweb_client.api import DICOMwebClient

    import functools

    import requests

    session = requests.Session()
    session.request = functools.partial(session.request, timeout=settings.timeout_seconds)  # type: ignore[method-assign]
    client = DICOMwebClient(url=dest.url, session=session)
    client.set_http_retry_params(retry=False)  # retries are the queue's, with its backoff
    out: list[str | None] = []
    for ds in _read(paths):
        try:
            client.store_instances([ds])
            out.append(None)
        except Exception as exc:
            out.append(f"STOW-RS: {type(exc).__name__}: {exc}")
    return out
