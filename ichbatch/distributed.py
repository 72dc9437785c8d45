"""The Ray engine (`ichbatch run --engine ray`): the local run's plan and study path, spread over a cluster.

    driver: discover -> group -> select (pipeline.plan, headers only), --resume checks
    CPU tasks: decode and reduce each study's slices (decode.decode_slice, as in the local worker pool)
    actor pool: one model per GPU (or per two CPUs without GPUs); each call scores a group of whole
                studies through StudyPath (batched inference across them, aggregation, heat maps made
                together), exactly as the local engine does
    CPU tasks: each study's files (its key slices drawn, then PDF, JSON, thumbnail, DICOM objects:
               report.outputs.write_study_files)
    driver: the same OutputWriter commits each study to the results store, in input order; its key
            images never travel to the driver

A study is written only once its actor call has returned, so a worker or node lost mid-study means the
study is redone (Ray retries the task, or restarts the actor and retries the call), never written twice;
a study that still cannot be done after `attempts` is recorded as failed with the reason. Results reach
the store as they finish, so `--resume` after a killed driver redoes only what was not written.
"""

from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from . import __version__
from .discover import Examiner
from .domain import FileIssue, InstanceRef, SeriesChoice, Status, StudyImages, StudyResult
from .errors import BundleError, ClusterError, DiskFullError, IchBatchError
from .logs import outcome, study_tag
from .model.bundle import ModelCard, read_card, resolve
from .pipeline import ResumeCheck, RunSummary, plan
from .report.outputs import OutputSettings, OutputWriter, StudyFiles, write_study_files
from .study import FINISH_AHEAD, RunSettings, StudySink, base_result

log = logging.getLogger(__name__)
# Passed to every worker, so a remote cluster runs with the driver's backend, runtime and limits.
FORWARDED_ENV = ("KERAS_BACKEND", "ICHBATCH_RUNTIME", "ICHBATCH_CACHE", "ICHBATCH_JAX_CACHE",
                 "ICHBATCH_DECODE_MEMORY_MB", "ICHBATCH_DECODE_TIMEOUT_S", "ICHBATCH_DECODE_KEEP_FREED_MB",
                 "TF_CPP_MIN_LOG_LEVEL")
LOG_EVERY_S = 30.0
# Files per header-reading task: a task's start costs about a millisecond, a header read about one.
HEADER_CHUNK = 256
# Studies per actor call without GPUs: 1.1-1.26 times the slices/s of one a call on a 2-core node (README).
CPU_GROUP = 4


@dataclass(frozen=True)
class RaySettings:
    address: str | None = None  # an existing cluster ("auto", "HOST:PORT", "ray://HOST:PORT"); None: start one here
    cpus: int | None = None  # for a cluster started here [default: every core]
    actors: int = 0  # model replicas; 0: one per GPU, else one per two CPUs (at least one)
    attempts: int = 3  # tries per study when workers die under it; then it is recorded as failed
    in_flight: int = 0  # studies between the driver and the workers; 0: two calls' worth per actor (bounds memory)
    group: int = 0  # studies per actor call; 0: FINISH_AHEAD (8) on GPUs, CPU_GROUP (4) without them


class StudyScorer:
    """One model replica (a Ray actor): scores whole studies whose slices were decoded by tasks."""

    def __init__(self, settings: RunSettings, driver_version: str) -> None:
        if driver_version != __version__:
            raise ClusterError(f"this worker has ichbatch {__version__}, the driver {driver_version}: install the "
                               "same version on every node")
        from .study import Engine

        self.engine = Engine(settings)  # its decoder processes are never started: tasks decode

    def describe(self) -> tuple[int, int, str]:
        """(process id, TTA views, heat-map method): the driver records failures with the same fields."""
        return os.getpid(), self.engine.tta, self.engine.explainer.describe()

    def score(self, choices: list[SeriesChoice], decoded: list[Any]) -> tuple[Any, ...]:
        """A group of studies through one StudyPath, each with the reference to its decoding task's slices
        ([] for a study that does not run). Called with num_returns = 3 per study: (result, images, file
        issues) for each, in order, so that each study's images go straight from here to the task that
        writes its files (which draws the key slices). The references come inside a list, so Ray does not
        resolve them before the call: a decoding task that failed for good fails its own study, not the
        group."""
        import ray

        slices: list[list[Any] | str] = []
        for ref in decoded:
            try:
                slices.append(ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref)
            except ray.exceptions.RayError as exc:
                slices.append(f"failed on a Ray worker while decoding: {_cause(exc)}")
        return self.score_decoded(choices, slices)

    def score_decoded(self, choices: list[SeriesChoice], decoded: list[list[Any] | str]) -> tuple[Any, ...]:
        """score() once the slices are here: each study's decoded slices, or why it has none. The studies'
        slices share the model's batches and their heat maps are made in joint calls, as when the local
        engine's studies queue behind a fast GPU."""
        from .study import StudyPath

        runs = [n for n, d in enumerate(decoded) if not isinstance(d, str)]
        kept = _Kept([choices[n] for n in runs])
        given = [decoded[n] for n in runs]

        def decode(jobs: Iterable[Any], _ahead: int) -> Any:
            slices = [iter(d) for d in given]
            for job in jobs:  # the same jobs, in the same order, that the decode tasks ran, study by study
                yield replace(next(slices[job.study]), study=job.study)

        path = StudyPath(self.engine, kept, decode=decode)
        for _ in path.process_many([choices[n] for n in runs]):
            pass
        out: list[Any] = []
        done = iter(zip(kept.results, kept.issues))
        for choice, d in zip(choices, decoded):
            if isinstance(d, str):
                failed = base_result(choice, self.engine.bundle.card, self.engine.tta,
                                     self.engine.explainer.describe(), Status.FAILED, d)
                out += [failed, StudyImages(), []]
            else:
                (result, images), issues = next(done)
                out += [result, images, issues]
        return tuple(out)


