"""The study path: a selected series -> decoded slices -> scores -> study result -> written outputs.

`run`, `watch` and every later front end call StudyPath; nothing else decodes, scores or writes a study.
A stream of studies goes through the same steps as one study, with the next study's slices decoding
while the current one is scored. Each study ends as a small frozen StudyResult; its key images and
heat maps (StudyImages) live only until the writer has used them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from .aggregate import aggregate
from .config import BONE, BRAIN, DEFAULT_RULES, SUBDURAL, SelectionRules
from .domain import FileIssue, KeyImage, SeriesChoice, SliceId, SliceRef, Status, StudyImages, StudyResult
from .errors import DecodeError
from .infer import Predictor, default_device, default_tta, default_workers, prefetch_map
from .model.backend import import_backend
from .model.bundle import Bundle, load_bundle
from .model.gradcam import CamExplainer, overlay
from .pixels import load_hu
from .preprocess import resize_hu, to_uint8, windows_np

log = logging.getLogger(__name__)
THUMB = 96
MIN_DECODED_FRACTION = 0.5


@dataclass(frozen=True)
class RunSettings:
    model: str
    tta: int | None = None  # None: chosen for the device
    batch_size: int = 16
    device: str = "auto"
    aggregate: str = "max"
    topk: int = 3
    rules: SelectionRules = DEFAULT_RULES
    workers: int = field(default_factory=default_workers)
    precision: str = "auto"  # auto: bfloat16 compute on a GPU, float32 on a CPU


class Engine:
    """A loaded model with its predictor and explainer, reused across studies (and by watch)."""

    def __init__(self, settings: RunSettings) -> None:
        import_backend()
        self.settings = settings
        device = default_device() if settings.device == "auto" else settings.device
        self.precision = resolve_precision(settings.precision, device)
        self.bundle: Bundle = load_bundle(settings.model, self.precision)
        self.tta = settings.tta or default_tta(device)
        self.predictor = Predictor(self.bundle, self.tta, settings.batch_size)
        card = self.bundle.card
        self.explainer = CamExplainer(self.bundle.model, card.cam_layer, card.cam_augment, card.cam_method)

    @property
    def model_key(self) -> str:
        """What --resume compares: a result from another model or version is not reused."""
        return f"{self.bundle.card.name} {self.bundle.card.version}"


def resolve_precision(precision: str, device: str) -> str:
    """bfloat16 halves memory traffic on tensor-core GPUs; on a CPU it is slower, so float32 there."""
    if precision == "auto":
        return "bfloat16" if device == "gpu" else "float32"
    if precision not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"precision must be auto, float32, bfloat16 or float16. Received: {precision!r}")
    return precision


class StudySink(Protocol):
    """Where a study's outputs go (report.outputs.OutputWriter); tests and libraries may bring their own."""

    def write(self, result: StudyResult, images: StudyImages) -> StudyResult: ...

    def record_file_issue(self, issue: FileIssue) -> None: ...


@dataclass(frozen=True)
class _Decoded:
    study: int
    ident: SliceId
    ref: SliceRef
    model_input: np.ndarray | None
    thumb: np.ndarray | None
    warnings: tuple[str, ...]
    error: str = ""


