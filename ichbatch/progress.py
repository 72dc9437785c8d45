"""Progress display for long runs: a rich bar on a terminal; elsewhere an INFO log line now and then."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

log = logging.getLogger("ichbatch.progress")


class TerminalProgress:
    """A rich progress bar on a terminal; otherwise (nohup, a scheduler's log) a log line per stage at most
    every `interval` seconds and when it completes, seen with -v."""

    def __init__(self, interval: float = 30.0) -> None:
        self.bar = None
        self.tasks: dict[str, Any] = {}  # stage -> rich TaskID
        self.interval = interval
        self._logged: dict[str, float] = {}  # stage -> when it was last logged
        if sys.stderr.isatty():
            from rich.progress import Progress

            self.bar = Progress(transient=True)

    def __enter__(self) -> TerminalProgress:
        if self.bar:
            self.bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:  # type: ignore[no-untyped-def]
        if self.bar:
            self.bar.__exit__(*exc)

    def update(self, stage: str, done: int, total: int) -> None:
        if not self.bar:
            now = time.monotonic()
            if done == total or now - self._logged.get(stage, -self.interval) >= self.interval:
                self._logged[stage] = now
                log.info("%s: %d of %s", stage, done, total or "?")
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total or None)
        self.bar.update(self.tasks[stage], completed=done, total=total or None)
