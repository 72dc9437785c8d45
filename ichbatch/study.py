"""The study path: a selected series -> decoded slices -> scores -> study result -> written outputs.

`run`, `watch` and every later front end call StudyPath; nothing else decodes, scores or writes a study.
A stream of studies goes through the same steps as one study, with the next study's slices decoding
while the current one is scored. Each study ends as a small frozen StudyResult; its key images and
heat maps (StudyImages) live only until the writer has used them.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Generic, Protocol, TypeVar

import numpy as np

from . import context
from .aggregate import aggregate
from .config import DEFAULT_RULES, SelectionRules
from .domain import FileIssue, KeySlice, SeriesChoice, SliceId, SliceRef, Status, StudyImages, StudyResult
from .decode import DecodeJob, Decoded, crashed, decode_slice
from .infer import Predictor, cpu_has_bfloat16, default_device, default_tta, default_workers
from .model.backend import import_backend
from .model import calibration
from .model.bundle import Bundle, ModelCard, load_bundle
from .model.gradcam import CamExplainer
from .model.inputs import model_input
from .workers import IsolatedPool, WorkerLimits, chunk_for

log = logging.getLogger(__name__)
T = TypeVar("T")
R = TypeVar("R")
MIN_DECODED_FRACTION = 0.5
# Studies scored and waiting to be finished, and finished together at most (their heat maps in one call).
# Only a model that outpaces the finishing lets them queue; their decoded slices are held meanwhile.
FINISH_AHEAD = 8
FINISHERS_FROM = 8  # decoder processes from which two studies are finished at a time (a GPU machine's cores)
DECODE_AHEAD = 4  # batches of slices decoded ahead of the model


@dataclass(frozen=True)
class RunSettings:
    model: str
    tta: int | None = None  # None: chosen for the device
    batch_size: int = 16
    device: str = "auto"
    aggregate: str = "max"
    topk: int = 3
    rules: SelectionRules = DEFAULT_RULES
    workers: int = field(default_factory=default_workers)  # decoder processes
    decode_limits: WorkerLimits = field(default_factory=WorkerLimits.from_env)
    features: bool = False  # pooled features for every slice, also without a domain check (fitting one)
    precision: str = "auto"  # auto: bfloat16 compute on a GPU, float32 on a CPU
    # Who runs a Keras bundle's forward passes: "keras", "onnx" (its cached ONNX export in onnxruntime), or
    # "auto": onnx on a CPU where the export can be made (tf2onnx installed), else keras. $ICHBATCH_RUNTIME
    # sets the default. Heat maps always come from the bundle's own model and card.
    runtime: str = field(default_factory=lambda: os.environ.get("ICHBATCH_RUNTIME", "auto"))


class Engine:
    """A loaded model with its predictor and explainer, reused across studies (and by watch)."""

    def __init__(self, settings: RunSettings) -> None:
        import_backend()
        self.settings = settings
        device = default_device() if settings.device == "auto" else settings.device
        self.precision = resolve_precision(settings.precision, device)
        self.bundle: Bundle = load_bundle(settings.model, self.precision)
        self.runtime = resolve_runtime(settings.runtime, device, self.bundle)
        runner = self.bundle
        if self.runtime == "onnx" and self.bundle.card.architecture != "onnx":
            from .model.onnx_export import cached_export

            runner = load_bundle(str(cached_export(self.bundle)))
        self.tta = settings.tta or default_tta(device)
        features = settings.features or self.bundle.domain is not None
        self.predictor = Predictor(runner, self.tta, settings.batch_size, features=features)
        heat = heatmap_precision(settings.precision, device)
        explained = self.bundle
        if heat != self.precision and self.bundle.card.architecture != "onnx":  # the same weights, other compute
            explained = load_bundle(settings.model, heat)
        self.explainer = make_explainer(explained)
        # Started on first use and kept for every later study (watch reuses the engine).
        self.decoders: IsolatedPool[DecodeJob, Decoded] = IsolatedPool(
            decode_slice, crashed, settings.workers, settings.decode_limits,
            chunk_for(DECODE_AHEAD * settings.batch_size, settings.workers))
        # Studies finished side by side beside many cores, so one study's wait for the GPU's heat maps
        # overlaps the other's host work.
        self.finishers = finishing_threads(settings.workers)

    def close(self) -> None:
        self.decoders.close()

    @property
    def model_key(self) -> str:
        return self.bundle.card.key


def make_explainer(bundle: Bundle) -> Explainer:
    """Gradient-family maps for Keras bundles; CAM or occlusion for ONNX ones (no gradients there)."""
    card = bundle.card
    if card.architecture == "onnx":
        from .model.onnx_model import OnnxExplainer

        return OnnxExplainer(bundle.model)
    return CamExplainer(bundle.model, card.cam_layer, card.cam_augment, card.cam_method)


class Explainer(Protocol):
    def describe(self) -> str: ...

    def maps(self, inputs: np.ndarray, output_index: int) -> np.ndarray: ...


def resolve_runtime(runtime: str, device: str, bundle: Bundle) -> str:
    """On a CPU onnxruntime runs the network 1.1x as fast as Keras-TensorFlow on the folded network (1.3x
    before Keras' was folded) and imports in 0.1 s against 4 s (README: Performance); on a GPU the JAX
    path is the fast one."""
    if bundle.card.architecture == "onnx":
        return "onnx"
    if runtime not in ("auto", "keras", "onnx"):
        raise ValueError(f"runtime must be auto, keras or onnx. Received: {runtime!r}")
    if runtime != "auto":
        return runtime
    import importlib.util

    import keras

    # The export goes through tf2onnx, which needs the TensorFlow backend: under JAX, Keras runs.
    exportable = keras.backend.backend() == "tensorflow" and importlib.util.find_spec("tf2onnx") is not None
    return "onnx" if device == "cpu" and exportable else "keras"


def resolve_precision(precision: str, device: str) -> str:
    """bfloat16 halves memory traffic on tensor-core GPUs. On a CPU, float32: the thresholds were set on
    float32 scores, and onnxruntime, the CPU's runtime, computes in float32."""
    if precision == "auto":
        return "bfloat16" if device == "gpu" else "float32"
    if precision not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"precision must be auto, float32, bfloat16 or float16. Received: {precision!r}")
    return precision


