"""The results store: SQLite beside the results CSV, where each study's result is committed once.

One transaction per study holds its CSV row, its output paths and its per-slice scores. The CSVs are
views of the store: a new study's row is appended (the file is never rewritten for it, so the cost of a
study does not grow with the archive); a study processed again replaces its row in the store, and the
CSV is then rebuilt from the store, at most every `rebuild_seconds` and when the run ends. On open, a
CSV that does not match what the store recorded (a crash between commit and append) is rebuilt.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import DiskFullError, ExistingFileError, OutputError
from .files import atomic_write_chunks, output_error

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE, status TEXT NOT NULL,
    instances_digest TEXT NOT NULL, model TEXT NOT NULL, row TEXT NOT NULL, outputs TEXT NOT NULL,
    run_id TEXT NOT NULL, finished_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS studies_status ON studies(status);
CREATE TABLE IF NOT EXISTS slices (
    study_uid TEXT NOT NULL, idx INTEGER NOT NULL, row TEXT NOT NULL, PRIMARY KEY (study_uid, idx)
);
CREATE TABLE IF NOT EXISTS files (path TEXT PRIMARY KEY, seq INTEGER NOT NULL, row TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS mirrors (name TEXT PRIMARY KEY, size INTEGER NOT NULL, dirty INTEGER NOT NULL);
"""
FILE_COLUMNS: tuple[str, ...] = ("path", "status", "message")
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, named in the module only from Python 3.11


@dataclass(frozen=True)
class StudyEntry:
    """What one study's commit holds: its CSV row, what it was made from and of, and its slices' rows."""

    row: dict[str, str]
    instances_digest: str
    model: str
    outputs: tuple[str, ...]
    run_id: str
    slices: tuple[dict[str, str], ...] = ()


@dataclass(frozen=True)
class StoredStudy:
    study_uid: str
    seq: int
    status: str
    instances_digest: str
    model: str
    row: dict[str, str]
    outputs: tuple[str, ...]
    run_id: str
    finished_at: float


def store_path(csv_path: Path) -> Path:
    return Path(csv_path).with_name(Path(csv_path).stem + ".ichbatch.sqlite")


def files_csv_path(csv_path: Path) -> Path:
    return Path(csv_path).with_name(Path(csv_path).stem + "_files.csv")


def csv_text(columns: Sequence[str], rows: Iterable[dict[str, str]], header: bool = True) -> str:
    """Every field quoted when it holds a delimiter, quote or line break, so each row stays one row."""
    return b"".join(csv_chunks(columns, rows, header)).decode("utf-8")


