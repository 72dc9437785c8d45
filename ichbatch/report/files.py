"""Atomic writes and safe output names, shared by every writer."""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

from ..errors import OutputError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, fsync, then rename: readers never see half a file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"cannot write to {path.parent}: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"cannot write {path}: {exc.strerror}") from exc


def safe_stem(uid: str) -> str:
    """A file-name stem from a UID: digits and dots only; anything else is replaced by a hash."""
    cleaned = re.sub(r"[^0-9.]", "", uid).strip(".")
    if not cleaned or cleaned != uid.strip() or len(cleaned) > 64:
        return "h" + hashlib.sha256(uid.encode()).hexdigest()[:24]
    return cleaned