def finishing_threads(decoders: int) -> int:
    """Studies finished at a time: two beside many decoder processes (where a GPU outpaces one finishing
    thread), one on a small machine, where the heat maps already compete with the model for the cores."""
    return 2 if decoders >= FINISHERS_FROM else 1


def heatmap_precision(precision: str, device: str) -> str:
    """The run's precision, except with "auto" on a CPU that computes bfloat16 natively under TensorFlow:
    there the heat maps' forward and backward passes run in bfloat16, as on a GPU. On two such cores that
    cut them from 196 to 144 ms per flagged study, with the same peak-in-lesion rate on tuning phantoms
    (README: Performance). They explain a score; they do not change it."""
    import keras

    native = device == "cpu" and keras.backend.backend() == "tensorflow" and cpu_has_bfloat16()
    return "bfloat16" if precision == "auto" and native else resolve_precision(precision, device)


Decoder = Callable[[Iterable[DecodeJob], int], Iterator[Decoded]]  # (jobs, how many ahead) -> results in order
# A scored study: (choice, broken eligibility rule, decoded slices, slice scores, features, scoring seconds)
Scored = tuple[SeriesChoice, str, list[Decoded], np.ndarray, np.ndarray, float]


@dataclass(frozen=True)
class _KeyPlan:
    """A finished study's key slices (their places among the decoded slices), still without heat maps."""

    places: list[int]
    good: list[Decoded]
    choice: SeriesChoice
    result: StudyResult

    @property
    def label(self) -> str:
        return heat_label(self.result)

    @property
    def slices(self) -> list[Decoded]:
        return [self.good[k] for k in self.places]


