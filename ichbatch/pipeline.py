"""A folder run: discover -> group and select -> (skip what --resume finds done) -> the study path.

The per-study work is ichbatch.study.StudyPath, which `watch` calls too. A problem with one file or one
study becomes a status and a message in its result; only a problem that affects every study (an
unloadable model, outputs that cannot be written) raises. The summary keeps counts, never results, so
memory does not grow with the number of studies.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from .config import SelectionRules
from .discover import Discovery, Examiner, discover, pooled_examiner
from .logs import outcome, study_tag
from .domain import SeriesChoice, Status, StudyResult
from .series import choose_series, group_studies
from .study import Engine, RunSettings, StudyPath, StudySink, resolve_precision

log = logging.getLogger(__name__)
__all__ = ["Engine", "RunSettings", "RunSummary", "process_folder", "plan", "process_studies", "resolve_precision", "select"]


@dataclass
class RunSummary:
    counts: Counter[str] = field(default_factory=Counter)  # study status -> how many
    resumed: int = 0  # studies skipped by --resume because their result was complete
    file_issues: int = 0
    n_slices: int = 0
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return self.counts[status.value]

    @property
    def studies(self) -> int:
        return sum(self.counts.values())

    @property
    def slices_per_second(self) -> float:
        return self.n_slices / self.seconds if self.seconds > 0 else 0.0


def select(discovery: Discovery, rules: SelectionRules) -> list[SeriesChoice]:
    return [choose_series(series, rules) for series in group_studies(discovery.instances).values()]


class ResumeCheck(Protocol):
    def is_complete(self, study_uid: str, instances_digest: str, model: str) -> bool: ...


def process_studies(
    choices: Iterable[SeriesChoice],
    engine: Engine,
    sink: StudySink | None = None,
    on_result: Callable[[StudyResult], None] | None = None,
    summary: RunSummary | None = None,
) -> RunSummary:
    """Every study through the study path; on_result sees each written result."""
    summary = summary or RunSummary()
    path = StudyPath(engine, sink)
    start = time.perf_counter()
    for result in path.process_many(choices):
        summary.counts[result.status.value] += 1
        log.info("%s: %s, %d slices", study_tag(result.study.study_uid), outcome(result), result.n_slices)
        if on_result:
            on_result(result)
    summary.n_slices += path.n_slices
    summary.seconds += time.perf_counter() - start
    return summary


def process_folder(
    inputs: Iterable[str | Path],
    settings: RunSettings,
    sink: StudySink | None = None,
    on_result: Callable[[StudyResult], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    resume: ResumeCheck | None = None,
    engine: Engine | None = None,
) -> RunSummary:
    """Run everything under the inputs. With `resume`, studies it reports complete are not run again."""
    start = time.perf_counter()
    own_engine = engine is None
    engine = engine or Engine(settings)
    summary = RunSummary()
    try:
        headers = pooled_examiner(settings.workers, settings.decode_limits)
        process_studies(plan(inputs, settings, engine.model_key, summary, sink, progress, resume, headers), engine,
                        sink, on_result, summary)
    finally:
        if own_engine:
            engine.close()
    summary.seconds = time.perf_counter() - start
    return summary


def plan(inputs: Iterable[str | Path], settings: RunSettings, model_key: str, summary: RunSummary,
         sink: StudySink | None = None, progress: Callable[[str, int, int], None] | None = None,
         resume: ResumeCheck | None = None, examiner: Examiner | None = None) -> Iterator[SeriesChoice]:
    """discover -> group -> select, lazily: the chosen series of each study still to run, in a stable order.

    Every engine runs what this yields. Unreadable files go to the sink; --resume's skips and the
    number of file issues are counted in the summary. `examiner` reads the headers elsewhere (processes, Ray tasks).
    """
    discovery = discover(inputs, progress=(lambda n: progress("reading headers", n, 0)) if progress else None,
                         examiner=examiner)
    summary.file_issues = len(discovery.issues)
    log.info("%d DICOM instances and %d other files found", len(discovery.instances), len(discovery.issues))
    if sink is not None:
        for issue in discovery.issues:
            sink.record_file_issue(issue)
    studies = group_studies(discovery.instances)
    total = len(studies)
    discovery.instances.clear()  # the groups hold them now; no second copy for the whole run
    for n, series in enumerate(studies.values(), 1):
        choice = choose_series(series, settings.rules)
        if resume and resume.is_complete(choice.study.study_uid, choice.instances_digest, model_key):
            summary.resumed += 1
        else:
            yield choice
        if progress:
            progress("studies", n, total)