class StudyPath:
    """Selected series to written outputs. `process` takes one study; `process_many` a stream of them."""

    def __init__(self, engine: Engine, sink: StudySink | None = None,
                 on_slices: Callable[[int], None] | None = None) -> None:
        self.engine = engine
        self.sink = sink
        self.on_slices = on_slices  # called with the number of slices scored, for progress
        self.n_slices = 0

    def process(self, choice: SeriesChoice) -> StudyResult:
        return next(iter(self.process_many([choice])))

    def process_many(self, choices: Iterable[SeriesChoice]) -> Iterator[StudyResult]:
        """Each study's result once its outputs are written, in input order."""
        started = time.perf_counter()
        for choice, decoded, probs in self._score(choices):
            try:
                result, images = self._finish(choice, decoded, probs, time.perf_counter() - started)
            except Exception as exc:  # one study's failure must not stop the batch
                log.exception("a study failed while finishing")
                result, images = self._failed(choice, f"{type(exc).__name__}: {exc}"), StudyImages()
            yield self._write(result, images)
            started = time.perf_counter()

    def _write(self, result: StudyResult, images: StudyImages) -> StudyResult:
        return self.sink.write(result, images) if self.sink else result

    def _score(self, choices: Iterable[SeriesChoice]) -> Iterator[tuple[SeriesChoice, list[_Decoded], np.ndarray]]:
        """Stream the slices of every runnable study through the model; yield each study when complete.

        Studies with no usable series pass straight through, in order, with no slices.
        """
        size = self.engine.bundle.card.input_size
        order: dict[int, SeriesChoice] = {}  # studies whose slices are in flight; a few at a time

        def jobs() -> Iterator[tuple[int, SliceId, SliceRef]]:
            for i, choice in enumerate(choices):
                order[i] = choice
                for k, ref in enumerate(choice.slices, 1):
                    yield i, slice_id(k, ref), ref

        decoded = prefetch_map(lambda job: _decode(job, size), jobs(), self.engine.settings.workers,
                               depth=4 * self.engine.settings.batch_size)
        per_study: dict[int, list[_Decoded]] = {}
        probs: dict[int, list[np.ndarray]] = {}

        def ok_items() -> Iterator[tuple[_Decoded, np.ndarray]]:
            for d in decoded:
                per_study.setdefault(d.study, []).append(d)
                if d.model_input is None:
                    if self.sink:
                        self.sink.record_file_issue(FileIssue(d.ref.path, Status.FAILED, d.error))
                else:
                    yield d, d.model_input

        current = 0
        for d, p in self.engine.predictor.stream(ok_items()):
            while d.study > current:  # every slice of the earlier studies has passed through the model
                yield order.pop(current), per_study.pop(current, []), _stack(probs.pop(current, []))
                current += 1
            probs.setdefault(d.study, []).append(p)
            self.n_slices += 1
            if self.on_slices:
                self.on_slices(1)
        while order:
            yield order.pop(current), per_study.pop(current, []), _stack(probs.pop(current, []))
            current += 1

    def _finish(self, choice: SeriesChoice, decoded: list[_Decoded], probs: np.ndarray,
                seconds: float) -> tuple[StudyResult, StudyImages]:
        if choice.series is None:
            return self._base(choice, Status.SKIPPED, choice.message), StudyImages()
        good = [d for d in decoded if d.model_input is not None]
        n = len(choice.slices)
        if len(good) < max(self.engine.settings.rules.min_slices, MIN_DECODED_FRACTION * n):
            first = next((d.error for d in decoded if d.error), "no slices decoded")
            return self._failed(choice, f"{n - len(good)} of {n} slices could not be decoded; first: {first}"), StudyImages()
        card = self.engine.bundle.card
        settings = self.engine.settings
        agg = aggregate(probs, card.outputs, card.labels, card.thresholds, settings.aggregate, settings.topk)
        keys = [good[k] for k in agg.key_slices]
        result = replace(
            self._base(choice, Status.OK, _ok_message(choice, decoded)),
            n_slices=len(good), slices=tuple(d.ident for d in good), slice_probs=probs,
            smoothed_probs=agg.smoothed, study_probs=agg.scores, flags=agg.flags,
            key_slices=tuple(d.ident for d in keys), seconds=seconds,
        )
        images = StudyImages(thumbnails=tuple(d.thumb for d in good if d.thumb is not None),
                             key_images=self._key_images(keys))
        return result, images

    def _key_images(self, slices: list[_Decoded]) -> tuple[KeyImage, ...]:
        """Brain window, class-activation overlay on it, and the three windows, for each key slice."""
        if not slices:
            return ()
        card = self.engine.bundle.card
        label = "any" if "any" in card.outputs else card.outputs[0]
        inputs = np.stack([windows_np(d.model_input, card.windows) for d in slices if d.model_input is not None])
        maps = self.engine.explainer.maps(inputs.astype(np.float32), card.outputs.index(label))
        images = []
        for d, heat in zip(slices, maps):
            # Decoded again at full resolution: keeping every slice's full-size HU would make memory grow
            # with the study, and only these few are shown.
            hu = load_hu(d.ref).hu
            brain = to_uint8(hu, BRAIN)
            images.append(KeyImage(d.ident, brain, overlay(brain, heat), to_uint8(hu, SUBDURAL), to_uint8(hu, BONE)))
        return tuple(images)

    def _base(self, choice: SeriesChoice, status: Status, message: str) -> StudyResult:
        card = self.engine.bundle.card
        return StudyResult(
            study=choice.study, status=status, message=message,
            series_uid=choice.series.series_uid if choice.series else "",
            series_description=choice.series.description if choice.series else "",
            source_path=choice.slices[0].path if choice.slices else "",
            labels=card.labels, outputs=card.outputs, warnings=choice.warnings,
            model=card.name, model_version=card.version, model_trained=card.trained,
            model_trained_on=card.trained_on, tta=self.engine.tta, heatmap=self.engine.explainer.describe(),
            instances_digest=choice.instances_digest,
        )

    def _failed(self, choice: SeriesChoice, message: str) -> StudyResult:
        return self._base(choice, Status.FAILED, message)


def slice_id(index: int, ref: SliceRef) -> SliceId:
    return SliceId(index, ref.sop_uid, ref.instance_number, round(ref.z, 3), ref.frame)


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def _decode(job: tuple[int, SliceId, SliceRef], size: int) -> _Decoded:
    i, ident, ref = job
    try:
        hs = load_hu(ref)
    except DecodeError as exc:
        return _Decoded(i, ident, ref, None, None, (), str(exc))
    except Exception as exc:  # a decoder crash is one bad file, not a bad batch
        return _Decoded(i, ident, ref, None, None, (), f"{ref.path}: {type(exc).__name__}: {exc}")
    thumb = to_uint8(resize_hu(hs.hu, THUMB), BRAIN)
    return _Decoded(i, ident, ref, resize_hu(hs.hu, size), thumb, hs.warnings)


def _ok_message(choice: SeriesChoice, decoded: list[_Decoded]) -> str:
    notes = list(choice.warnings)
    failed = [d for d in decoded if d.error]
    if failed:
        notes.append(f"{len(failed)} slice(s) could not be decoded and were left out")
    notes.extend(sorted({w for d in decoded for w in d.warnings}))
    return "; ".join(notes)