class GroupThreads(Generic[T, R]):
    """Threads that each take every item waiting (up to `most`) and hand them to `work` as one group,
    which returns one result per item, in order.

    Like a thread pool, one future per item; unlike one, the items that queued while a thread was busy
    are done together (adaptive batching: no wait to fill a group)."""

    def __init__(self, work: Callable[[list[T]], list[R]], threads: int, most: int) -> None:
        self.work, self.most = work, max(1, most)
        self._queue: queue.SimpleQueue[tuple[T, Future[R]] | None] = queue.SimpleQueue()
        self._threads = [threading.Thread(target=self._run, name=f"ichbatch-finish_{i}", daemon=True)
                         for i in range(max(1, threads))]
        for thread in self._threads:
            thread.start()

    def submit(self, item: T) -> Future[R]:
        future: Future[R] = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        """Cancel what no thread has taken, let the groups in hand finish, and stop the threads."""
        while True:
            try:
                entry = self._queue.get_nowait()
            except queue.Empty:
                break
            if entry is not None:
                entry[1].cancel()
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        while True:
            entry = self._queue.get()
            if entry is None:
                return
            group, last = [entry], False
            while len(group) < self.most:
                try:
                    entry = self._queue.get_nowait()
                except queue.Empty:
                    break
                if entry is None:
                    last = True
                    break
                group.append(entry)
            group = [(item, future) for item, future in group if future.set_running_or_notify_cancel()]
            if group:
                try:
                    for (_, future), done in zip(group, self.work([item for item, _ in group])):
                        future.set_result(done)
                except BaseException as exc:  # work's own bug: every waiting caller must hear of it
                    for _, future in group:
                        if not future.done():
                            future.set_exception(exc)
            if last:
                return


class StudySink(Protocol):
    """Where a study's outputs go (report.outputs.OutputWriter); tests and libraries may bring their own.
    A sink may also have write_groups(stream of lists of (result, images)) -> results in order, to write
    the studies finished at the same time together, or write_many(stream of (result, images)) -> results
    in order, to write many studies at once; StudyPath uses the first of them present."""

    def write(self, result: StudyResult, images: StudyImages) -> StudyResult: ...

    def record_file_issue(self, issue: FileIssue) -> None: ...


