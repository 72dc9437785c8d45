"""Logging for people and for servers: ISO timestamps and levels, text or JSON lines, an optional file,
and library noise kept out unless asked for (-vv).

Log lines never carry patient identifiers: studies are named by study_tag(), a short hash of the UID,
unless the user asks for UIDs. Library warnings (pydicom's quote non-conformant UIDs) go through
logging and are shown only at -vv.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .domain import StudyResult

LIBRARIES = ("tensorflow", "absl", "keras", "jax", "pydicom", "h5py", "matplotlib", "PIL", "py.warnings")
_handlers: list[logging.Handler] = []


def study_tag(study_uid: str, log_uids: bool = False) -> str:
    """How logs name a study: by default a short hash, so UIDs (and so patients) are not traceable."""
    if log_uids:
        return study_uid
    return "study-" + hashlib.sha256(study_uid.encode()).hexdigest()[:10]


def outcome(result: StudyResult) -> str:
    """A study's outcome for a log line, without identifiers: 'ok, any FLAGGED', 'skipped', ..."""
    flag = result.flags.get("any")
    text = result.status.value
    if flag is not None and result.status.value == "ok":
        text += ", any FLAGGED" if flag else ", any not flagged"
    return text


class IsoFormatter(logging.Formatter):
    """2026-11-25T14:03:07.123+00:00 INFO ichbatch.pipeline: message"""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return dt.datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds")

    def format(self, record: logging.LogRecord) -> str:
        text = f"{self.formatTime(record)} {record.levelname} {record.name}: {record.getMessage()}"
        return text + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


class JsonFormatter(IsoFormatter):
    """One JSON object per line, for log collectors on servers."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class LibraryFilter(logging.Filter):
    """Below -vv, only our own records and other libraries' errors pass. A filter on our handlers, not a
    level on the libraries' loggers: pydicom sets its logger's level again when it is imported."""

    def __init__(self, verbosity: int) -> None:
        super().__init__()
        self.verbosity = verbosity

    def filter(self, record: logging.LogRecord) -> bool:
        return self.verbosity >= 2 or record.name.startswith("ichbatch") or record.levelno >= logging.ERROR


def configure(verbosity: int = 0, log_file: Path | None = None, fmt: str = "text") -> None:
    """0: warnings and errors; 1 (-v): each stage; 2 (-vv): debug, and the libraries' own messages."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json. Received: {fmt!r}")
    root = logging.getLogger()
    for handler in _handlers:
        root.removeHandler(handler)
        handler.close()
    _handlers.clear()
    formatter = JsonFormatter() if fmt == "json" else IsoFormatter()
    handlers: list[logging.Handler] = [logging.StreamHandler()]
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_file, encoding="utf-8"))
    for handler in handlers:
        handler.setFormatter(formatter)
        handler.addFilter(LibraryFilter(verbosity))
        root.addHandler(handler)
        _handlers.append(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("ichbatch").setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG))
    logging.captureWarnings(True)
    for name in LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    # TensorFlow's C++ messages at import; set before the backend is first imported.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "0" if verbosity >= 2 else "3")


def library_noise_wanted() -> bool:
    return logging.getLogger("tensorflow").getEffectiveLevel() <= logging.DEBUG


@contextlib.contextmanager
def quiet_stderr(enabled: bool = True) -> Iterator[None]:
    """Silence file descriptor 2 for a moment: TensorFlow 2.21 writes absl and oneDNN notices there at
    import, before any setting can stop them. Our own log handlers write through sys.stderr, which is
    flushed first, so nothing of ours is lost."""
    if not enabled:
        yield
        return
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
