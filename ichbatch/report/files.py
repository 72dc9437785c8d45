"""Atomic writes and safe output names, shared by every writer."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import re
import socket
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import DiskFullError, OutputError, OutputLockedError


_UMASK_LOCK = threading.Lock()


def file_mode() -> int:
    """The mode open() would give a new file (0644 under the usual umask 022). mkstemp's 0600 would hide
    outputs from a PACS gateway or a colleague in the same group."""
    with _UMASK_LOCK:  # the only way to read the umask is to set it; keep that step unobserved
        mask = os.umask(0o077)
        os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    atomic_write_chunks(path, [data])


def atomic_write_chunks(path: Path, chunks: Iterable[bytes]) -> None:
    """atomic_write_bytes for output too large to hold in memory at once (streamed in chunks)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise output_error(f"cannot write to {path.parent}", exc) from exc
    try:
        os.fchmod(fd, file_mode())
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise output_error(f"cannot write {path}", exc) from exc
        raise


def output_error(what: str, exc: OSError) -> OutputError:
    """A full disk or quota is DiskFullError (wait and retry); any other failure is OutputError."""
    kind = DiskFullError if exc.errno in (errno.ENOSPC, errno.EDQUOT) else OutputError
    return kind(f"{what}: {exc.strerror}")


def safe_stem(uid: str) -> str:
    """A file-name stem from a UID: digits and dots only; anything else is replaced by a hash."""
    cleaned = re.sub(r"[^0-9.]", "", uid).strip(".")
    if not cleaned or cleaned != uid.strip() or len(cleaned) > 64:
        return "h" + hashlib.sha256(uid.encode()).hexdigest()[:24]
    return cleaned


class OutputLock:
    """One writer per results CSV: a second run or watcher on the same outputs is refused, never
    interleaved. An flock on '<csv stem>.lock' beside the CSV, released when the process ends however it
    ends (flock does not work reliably on some network file systems)."""

    def __init__(self, csv_path: Path) -> None:
        self.path = Path(csv_path).with_name(Path(csv_path).stem + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.fh = open(self.path, "a+", encoding="utf-8")
        except OSError as exc:
            raise output_error(f"cannot create the lock file {self.path}", exc) from exc
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.fh.seek(0)
            holder = self.fh.read().strip() or "another process"
            self.fh.close()
            raise OutputLockedError(f"{csv_path} is being written by another ichbatch process ({holder}); wait for "
                                    "it to finish, stop it, or choose another output") from None
        try:
            self.fh.seek(0)
            self.fh.truncate()
            self.fh.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            self.fh.flush()
        except OSError as exc:
            self.release()
            raise output_error(f"cannot write the lock file {self.path}", exc) from exc

    def release(self) -> None:
        if not self.fh.closed:
            fcntl.flock(self.fh, fcntl.LOCK_UN)
            try:
                self.fh.close()
            except OSError:
                pass  # a pid line that could not be flushed (full disk) is no reason to fail a release


def remove_stale_temp_files(folder: Path | None, prefixes: Iterable[str]) -> int:
    """Temp files of atomic writes that a killed process left behind (only ours: '.<name>.*.tmp')."""
    if folder is None or not Path(folder).is_dir():
        return 0
    removed = 0
    for prefix in prefixes:
        for tmp in Path(folder).glob(f".{prefix}*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
