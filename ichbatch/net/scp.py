"""`ichbatch listen`: a DICOM storage SCP (pynetdicom) that spools CT images for the watch machinery.

Accepted: CT, Enhanced CT and Legacy Converted Enhanced CT images in any transfer syntax, and
Verification (C-ECHO). With an allow list, an association from any other calling AE title is rejected
before anything is sent. Each instance is written in full to a staging folder and renamed into
`spool/<study>/<SOP Instance UID>.dcm` (names from sanitised UIDs), so the watcher never sees half a
file; the C-STORE succeeds only after the rename. The spool is an ordinary watch folder: the ledger
decides when a study is complete (its quiet period) and processes it once, through restarts.

Associations are logged with calling AE title, address and instance count: no patient data.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..report.files import safe_stem

log = logging.getLogger(__name__)
CT_STORAGE = ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.2.1", "1.2.840.10008.5.1.4.1.1.2.2")
SUCCESS, OUT_OF_RESOURCES, CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000


@dataclass(frozen=True)
class ListenSettings:
    spool: Path
    port: int = 11112
    ae_title: str = "ICHBATCH"
    bind: str = "127.0.0.1"
    allowed: tuple[str, ...] = ()  # calling AE titles; empty: any
    timeout_seconds: float = 30.0  # ACSE, DIMSE and network (idle) timeouts
    max_associations: int = 10

    def __post_init__(self) -> None:
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise ValueError(f"an AE title has 1 to 16 characters. Received: {self.ae_title!r}")
        for aet in self.allowed:
            if not 0 < len(aet.strip()) <= 16:
                raise ValueError(f"--allow takes AE titles of 1 to 16 characters. Received: {aet!r}")
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1 to 65535. Received: {self.port}")


class StorageSCP:
    """Start with start(), stop with stop(); received files appear in settings.spool."""

    def __init__(self, settings: ListenSettings) -> None:
        self.settings = settings
        self.staging = settings.spool.parent / f".{settings.spool.name}-receiving"
        self.server: Any = None
        self.received = 0
        self._lock = threading.Lock()
        self._counts: dict[int, int] = {}

    def start(self) -> None:
        from pynetdicom import ALL_TRANSFER_SYNTAXES, AE, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        s = self.settings
        s.spool.mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        for stale in self.staging.glob("*.tmp"):  # a transfer that a crash cut off; the sender will resend
            stale.unlink(missing_ok=True)
        ae = AE(ae_title=s.ae_title)
        for sop_class in CT_STORAGE:
            ae.add_supported_context(sop_class, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.require_called_aet = True
        if s.allowed:
            ae.require_calling_aet = [a.strip() for a in s.allowed]
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = s.timeout_seconds
        ae.maximum_associations = s.max_associations
        handlers: list[Any] = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, lambda event: SUCCESS),
                    (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_RELEASED, self._on_closed), (evt.EVT_ABORTED, self._on_closed)]
        self.server = ae.start_server((s.bind, s.port), block=False, evt_handlers=handlers)
        log.info("listening as %s on %s:%d%s", s.ae_title, s.bind, s.port,
                 f" for {', '.join(s.allowed)}" if s.allowed else " for any calling AE title")

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def _on_accepted(self, event: Any) -> None:
        with self._lock:
            self._counts[id(event.assoc)] = 0
        log.info("association from %s at %s:%s accepted", _calling(event), *event.assoc.requestor.address_info)

    def _on_rejected(self, event: Any) -> None:
        log.warning("association from %s at %s:%s rejected (calling AE title not allowed or called AE title wrong)",
                    _calling(event), *event.assoc.requestor.address_info)

    def _on_closed(self, event: Any) -> None:
        with self._lock:
            n = self._counts.pop(id(event.assoc), None)
        if n is not None:
            log.info("association from %s closed: %d instance(s) received", _calling(event), n)

    def _on_store(self, event: Any) -> int:
        try:
            data = event.encoded_dataset()  # the bytes as sent, with a File Meta header: nothing re-encoded
            ds = event.dataset
            study, sop = str(ds.StudyInstanceUID), str(event.request.AffectedSOPInstanceUID)
        except Exception as exc:
            log.warning("C-STORE from %s not understood (%s)", _calling(event), type(exc).__name__)
            return CANNOT_UNDERSTAND
        try:
            self._write(study, sop, data)
        except OSError as exc:
            log.error("C-STORE from %s not written (%s); the sender may retry", _calling(event), exc.strerror)
            return OUT_OF_RESOURCES
        with self._lock:
            self.received += 1
            self._counts[id(event.assoc)] = self._counts.get(id(event.assoc), 0) + 1
        return SUCCESS

    def _write(self, study: str, sop: str, data: bytes) -> None:
        folder = self.settings.spool / safe_stem(study)
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=self.staging)
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, folder / f"{safe_stem(sop)}.dcm")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _calling(event: Any) -> str:
    return str(event.assoc.requestor.ae_title).strip() or "?"


def allowed_list(values: Iterable[str]) -> tuple[str, ...]:
    """--allow may be given several times or as a comma-separated list."""
    return tuple(a.strip() for v in values for a in v.split(",") if a.strip())