class _Kept:
    """A sink that keeps what the study path produced, study by study, for the driver's writer."""

    def __init__(self, choices: list[SeriesChoice]) -> None:
        self.results: list[tuple[StudyResult, StudyImages]] = []
        self.issues: list[list[FileIssue]] = [[] for _ in choices]
        # A file belongs to one study; its issues go back with that study, whenever it was decoded.
        self._study_of = {ref.path: n for n, choice in enumerate(choices) for ref in choice.slices}

    def write(self, result: StudyResult, images: StudyImages) -> StudyResult:
        self.results.append((result, images))
        return result

    def record_file_issue(self, issue: FileIssue) -> None:
        n = self._study_of.get(issue.path, min(len(self.results), len(self.issues) - 1))
        self.issues[n].append(issue)


def decode_study(choice: SeriesChoice, size: int) -> list[Any]:
    """A Ray task: every slice of one study decoded and reduced to the model's input size."""
    from .decode import decode_slice
    from .study import decode_jobs
    from .workers import WorkerLimits, keep_freed_memory

    keep_freed_memory(WorkerLimits.from_env().keep_freed_mb)  # as in a local run's decoder processes
    return [decode_slice(job) for job in decode_jobs(0, choice, size)]


def examine_files(paths: list[Path], roots: list[Path]) -> list[InstanceRef | FileIssue]:
    """A Ray task: the headers of a run of files, read as discover.examine reads each."""
    from .discover import examine

    return [examine(path, roots) for path in paths]


def header_reader(ray: Any, retries: int,
                  reader: Callable[[list[Path], list[Path]], list[InstanceRef | FileIssue]] | None = None) -> Examiner:
    """Headers read in tasks of HEADER_CHUNK files, a few per CPU ahead, in the walk's order: on the
    driver they were the stage that did not scale (about 1 ms a file, 4 million files in an archive
    of 100,000 studies). A task that still fails after its retries (a file that kills its worker)
    is tried again file by file, so that only the guilty file is recorded as failed. `reader` is the
    task's function (examine_files)."""
    task = ray.remote(num_cpus=1, max_retries=retries)(reader or examine_files)
    ahead = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def read(paths: list[Path], roots: list[Path], ref: Any) -> list[InstanceRef | FileIssue]:
        try:
            return list(ray.get(ref))
        except ray.exceptions.RayError as exc:
            if len(paths) == 1:
                return [FileIssue(str(paths[0]), Status.FAILED,
                                  f"its header could not be read on a Ray worker: {_cause(exc)}")]
            return [seen for path in paths for seen in read([path], roots, task.remote([path], roots))]

    def examine_all(files: Iterable[Path], roots: list[Path]) -> Iterator[InstanceRef | FileIssue]:
        window: deque[tuple[list[Path], Any]] = deque()
        chunk: list[Path] = []
        n_files = n_tasks = 0
        for path in files:
            chunk.append(path)
            n_files += 1
            if len(chunk) == HEADER_CHUNK:
                window.append((chunk, task.remote(chunk, roots)))
                n_tasks, chunk = n_tasks + 1, []
            while len(window) >= ahead:
                paths, ref = window.popleft()
                yield from read(paths, roots, ref)
        if chunk:
            window.append((chunk, task.remote(chunk, roots)))
            n_tasks += 1
        while window:
            paths, ref = window.popleft()
            yield from read(paths, roots, ref)
        log.info("Ray: the headers of %d files read in %d task(s)", n_files, n_tasks)

    return examine_all


