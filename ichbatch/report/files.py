"""Atomic writes and safe output names, shared by every writer."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path

from ..errors import OutputError


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
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror}") from exc
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
            raise OutputError(f"cannot write {path}: {exc.strerror}") from exc
        raise


def safe_stem(uid: str) -> str:
    """A file-name stem from a UID: digits and dots only; anything else is replaced by a hash."""
    cleaned = re.sub(r"[^0-9.]", "", uid).strip(".")
    if not cleaned or cleaned != uid.strip() or len(cleaned) > 64:
        return "h" + hashlib.sha256(uid.encode()).hexdigest()[:24]
    return cleaned