def csv_chunks(columns: Sequence[str], rows: Iterable[dict[str, str]], header: bool = True,
               per_chunk: int = 2000) -> Iterator[bytes]:
    """The same CSV in UTF-8 chunks of a few thousand rows: memory stays flat for any table size."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    if header:
        writer.writerow(columns)
    for n, row in enumerate(rows, 1):
        writer.writerow([row.get(c, "") for c in columns])
        if n % per_chunk == 0:
            yield buf.getvalue().encode("utf-8")
            buf.seek(0)
            buf.truncate()
    yield buf.getvalue().encode("utf-8")


class CsvMirror:
    """A CSV that shows a table of the store: appended row by row, rebuilt whole only when it must be."""

    def __init__(self, store: ResultsStore, name: str, path: Path, columns: Sequence[str]) -> None:
        self.store, self.name, self.path, self.columns = store, name, Path(path), tuple(columns)
        self.last_rebuild = 0.0

    def recorded(self) -> tuple[int, bool] | None:
        row = self.store.db.execute("SELECT size, dirty FROM mirrors WHERE name=?", (self.name,)).fetchone()
        return (int(row[0]), bool(row[1])) if row else None

    def _record(self, size: int, dirty: bool) -> None:
        with self.store.transaction():
            self.store.db.execute("INSERT INTO mirrors(name, size, dirty) VALUES(?,?,?) ON CONFLICT(name) DO "
                                  "UPDATE SET size=excluded.size, dirty=excluded.dirty", (self.name, size, int(dirty)))

    def in_sync(self) -> bool:
        rec = self.recorded()
        if rec is None or rec[1]:
            return False
        try:
            return self.path.stat().st_size == rec[0]
        except FileNotFoundError:
            return False

    def append(self, rows: Sequence[dict[str, str]]) -> None:
        if not self.in_sync():
            self.rebuild()  # the rebuild already holds the committed rows
            return
        data = csv_text(self.columns, rows, header=False).encode("utf-8")
        try:
            with open(self.path, "ab") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
                size = fh.tell()
        except OSError as exc:
            self._record(-1, True)  # whatever reached the file, the next write rebuilds it
            raise output_error(f"cannot append to {self.path}", exc) from exc
        self._record(size, False)

    def mark_dirty(self) -> None:
        rec = self.recorded()
        self._record(rec[0] if rec else -1, True)

    def rebuild(self) -> None:
        """Rewrite the whole CSV from the store, atomically."""
        atomic_write_chunks(self.path, csv_chunks(self.columns, self.store.rows(self.name)))
        self._record(self.path.stat().st_size, False)
        self.last_rebuild = time.monotonic()


class ResultsStore:
    """The results of every study under one results CSV, and the files that were not used."""

    def __init__(self, csv_path: Path, columns: Sequence[str], rebuild_seconds: float = 30.0) -> None:
        self.csv_path = Path(csv_path)
        self.path = store_path(self.csv_path)
        self.rebuild_seconds = rebuild_seconds
        _refuse_foreign(self.csv_path, columns, self.path.exists())
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.db = sqlite3.connect(str(self.path), timeout=60, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
        except sqlite3.Error as exc:
            raise OutputError(f"cannot open the results store {self.path}: {exc}") from exc
        # Studies by status, counted once and then kept here: the index shows them after every study, and
        # counting in SQLite scans every study. Exact, since this process is the only writer (OutputLock).
        self._by_status: Counter[str] | None = None
        self.studies = CsvMirror(self, "studies", self.csv_path, columns)
        self.files = CsvMirror(self, "files", files_csv_path(self.csv_path), FILE_COLUMNS)
        self._import_legacy_csv(columns)
        for mirror in (self.studies, self.files):
            if not mirror.in_sync() or _header(mirror.path) != list(mirror.columns):  # a newer schema: rewrite
                mirror.rebuild()

    def close(self) -> None:
        self.flush()
        self.db.close()

    def __enter__(self) -> ResultsStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def transaction(self) -> Transaction:
        return Transaction(self.db)

    # -- studies ---------------------------------------------------------------------------------
    def put_studies(self, entries: Sequence[StudyEntry]) -> None:
        """Commit studies together: one transaction, then their new rows appended to the CSV in one write.
        Each commit waits for the disk (the transaction's sync, the CSV's fsync, the CSV's recorded size),
        about 1.3 ms a study; studies that are ready at the same time share those waits. All or none."""
        if not entries:
            return
        by_status = self._status_counts()
        olds: list[str | None] = []
        with self.transaction():
            for e in entries:
                olds.append(self._put(e))
        new_rows = []
        for e, old in zip(entries, olds):
            if old is not None:
                by_status[old] -= 1
            else:
                new_rows.append(e.row)
            by_status[e.row["status"]] += 1
        self._show(self.studies, new_rows, replaced=len(new_rows) < len(entries))

    def _put(self, e: StudyEntry) -> str | None:
        """One study's rows, inside the caller's transaction; the status it replaced, None when new."""
        uid = e.row["study_uid"]
        old = self.db.execute("SELECT seq, status FROM studies WHERE study_uid=?", (uid,)).fetchone()
        seq = old[0] if old else self._next_seq("studies")
        self.db.execute(
            "INSERT OR REPLACE INTO studies VALUES(?,?,?,?,?,?,?,?,?)",
            (uid, seq, e.row["status"], e.instances_digest, e.model, json.dumps(e.row), json.dumps(list(e.outputs)),
             e.run_id, time.time()),
        )
        self.db.execute("DELETE FROM slices WHERE study_uid=?", (uid,))
        self.db.executemany("INSERT INTO slices VALUES(?,?,?)", [(uid, k, json.dumps(s)) for k, s in enumerate(e.slices)])
        return str(old[1]) if old else None

    def study(self, study_uid: str) -> StoredStudy | None:
        row = self.db.execute("SELECT * FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return _stored(row) if row else None

    def is_complete(self, study_uid: str, instances_digest: str, model: str) -> bool:
        """Same study, same set of instances, same model: its result needs no second run."""
        row = self.db.execute("SELECT instances_digest, model FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return bool(row) and row[0] == instances_digest and row[1] == model and bool(instances_digest)

    def count(self, status: str | None = None) -> int:
        by_status = self._status_counts()
        return sum(by_status.values()) if status is None else by_status[status]

    def counts(self) -> dict[str, int]:
        """Studies by status (the index page shows them after every study)."""
        return {status: n for status, n in self._status_counts().items() if n}

    def _status_counts(self) -> Counter[str]:
        if self._by_status is None:
            self._by_status = Counter(dict(self.db.execute("SELECT status, COUNT(*) FROM studies GROUP BY status")))
        return self._by_status

    def page(self, number: int, size: int) -> list[StoredStudy]:
        """Studies in order of first arrival; page 1 is the first `size` of them."""
        lo = (number - 1) * size
        rows = self.db.execute("SELECT * FROM studies WHERE seq>? AND seq<=? ORDER BY seq", (lo, lo + size))
        return [_stored(r) for r in rows]

    def slice_rows(self) -> Iterator[dict[str, str]]:
        for (text,) in self.db.execute("SELECT row FROM slices ORDER BY study_uid, idx"):
            yield json.loads(text)

    # -- files -----------------------------------------------------------------------------------
    def put_file_issue(self, path: str, status: str, message: str) -> None:
        row = {"path": path, "status": status, "message": message}
        with self.transaction():
            old = self.db.execute("SELECT seq, row FROM files WHERE path=?", (path,)).fetchone()
            if old and json.loads(old[1]) == row:
                return
            seq = old[0] if old else self._next_seq("files")
            self.db.execute("INSERT OR REPLACE INTO files VALUES(?,?,?)", (path, seq, json.dumps(row)))
        self._show(self.files, [] if old else [row], replaced=old is not None)

    def forget_file_issue(self, path: str) -> None:
        """A file that is usable now (it was still being copied, or was replaced) is no longer an issue."""
        with self.transaction():
            gone = self.db.execute("DELETE FROM files WHERE path=?", (path,)).rowcount
        if gone:
            self.files.mark_dirty()
            self._maybe_rebuild(self.files)

    def file_issue_count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM files").fetchone()[0])

    # -- views kept elsewhere (the HTML index) --------------------------------------------------
    def set_behind(self, view: str, behind: bool) -> None:
        """Record, durably, that a view may not show every committed study (set before the commits it
        holds back, cleared once it shows them): a run killed in between leaves it set."""
        with self.transaction():
            self.db.execute("INSERT INTO mirrors(name, size, dirty) VALUES(?,0,?) ON CONFLICT(name) DO "
                            "UPDATE SET dirty=excluded.dirty", (view, int(behind)))

    def is_behind(self, view: str) -> bool:
        row = self.db.execute("SELECT dirty FROM mirrors WHERE name=?", (view,)).fetchone()
        return bool(row and row[0])

    # -- CSV views -------------------------------------------------------------------------------
    def rows(self, table: str) -> Iterator[dict[str, str]]:
        query = {"studies": "SELECT row FROM studies ORDER BY seq", "files": "SELECT row FROM files ORDER BY seq"}
        for (text,) in self.db.execute(query[table]):
            yield json.loads(text)

    def flush(self) -> None:
        """Bring every CSV view up to date (end of a run, or an idle watcher)."""
        for mirror in (self.studies, self.files):
            if not mirror.in_sync() or _header(mirror.path) != list(mirror.columns):  # a newer schema: rewrite
                mirror.rebuild()

    def _show(self, mirror: CsvMirror, new_rows: Sequence[dict[str, str]], replaced: bool) -> None:
        """Committed rows into the CSV: new ones appended; a replaced one makes the CSV due for a rebuild
        from the store (which then holds the new rows too)."""
        if replaced:
            mirror.mark_dirty()
            if self._maybe_rebuild(mirror):
                return
        if new_rows:
            mirror.append(new_rows)

    def _maybe_rebuild(self, mirror: CsvMirror) -> bool:
        if time.monotonic() - mirror.last_rebuild >= self.rebuild_seconds:
            mirror.rebuild()
            return True
        return False

    def _next_seq(self, table: str) -> int:
        return int(self.db.execute(f"SELECT COALESCE(MAX(seq), 0) + 1 FROM {table}").fetchone()[0])

    def _import_legacy_csv(self, columns: Sequence[str]) -> None:
        """A results CSV written before the store existed: its rows become the store's first rows."""
        if self.count() or self.studies.recorded() is not None or not self.csv_path.is_file():
            return
        with open(self.csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        with self.transaction():
            for k, r in enumerate(rows, 1):
                row = {c: r.get(c, "") or "" for c in columns}
                self.db.execute("INSERT OR REPLACE INTO studies VALUES(?,?,?,?,?,?,?,?,?)",
                                (row["study_uid"], k, row["status"], "", row.get("model", ""), json.dumps(row), "[]",
                                 "imported", time.time()))
        self._by_status = None  # counted again from the imported rows
        self.studies.mark_dirty()


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any exception (KeyboardInterrupt too).

    The connection is opened with isolation_level=None, so `with db:` alone would open no transaction.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type: object, exc: object, _tb: object) -> None:
        if exc_type is not None:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise storage_error(exc) from exc
            return
        try:
            self.db.execute("COMMIT")
        except sqlite3.Error as err:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            raise storage_error(err) from err


def storage_error(exc: sqlite3.Error) -> OutputError:
    """SQLite's 'database or disk is full' is a full disk like any other write's."""
    full = getattr(exc, "sqlite_errorcode", None) == SQLITE_FULL or "full" in str(exc)
    return (DiskFullError if full else OutputError)(f"the results database could not be written: {exc}")


def _stored(row: tuple) -> StoredStudy:  # type: ignore[type-arg]
    uid, seq, status, digest, model, text, outputs, run_id, finished = row
    return StoredStudy(uid, seq, status, digest, model, json.loads(text), tuple(json.loads(outputs)), run_id, finished)


def _header(path: Path) -> list[str]:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def _refuse_foreign(csv_path: Path, columns: Sequence[str], have_store: bool) -> None:
    """--out never overwrites a file that ichbatch did not write."""
    if csv_path.is_dir():
        raise ExistingFileError(f"{csv_path} is a folder; --out needs a CSV file name")
    if have_store or not csv_path.exists() or csv_path.stat().st_size == 0:
        return
    try:
        with open(csv_path, newline="", encoding="utf-8") as fh:
            header = next(csv.reader(fh), [])
    except (OSError, UnicodeDecodeError, csv.Error):
        header = []
    if not header or header[0] != "study_uid" or "notice" not in header:
        raise ExistingFileError(
            f"{csv_path} exists and is not an ichbatch results CSV; choose another --out file "
            "(ichbatch never overwrites a file it did not write)")


__all__ = ["ResultsStore", "StoredStudy", "StudyEntry", "Transaction", "csv_chunks", "csv_text", "files_csv_path", "store_path"]
