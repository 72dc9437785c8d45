"""Progress display for long runs: a rich bar on a terminal, nothing in logs or CI."""

from __future__ import annotations

import sys
from typing import Any


class TerminalProgress:
    """A rich progress bar on a terminal; silent otherwise (logs and CI stay clean)."""

    def __init__(self) -> None:
        self.bar = None
        self.tasks: dict[str, Any] = {}  # stage -> rich TaskID
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
            return
        if stage not in self.tasks:
            self.tasks[stage] = self.bar.add_task(stage, total=total or None)
        self.bar.update(self.tasks[stage], completed=done, total=total or None)