class StudyPath:
    """Selected series to written outputs. `process` takes one study; `process_many` a stream of them."""

    def __init__(self, engine: Engine, sink: StudySink | None = None,
                 on_slices: Callable[[int], None] | None = None, decode: Decoder | None = None) -> None:
        self.engine = engine
        self.sink = sink
        self.on_slices = on_slices  # called with the number of slices scored, for progress
        # Who decodes: the engine's isolated worker processes, or (the Ray engine) slices decoded elsewhere.
        self.decode: Decoder = decode or engine.decoders.map
        self.n_slices = 0

    def process(self, choice: SeriesChoice) -> StudyResult:
        return next(iter(self.process_many([choice])))

    def process_many(self, choices: Iterable[SeriesChoice]) -> Iterator[StudyResult]:
        """Each study's result once its outputs are written, in input order. A sink with write_groups
        (OutputWriter) writes the studies finished at the same time together, their files in processes of
        their own; one with write_many, a stream of studies."""
        groups = self._finished_groups(choices)
        sink = self.sink
        if sink is None:
            yield from (result for group in groups for result, _ in group)
            return
        write_groups = getattr(sink, "write_groups", None)
        if write_groups:
            yield from write_groups(groups)
            return
        finished = (study for group in groups for study in group)
        write_many = getattr(sink, "write_many", None)
        yield from write_many(finished) if write_many else (sink.write(*study) for study in finished)

    def _finished(self, choices: Iterable[SeriesChoice]) -> Iterator[tuple[StudyResult, StudyImages]]:
        """Each study's result and images, in input order (see _finished_groups)."""
        for group in self._finished_groups(choices):
            yield from group

    def _finished_groups(self, choices: Iterable[SeriesChoice]) -> Iterator[list[tuple[StudyResult, StudyImages]]]:
        """Each study's result and images, in input order, in groups: the studies whose finishing was
        done when the first of them was taken (at least one, waited for), so that they can be committed
        together.

        Studies are finished (aggregation, domain check, heat maps) on threads of their own while the
        next studies' slices go through the model: on a GPU the model would otherwise wait for that
        host work (measured on an H200: 64% of the time). A finishing thread takes every scored study
        that waits, up to FINISH_AHEAD, and makes their heat maps in one call per label:
        where the model outpaces the finishing, studies queue and their maps batch; where it does not,
        each study is finished alone as soon as it is scored. On a machine of many cores two threads
        finish, so one group's wait for the GPU's heat maps overlaps the other's host work. The key
        slices are not drawn here: whoever writes the reports draws them (decode.draw_key_images).
        """
        last = time.perf_counter()
        pending: deque[Future[tuple[StudyResult, StudyImages]]] = deque()
        finishing = GroupThreads(self._finish_group, self.engine.finishers, FINISH_AHEAD)
        try:
            for scored in self._score(choices):
                now = time.perf_counter()
                pending.append(finishing.submit((*scored, now - last)))
                last = now
                if pending[0].done() or len(pending) > FINISH_AHEAD:
                    yield _done(pending)
            while pending:
                yield _done(pending)
        finally:
            finishing.close()

    def _finish_group(self, studies: list[Scored]) -> list[tuple[StudyResult, StudyImages]]:
        """Studies finished together: each assessed on its own, then the heat maps of all their key
        slices in one call per label. One study's failure must not stop the batch, nor fail the others:
        if a joint call fails, each study's maps are made alone. A study's time is its scoring's plus
        its share of the group's finishing."""
        start = time.perf_counter()
        assessed: list[tuple[StudyResult, StudyImages, _KeyPlan | None]] = []
        for choice, rule, decoded, probs, features, seconds in studies:
            try:
                assessed.append(self._finish(choice, rule, decoded, probs, features, seconds))
            except Exception as exc:
                log.exception("a study failed while finishing")
                assessed.append((self._failed(choice, f"{type(exc).__name__}: {exc}"), StudyImages(), None))
        drawn = self._key_slices([plan for _, _, plan in assessed])
        share = (time.perf_counter() - start) / len(studies)
        out = []
        for (result, images, _), keys, study in zip(assessed, drawn, studies):
            if isinstance(keys, Exception):
                result, images = self._failed(study[0], f"{type(keys).__name__}: {keys}"), StudyImages()
            else:
                images = replace(images, to_draw=keys)
            if result.seconds:  # a scored study's: skipped and failed ones have none
                result = replace(result, seconds=study[5] + share)
            out.append((result, images))
        return out

    def _score(self, choices: Iterable[SeriesChoice]) -> Iterator[tuple[SeriesChoice, str, list[Decoded],
                                                                        np.ndarray, np.ndarray]]:
        """Stream the slices of every runnable study through the model; yield each study when complete.

        Studies with no usable series pass straight through, in order, with no slices. With features
        on (a domain check in the bundle, or fitting one), each study's pooled features come along.
        Each study comes with the card's eligibility rule it breaks ('' when none), checked once here.
        """
        size = self.engine.bundle.card.input_size
        eligibility = self.engine.bundle.card.eligibility
        order: dict[int, tuple[SeriesChoice, str]] = {}  # studies in flight, with their broken rule; a few at a time

        def jobs() -> Iterator[DecodeJob]:
            for i, choice in enumerate(choices):
                rule = eligibility.problem(choice)
                order[i] = choice, rule
                if not rule:  # else not run: _finish says why
                    yield from decode_jobs(i, choice, size)

        decoded = self.decode(jobs(), DECODE_AHEAD * self.engine.settings.batch_size)
        per_study: dict[int, list[Decoded]] = {}
        probs: dict[int, list[np.ndarray]] = {}
        features: dict[int, list[np.ndarray]] = {}

        def done(i: int) -> tuple[SeriesChoice, str, list[Decoded], np.ndarray, np.ndarray]:
            choice, rule = order.pop(i)
            return choice, rule, per_study.pop(i, []), _stack(probs.pop(i, [])), _stack(features.pop(i, []))

        def ok_items() -> Iterator[Decoded]:
            for d in decoded:
                per_study.setdefault(d.study, []).append(d)
                if d.model_input is None:
                    if self.sink:
                        self.sink.record_file_issue(FileIssue(d.ref.path, Status.FAILED, d.error))
                else:
                    yield d

        def spacing(i: int) -> float:
            return self._spacing(order[i][0])

        stacks = context.assemble(ok_items(), self.engine.bundle.card.context, spacing)
        current = 0
        for d, p, f in self.engine.predictor.stream(stacks):
            while d.study > current:  # every slice of the earlier studies has passed through the model
                yield done(current)
                current += 1
            probs.setdefault(d.study, []).append(p)
            if f is not None:
                features.setdefault(d.study, []).append(f)
            self.n_slices += 1
            if self.on_slices:
                self.on_slices(1)
        while order:
            yield done(current)
            current += 1

    def _finish(self, choice: SeriesChoice, rule: str, decoded: list[Decoded], probs: np.ndarray,
                features: np.ndarray, seconds: float) -> tuple[StudyResult, StudyImages, _KeyPlan | None]:
        """A study's result and thumbnails, and the key slices whose heat maps are still to be made."""
        if choice.series is None:
            return self._base(choice, Status.SKIPPED, choice.message), StudyImages(), None
        if rule:
            message = f"not assessed: outside what model {self.engine.model_key} is made for ({rule})"
            return self._base(choice, Status.NOT_ASSESSED, message), StudyImages(), None
        good = [d for d in decoded if d.model_input is not None]
        n = len(choice.slices)
        fewest = 1 if _source(choice) else self.engine.settings.rules.min_slices  # a plain image has one slice
        if len(good) < max(fewest, MIN_DECODED_FRACTION * n):
            first = next((d.error for d in decoded if d.error), "no slices decoded")
            return (self._failed(choice, f"{n - len(good)} of {n} slices could not be decoded; first: {first}"),
                    StudyImages(), None)
        card = self.engine.bundle.card
        settings = self.engine.settings
        if card.calibration:  # the card's thresholds are for calibrated scores
            probs = calibration.apply(probs, card.outputs, card.calibration["params"])
        agg = aggregate(probs, card.outputs, card.labels, card.thresholds, settings.aggregate, settings.topk)
        keys = [good[k] for k in agg.key_slices]
        score, threshold = self._domain(features)
        outside = score is not None and threshold is not None and score > threshold
        status, message = Status.OK, _ok_message(choice, decoded)
        if outside:
            status = Status.NOT_ASSESSED
            message = (f"not assessed: the study lies outside the data model {self.engine.model_key} was trained on "
                       f"(domain score {score:.2f}, limit {threshold:.2f}); its scores cannot be trusted")
        result = replace(
            self._base(choice, status, message),
            n_slices=len(good), slices=tuple(d.ident for d in good), slice_probs=probs,
            smoothed_probs=agg.smoothed, study_probs=agg.scores, flags=agg.flags,
            key_slices=tuple(d.ident for d in keys), seconds=seconds, domain_score=score, domain_threshold=threshold,
        )
        images = StudyImages(thumbnails=tuple(d.thumb for d in good if d.thumb is not None))
        plan = None if outside else _KeyPlan(list(agg.key_slices), good, choice, result)
        return result, images, plan

    def _domain(self, features: np.ndarray) -> tuple[float | None, float | None]:
        check = self.engine.bundle.domain
        if check is None or not len(features):
            return None, None
        return check.study_score(features), check.threshold

    def features(self, choices: Iterable[SeriesChoice]) -> Iterator[tuple[SeriesChoice, tuple[SliceId, ...],
                                                                          np.ndarray, np.ndarray]]:
        """(choice, scored slices, raw slice probabilities, pooled features) for each study whose slices
        decoded; for fitting a domain check or calibration on the same path that runs studies."""
        for choice, _, decoded, probs, feats in self._score(choices):
            if len(feats):
                yield choice, tuple(d.ident for d in decoded if d.model_input is not None), probs, feats

    def _spacing(self, choice: SeriesChoice) -> float:
        """The spacing of a study's context slices: the card's, or the series' own."""
        card = self.engine.bundle.card
        return card.context_spacing_mm or context.series_spacing([ref.z for ref in choice.slices])

    def _key_slices(self, plans: list[_KeyPlan | None]) -> list[tuple[KeySlice, ...] | Exception]:
        """Each plan's key slices with the heat map of its flagged label (none when nothing is flagged),
        to be drawn where the reports are written: one explainer call per label for all the plans, or
        per plan where a joint call fails (that plan's exception in its place when its own call fails)."""
        heats: list[list[np.ndarray | None]] = [[None] * len(p.places) if p else [] for p in plans]
        failed: dict[int, Exception] = {}
        by_label: dict[str, list[tuple[int, _KeyPlan]]] = {}
        for n, plan in enumerate(plans):
            if plan is not None and plan.places and plan.label:
                by_label.setdefault(plan.label, []).append((n, plan))
        for label, members in by_label.items():
            together, into = [plan for _, plan in members], [heats[n] for n, _ in members]
            if len(members) > 1 and self._joint_heat_maps(label, together, into):
                continue
            for n, plan in members:  # each alone, so that a failure is its own study's
                try:
                    self._heat_maps(label, [plan], [heats[n]])
                except Exception as exc:
                    log.exception("a study's heat maps failed")
                    failed[n] = exc
        return [failed[n] if n in failed else () if plan is None else
                tuple(KeySlice(d.ident, d.ref, heat, plan.label) for d, heat in zip(plan.slices, heats[n]))
                for n, plan in enumerate(plans)]

    def _joint_heat_maps(self, label: str, plans: list[_KeyPlan], into: list[list[np.ndarray | None]]) -> bool:
        try:
            self._heat_maps(label, plans, into)
            return True
        except Exception:
            log.exception("heat maps of %d studies in one call failed; each study's are made alone", len(plans))
            return False

    def _heat_maps(self, label: str, plans: list[_KeyPlan], into: list[list[np.ndarray | None]]) -> None:
        """The label's maps on the plans' key slices, in one call; each scaled by its slice's smoothed score."""
        card = self.engine.bundle.card
        k, spacings = card.context, [self._spacing(plan.choice) for plan in plans]  # once a study, not a slice
        stacks = np.stack([context.stack(plan.good, place, k, spacing)
                           for plan, spacing in zip(plans, spacings) for place in plan.places])
        shapes = iter(self.engine.explainer.maps(model_input(stacks, card.input_spec), card.output_index(label)))
        column = card.outputs.index(label)
        for plan, heats in zip(plans, into):
            assert plan.result.smoothed_probs is not None
            for n, place in enumerate(plan.places):
                heats[n] = next(shapes) * float(plan.result.smoothed_probs[place, column])

    def _base(self, choice: SeriesChoice, status: Status, message: str) -> StudyResult:
        return base_result(choice, self.engine.bundle.card, self.engine.tta, self.engine.explainer.describe(),
                           status, message)

    def _failed(self, choice: SeriesChoice, message: str) -> StudyResult:
        return self._base(choice, Status.FAILED, message)


