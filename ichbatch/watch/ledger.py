"""The watcher's memory: a SQLite database (WAL) of files seen and studies with their state.

A study moves pending -> processing -> done | failed. A crash leaves it in 'processing', which the next
start turns back into 'pending'. A file that arrives for a done study makes it pending again, and the
new result replaces the old row and report (a new version, never a duplicate), until the study is
closed: its result final and its inputs moved or deleted (--after). A file for a closed study is kept
aside as late; it cannot reopen the study, since the result would come from the late files alone. Every change that
touches more than one row is one transaction (BEGIN IMMEDIATE), so an interrupt at any point leaves
either the whole change or none of it.
"""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ..report.store import Transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    path TEXT PRIMARY KEY, study_uid TEXT, size INTEGER, mtime REAL, seen_at REAL, problem TEXT
);
CREATE INDEX IF NOT EXISTS files_study ON files(study_uid);
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY, status TEXT NOT NULL, last_change REAL NOT NULL, attempts INTEGER DEFAULT 0,
    retry_at REAL DEFAULT 0, version INTEGER DEFAULT 0, message TEXT DEFAULT '', outputs TEXT DEFAULT '',
    finished_at REAL, closed_at REAL, dispose INTEGER DEFAULT 0
);
"""
LATE = "late: arrived after this study's result was final and its other files were moved or deleted (--after); " \
       "not processed, left in place"


class StudyState(str, Enum):
    PENDING = "pending"
    PROCESSING = "processing"
    DONE = "done"
    FAILED = "failed"


PENDING, PROCESSING, DONE, FAILED = StudyState.PENDING, StudyState.PROCESSING, StudyState.DONE, StudyState.FAILED


@dataclass(frozen=True)
class StudyRow:
    study_uid: str
    status: StudyState
    last_change: float
    attempts: int
    retry_at: float
    version: int
    message: str
    outputs: str
    finished_at: float | None
    closed_at: float | None = None  # result final, inputs moved or deleted (--after)
    dispose: int = 0  # finished under --after move/delete


class Ledger:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(str(path), timeout=30, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(SCHEMA)
        columns = {r[1] for r in self.db.execute("PRAGMA table_info(studies)")}
        if "closed_at" not in columns:  # a ledger from before closing existed
            self.db.execute("ALTER TABLE studies ADD COLUMN closed_at REAL")
            self.db.execute("ALTER TABLE studies ADD COLUMN dispose INTEGER DEFAULT 0")

    def close(self) -> None:
        self.db.close()

    def file_state(self, path: str) -> tuple[int, float] | None:
        row = self.db.execute("SELECT size, mtime FROM files WHERE path=?", (path,)).fetchone()
        return (row[0], row[1]) if row else None

    def record_file(self, path: str, study_uid: str | None, size: int, mtime: float, problem: str = "") -> str:
        """A new or changed file: its study (if any) becomes pending and its quiet period restarts.
        Returns the problem recorded: LATE for a file of a closed study."""
        now = time.time()
        with Transaction(self.db):
            if study_uid and self._closed(study_uid):
                problem, study_uid = LATE, None
            self.db.execute(
                "INSERT INTO files(path, study_uid, size, mtime, seen_at, problem) VALUES(?,?,?,?,?,?) "
                "ON CONFLICT(path) DO UPDATE SET study_uid=excluded.study_uid, size=excluded.size, "
                "mtime=excluded.mtime, seen_at=excluded.seen_at, problem=excluded.problem",
                (path, study_uid, size, mtime, now, problem),
            )
            if study_uid:
                self._mark_pending(study_uid, now)
        return problem

    def _closed(self, study_uid: str) -> bool:
        row = self.db.execute("SELECT closed_at FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        return bool(row and row[0] is not None)

    def settled(self, settle_seconds: float) -> list[str]:
        """Done studies whose result has stood for settle_seconds without a new file: ready to close."""
        rows = self.db.execute("SELECT study_uid FROM studies WHERE status=? AND dispose=1 AND closed_at IS NULL "
                               "AND finished_at<=? ORDER BY finished_at", (DONE.value, time.time() - settle_seconds))
        return [r[0] for r in rows]

    def close_study(self, study_uid: str) -> None:
        with Transaction(self.db):
            self.db.execute("UPDATE studies SET closed_at=? WHERE study_uid=? AND status=?",
                            (time.time(), study_uid, DONE.value))

    def _mark_pending(self, study_uid: str, now: float) -> None:
        self.db.execute(
            "INSERT INTO studies(study_uid, status, last_change) VALUES(?,?,?) ON CONFLICT(study_uid) DO "
            "UPDATE SET status=?, last_change=?, attempts=CASE WHEN status IN (?, ?) THEN 0 ELSE attempts END",
            (study_uid, PENDING.value, now, PENDING.value, now, DONE.value, FAILED.value),
        )

    def forget_file(self, path: str) -> None:
        with Transaction(self.db):
            self.db.execute("DELETE FROM files WHERE path=?", (path,))

    def study_files(self, study_uid: str) -> list[tuple[str, int, float]]:
        rows = self.db.execute("SELECT path, size, mtime FROM files WHERE study_uid=? ORDER BY path", (study_uid,))
        return list(rows)

    def ready(self, quiet_seconds: float) -> list[str]:
        """Pending studies with no new file for the quiet period and no retry wait outstanding."""
        now = time.time()
        rows = self.db.execute(
            "SELECT study_uid FROM studies WHERE status=? AND last_change<=? AND retry_at<=? ORDER BY last_change",
            (PENDING.value, now - quiet_seconds, now),
        )
        return [r[0] for r in rows]

    def start(self, study_uid: str) -> int | None:
        """Claim a pending study (mark processing); returns the attempt number, or None if it was not pending."""
        with Transaction(self.db):
            claimed = self.db.execute("UPDATE studies SET status=?, attempts=attempts+1 WHERE study_uid=? AND status=?",
                                      (PROCESSING.value, study_uid, PENDING.value)).rowcount
            if not claimed:
                return None
            return int(self.db.execute("SELECT attempts FROM studies WHERE study_uid=?", (study_uid,)).fetchone()[0])

    def finish(self, study_uid: str, status: StudyState, message: str, outputs: str, dispose: bool = False) -> bool:
        """Done (or failed for good) unless a file arrived meanwhile, in which case it stays pending.
        dispose: its inputs are to be moved or deleted once it has settled (the --after in force now)."""
        with Transaction(self.db):
            return bool(self.db.execute(
                "UPDATE studies SET status=?, message=?, outputs=?, finished_at=?, version=version+1, dispose=? "
                "WHERE study_uid=? AND status=?",
                (StudyState(status).value, message, outputs, time.time(), int(dispose), study_uid, PROCESSING.value),
            ).rowcount)

    def retry_later(self, study_uid: str, delay: float, message: str, count_attempt: bool = True) -> None:
        """Back to pending after a delay. count_attempt=False: the failure was not the study's (an
        unwritable output), so the attempt that start() counted is given back."""
        with Transaction(self.db):
            self.db.execute(
                "UPDATE studies SET status=?, retry_at=?, message=?, attempts=attempts-? WHERE study_uid=? AND status=?",
                (PENDING.value, time.time() + delay, message, 0 if count_attempt else 1, study_uid, PROCESSING.value),
            )

    def recover(self) -> int:
        """After a crash: studies left in 'processing' are processed again, behind the studies already
        waiting (a study that crashed the watcher must not be first in the queue on every restart).
        Its attempt was counted when it started."""
        with Transaction(self.db):
            return self.db.execute("UPDATE studies SET status=?, last_change=? WHERE status=?",
                                   (PENDING.value, time.time(), PROCESSING.value)).rowcount

    def counts(self) -> dict[str, int]:
        return dict(self.db.execute("SELECT status, COUNT(*) FROM studies GROUP BY status").fetchall())

    def studies(self, status: StudyState | None = None, limit: int = 20) -> list[StudyRow]:
        query = "SELECT * FROM studies" + (" WHERE status=?" if status else "") + " ORDER BY last_change DESC LIMIT ?"
        args = (StudyState(status).value, limit) if status else (limit,)
        return [_row(r) for r in self.db.execute(query, args)]

    def bad_files(self, limit: int = 20) -> list[tuple[str, str]]:
        return list(self.db.execute("SELECT path, problem FROM files WHERE problem!='' ORDER BY seen_at DESC LIMIT ?", (limit,)))


def _row(r: tuple) -> StudyRow:  # type: ignore[type-arg]
    return StudyRow(r[0], StudyState(r[1]), *r[2:])