def write_files(result: StudyResult, images: StudyImages, settings: OutputSettings) -> StudyFiles:
    """A Ray task: one study's files, written where the driver's output folders are (a shared file system)."""
    return write_study_files(result, images, settings)


def process_folder_ray(
    inputs: Iterable[str | Path],
    settings: RunSettings,
    cluster: RaySettings,
    sink: StudySink | None = None,
    on_result: Callable[[StudyResult], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    resume: ResumeCheck | None = None,
) -> RunSummary:
    """pipeline.process_folder on a Ray cluster: the same studies, results and outputs. The inputs are
    made absolute: every node reads the files, wherever its workers run."""
    ray = _import_ray()
    inputs = [Path(path).absolute() for path in inputs]
    start = time.perf_counter()
    card = read_card(resolve(settings.model))
    started_here = _connect(ray, cluster)
    try:
        return _Driver(ray, settings, cluster, card, sink, on_result, progress).run(inputs, resume, start)
    finally:
        if started_here:
            ray.shutdown()


class _Driver:
    def __init__(self, ray: Any, settings: RunSettings, cluster: RaySettings, card: ModelCard,
                 sink: StudySink | None, on_result: Callable[[StudyResult], None] | None,
                 progress: Callable[[str, int, int], None] | None) -> None:
        self.ray, self.settings, self.cluster, self.card = ray, settings, cluster, card
        self.sink, self.on_result, self.progress = sink, on_result, progress
        self.summary = RunSummary()
        self.total = 0
        self.last_log = time.monotonic()

    def run(self, inputs: Iterable[str | Path], resume: ResumeCheck | None, start: float) -> RunSummary:
        ray = self.ray
        actors, tta, heatmap, gpus = self._start_actors()
        retries = self.cluster.attempts - 1
        decode = ray.remote(num_cpus=1, max_retries=retries)(decode_study)
        files = ray.remote(num_cpus=1, max_retries=retries)(write_files)
        group = self.cluster.group or (FINISH_AHEAD if gpus else CPU_GROUP)
        in_flight = self.cluster.in_flight or max(4, 2 * group) * len(actors)
        window: deque[tuple[SeriesChoice, Any, Any]] = deque()
        waiting: list[tuple[SeriesChoice, Any]] = []  # decoding, until their group is full
        calls = 0

        def call() -> None:
            nonlocal calls
            choices = [choice for choice, _ in waiting]
            refs = actors[calls % len(actors)].score.options(num_returns=3 * len(waiting)).remote(
                choices, [decoded for _, decoded in waiting])
            calls += 1
            for n, choice in enumerate(choices):
                result, images, issues = refs[3 * n:3 * n + 3]
                written = files.remote(result, images, self.sink.settings) if isinstance(self.sink, OutputWriter) \
                    else [result, images]  # another sink writes on the driver
                window.append((choice, issues, written))
            waiting.clear()

        log.info("Ray: %d studies per model call", group)
        for choice in plan(inputs, self.settings, self.card.key, self.summary, self.sink, self._planned, resume,
                           header_reader(ray, retries)):
            waiting.append((choice, decode.remote(choice, self.card.input_size) if self._runs(choice) else []))
            if len(waiting) >= group:
                call()
            while len(window) >= in_flight:
                self._finish(window, tta, heatmap, start)
        if waiting:
            call()
        while window:
            self._finish(window, tta, heatmap, start)
        self.summary.seconds = time.perf_counter() - start
        return self.summary

    def _runs(self, choice: SeriesChoice) -> bool:
        """Whether the study's slices go to the model (else the actor records why not, without decoding)."""
        return choice.series is not None and not self.card.eligibility.problem(choice)

    def _start_actors(self) -> tuple[list[Any], int, str, int]:
        """The model replicas, with the TTA views and heat-map method they use, and the cluster's GPUs."""
        ray = self.ray
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        count = self.cluster.actors or (gpus or max(1, cpus // 2))
        options: dict[str, Any] = {"num_cpus": 1, "max_restarts": -1, "max_task_retries": self.cluster.attempts - 1}
        if gpus:
            options["num_gpus"] = 1
        scorer = ray.remote(**options)(StudyScorer)
        actors = [scorer.remote(self.settings, __version__) for _ in range(count)]
        try:
            described = ray.get([a.describe.remote() for a in actors])
        except ray.exceptions.RayError as exc:
            raise _cluster_error(exc, "the Ray workers could not load the model") from exc
        log.info("Ray: %d model replica(s) (%d GPU(s), %d CPU(s) in the cluster)", count, gpus, cpus)
        _, tta, heatmap = described[0]
        return actors, tta, heatmap, gpus

    def _finish(self, window: deque[tuple[SeriesChoice, Any, Any]], tta: int, heatmap: str, start: float) -> None:
        """The oldest study in the window (waited for) and every one after it that is done, committed
        together: a commit waits for the disk once a group, not once a study (README: Performance)."""
        entries = [window.popleft()]
        while window and self._ready(window[0]):
            entries.append(window.popleft())
        outcomes = [self._outcome(*entry, tta, heatmap) for entry in entries]
        if self.sink is not None:
            for issues, _ in outcomes:
                for issue in issues:
                    self.sink.record_file_issue(issue)
        if isinstance(self.sink, OutputWriter):
            results = self.sink.commit_many([got for _, got in outcomes])
        else:
            sink = self.sink
            results = [sink.write(*got) if sink is not None else got[0] for _, got in outcomes]
        for result in results:
            self.summary.counts[result.status.value] += 1
            self.summary.n_slices += result.n_slices
            log.info("%s: %s, %d slices", study_tag(result.study.study_uid), outcome(result), result.n_slices)
            if self.on_result:
                self.on_result(result)
            self._report(start)

    def _ready(self, entry: tuple[SeriesChoice, Any, Any]) -> bool:
        _, issues_ref, written = entry
        refs = [issues_ref, *(written if isinstance(written, list) else [written])]
        ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        return len(ready) == len(refs)

    def _outcome(self, choice: SeriesChoice, issues_ref: Any, written: Any, tta: int,
                 heatmap: str) -> tuple[list[FileIssue], Any]:
        """A study's file issues and its written files (or result and images, for another sink); a study
        lost or failed on the cluster as a failed result with the reason."""
        ray = self.ray
        try:
            return ray.get(issues_ref), ray.get(written)
        except ray.exceptions.RayError as exc:
            if isinstance(getattr(exc, "cause", None), DiskFullError):
                raise exc.cause from exc  # not the study's fault: stop, as the local engine does
            if isinstance(exc, ray.exceptions.RayTaskError):  # the study's own error, raised on a worker
                reason = f"failed on a Ray worker: {_cause(exc)}"
            else:  # workers or objects lost more often than `attempts` allows
                reason = f"lost on the Ray cluster after {self.cluster.attempts} attempt(s): {_cause(exc)}"
            got: Any = StudyFiles(base_result(choice, self.card, tta, heatmap, Status.FAILED, reason), ())
            if not isinstance(self.sink, OutputWriter):
                got = [got.result, StudyImages()]
            return [], got

    def _planned(self, stage: str, done: int, total: int) -> None:
        if stage == "studies":
            self.total = total  # progress counts studies written, not studies handed out
        elif self.progress:
            self.progress(stage, done, total)

    def _report(self, start: float) -> None:
        done = self.summary.studies + self.summary.resumed
        if self.progress:
            self.progress("studies", done, self.total)
        if time.monotonic() - self.last_log >= LOG_EVERY_S:
            self.last_log = time.monotonic()
            rate = self.summary.n_slices / max(time.perf_counter() - start, 1e-9)
            log.warning("%d of %d studies done, %.1f slices/s across the cluster", done, self.total, rate)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ClusterError("--engine ray needs Ray: pip install 'ichbatch[ray]'") from None
    return ray


def _connect(ray: Any, cluster: RaySettings) -> bool:
    """Join the cluster at the address, or start a one-node cluster bound to 127.0.0.1; True if started here."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # Ray would otherwise report usage to its makers
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    common: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    if env:
        common["runtime_env"] = {"env_vars": env}
    try:
        if cluster.address:
            _probe(cluster.address)
            if _host(cluster.address) in ("127.0.0.1", "localhost"):
                # else Ray finds this node's address by a route to a public one (8.8.8.8)
                common["_node_ip_address"] = "127.0.0.1"
            ray.init(address=cluster.address, **common)
            return False
        ray.init(num_cpus=cluster.cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **common)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot reach the Ray cluster at {cluster.address or 'a new local one'}: {exc}") from exc
    return True


def _host(address: str) -> str:
    return address.removeprefix("ray://").rpartition(":")[0]


def _probe(address: str) -> None:
    """Ray retries an address that does not answer for minutes; a HOST:PORT that refuses fails here at once."""
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        return  # "auto", or an address Ray resolves itself
    try:
        socket.create_connection((host, int(port)), timeout=10).close()
    except OSError as exc:
        raise ClusterError(f"nothing answers at {address} ({exc.strerror or exc}): is the Ray head running "
                           "there (ray start --head)?") from exc


def _cause(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        return f"{type(cause).__name__}: {cause}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _cluster_error(exc: BaseException, what: str) -> IchBatchError:
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BundleError):
        return BundleError(str(cause))
    return ClusterError(f"{what}: {_cause(exc)}")