def base_result(choice: SeriesChoice, card: ModelCard, tta: int, heatmap: str, status: Status,
                message: str) -> StudyResult:
    """A study's result before scores: who it is, which series, which model. Also what an engine that
    lost a study (a Ray worker gone too often) records for it."""
    return StudyResult(
        study=choice.study, status=status, message=message,
        series_uid=choice.series.series_uid if choice.series else "",
        series_description=choice.series.description if choice.series else "",
        source_path=choice.slices[0].path if choice.slices else "",
        labels=card.labels, outputs=card.outputs, warnings=choice.warnings,
        model=card.name, model_version=card.version, model_trained=card.trained,
        model_trained_on=card.trained_on, tta=tta, heatmap=heatmap,
        instances_digest=choice.instances_digest, thresholds=dict(card.thresholds), source=_source(choice),
    )


def _source(choice: SeriesChoice) -> str:
    """A plain image's relative path; '' for DICOM."""
    return choice.series.instances[0].source if choice.series and choice.series.instances else ""


def _done(pending: deque[Future[T]]) -> list[T]:
    """The first pending result (waited for) and every one after it that is done, in order."""
    group = [pending.popleft().result()]
    while pending and pending[0].done():
        group.append(pending.popleft().result())
    return group


def heat_label(result: StudyResult) -> str:
    """The label a study's heat maps explain: 'any' when flagged, else the highest flagged subtype; '' if none."""
    flagged = [label for label in result.outputs if result.flags.get(label)]
    if not flagged:
        return ""
    if "any" in flagged:
        return "any"
    return max(flagged, key=lambda label: result.study_probs.get(label) or 0.0)


def decode_jobs(study: int, choice: SeriesChoice, size: int) -> Iterator[DecodeJob]:
    """The decoding work of one study, its slices in series order."""
    for k, ref in enumerate(choice.slices, 1):
        yield DecodeJob(study, slice_id(k, ref), ref, size)


def slice_id(index: int, ref: SliceRef) -> SliceId:
    return SliceId(index, ref.sop_uid, ref.instance_number, round(ref.z, 3), ref.frame)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def _ok_message(choice: SeriesChoice, decoded: list[Decoded]) -> str:
    notes = list(choice.warnings)
    failed = [d for d in decoded if d.error]
    if failed:
        notes.append(f"{len(failed)} slice(s) could not be decoded and were left out")
    notes.extend(sorted({w for d in decoded for w in d.warnings}))
    return "; ".join(notes)
