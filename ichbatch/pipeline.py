"""The stages in order: discover -> group and select -> decode -> infer -> aggregate -> report.

`run` (batch) and `watch` both call process_studies(). A problem with one file or one study becomes a
status and a message in its result; only a problem that affects every study (an unloadable model)
raises.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .aggregate import aggregate
from .config import BONE, BRAIN, DEFAULT_RULES, SUBDURAL, SelectionRules
from .discover import Discovery, discover
from .domain import FileIssue, SeriesChoice, SliceRef, Status, StudyResult
from .errors import DecodeError
from .infer import Predictor, default_device, default_tta, default_workers, prefetch_map
from .model.bundle import Bundle, load_bundle
from .model.gradcam import CamExplainer, overlay
from .pixels import load_hu
from .preprocess import resize_hu, to_uint8, windows_np
from .series import choose_series, group_studies

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


@dataclass
class RunSummary:
    results: list[StudyResult] = field(default_factory=list)
    file_issues: list[FileIssue] = field(default_factory=list)
    n_slices: int = 0
    seconds: float = 0.0

    def count(self, status: Status) -> int:
        return sum(r.status == status for r in self.results)

    @property
    def slices_per_second(self) -> float:
        return self.n_slices / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class _Decoded:
    study: int
    index: int
    ref: SliceRef
    model_input: np.ndarray | None
    thumb: np.ndarray | None
    warnings: tuple[str, ...]
    error: str = ""


class Engine:
    """A loaded model with its predictor and explainer, reused across studies (and by watch)."""

    def __init__(self, settings: RunSettings) -> None:
        self.settings = settings
        device = default_device() if settings.device == "auto" else settings.device
        self.precision = resolve_precision(settings.precision, device)
        self.bundle: Bundle = load_bundle(settings.model, self.precision)
        self.tta = settings.tta or default_tta(device)
        self.predictor = Predictor(self.bundle, self.tta, settings.batch_size)
        card = self.bundle.card
        self.explainer = CamExplainer(self.bundle.model, card.cam_layer, card.cam_augment, card.cam_method)


def resolve_precision(precision: str, device: str) -> str:
    """bfloat16 halves memory traffic on tensor-core GPUs; on a CPU it is slower, so float32 there."""
    if precision == "auto":
        return "bfloat16" if device == "gpu" else "float32"
    if precision not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"precision must be auto, float32, bfloat16 or float16. Received: {precision!r}")
    return precision


def select(discovery: Discovery, rules: SelectionRules) -> list[SeriesChoice]:
    return [choose_series(series, rules) for series in group_studies(discovery.instances).values()]


def process_folder(
    inputs: Iterable[str | Path],
    settings: RunSettings,
    on_result: Callable[[StudyResult], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RunSummary:
    """Run everything under the inputs. on_result is called as each study finishes."""
    start = time.perf_counter()
    discovery = discover(inputs, progress=(lambda n: progress("reading headers", n, 0)) if progress else None)
    choices = select(discovery, settings.rules)
    engine = Engine(settings)
    summary = process_studies(choices, engine, on_result, progress)
    summary.file_issues[:0] = discovery.issues
    summary.seconds = time.perf_counter() - start
    return summary


def process_studies(
    choices: list[SeriesChoice],
    engine: Engine,
    on_result: Callable[[StudyResult], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> RunSummary:
    summary = RunSummary()
    emit = _emitter(summary, on_result)
    runnable = []
    for choice in choices:
        if choice.series is None:
            emit(_skipped(choice, engine))
        else:
            runnable.append(choice)
    total = sum(len(c.slices) for c in runnable)
    done = 0
    started = time.perf_counter()
    for i, (choice, decoded, probs) in enumerate(_score(runnable, engine, summary)):
        done += len(choice.slices)
        if progress:
            progress("scoring slices", done, total)
        try:
            result = finish_study(choice, decoded, probs, engine, time.perf_counter() - started)
        except Exception as exc:  # one study's failure must not stop the batch
            log.exception("study %d failed while finishing", i)
            result = _failed(choice, engine, f"{type(exc).__name__}: {exc}")
        started = time.perf_counter()
        emit(result)
    return summary


def _emitter(summary: RunSummary, on_result: Callable[[StudyResult], None] | None):  # type: ignore[no-untyped-def]
    def emit(result: StudyResult) -> None:
        summary.results.append(result)
        if on_result:
            on_result(result)

    return emit


def _score(
    runnable: list[SeriesChoice], engine: Engine, summary: RunSummary
) -> Iterator[tuple[SeriesChoice, list[_Decoded], np.ndarray]]:
    """Stream every slice of every runnable study through the model; yield each study when complete."""
    size = engine.bundle.card.input_size
    jobs = ((i, j, ref) for i, c in enumerate(runnable) for j, ref in enumerate(c.slices))
    decoded = prefetch_map(lambda job: _decode(job, size), jobs, engine.settings.workers,
                           depth=4 * engine.settings.batch_size)
    per_study: dict[int, list[_Decoded]] = {i: [] for i in range(len(runnable))}
    probs: dict[int, list[np.ndarray]] = {i: [] for i in range(len(runnable))}

    def ok_items() -> Iterator[tuple[_Decoded, np.ndarray]]:
        for d in decoded:
            per_study[d.study].append(d)
            if d.model_input is None:
                summary.file_issues.append(FileIssue(d.ref.path, Status.FAILED, d.error))
            else:
                summary.n_slices += 1
                yield d, d.model_input

    current = 0
    for d, p in engine.predictor.stream(ok_items()):
        while d.study > current:  # all of the earlier study's slices have passed through the model
            yield runnable[current], per_study.pop(current), _stack(probs.pop(current))
            current += 1
        probs[d.study].append(p)
    for i in range(current, len(runnable)):
        yield runnable[i], per_study.pop(i), _stack(probs.pop(i))


def _stack(rows: list[np.ndarray]) -> np.ndarray:
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)


def _decode(job: tuple[int, int, SliceRef], size: int) -> _Decoded:
    i, j, ref = job
    try:
        hs = load_hu(ref)
    except DecodeError as exc:
        return _Decoded(i, j, ref, None, None, (), str(exc))
    except Exception as exc:  # a decoder crash is one bad file, not a bad batch
        return _Decoded(i, j, ref, None, None, (), f"{ref.path}: {type(exc).__name__}: {exc}")
    thumb = to_uint8(resize_hu(hs.hu, THUMB), BRAIN)
    return _Decoded(i, j, ref, resize_hu(hs.hu, size), thumb, hs.warnings)


def finish_study(
    choice: SeriesChoice, decoded: list[_Decoded], probs: np.ndarray, engine: Engine, seconds: float
) -> StudyResult:
    good = [d for d in decoded if d.model_input is not None]
    n = len(choice.slices)
    if len(good) < max(engine.settings.rules.min_slices, MIN_DECODED_FRACTION * n):
        first = next((d.error for d in decoded if d.error), "no slices decoded")
        return _failed(choice, engine, f"{n - len(good)} of {n} slices could not be decoded; first: {first}")
    card = engine.bundle.card
    agg = aggregate(probs, card.outputs, card.labels, card.thresholds,
                    engine.settings.aggregate, engine.settings.topk)
    result = _base_result(choice, engine, Status.OK, _ok_message(choice, decoded))
    result.n_slices = len(good)
    result.slice_probs = probs
    result.smoothed_probs = agg.smoothed
    result.study_probs, result.flags, result.key_slices = agg.scores, agg.flags, agg.key_slices
    result.slice_z = tuple(d.ref.z for d in good)
    result.thumbnails = [d.thumb for d in good if d.thumb is not None]
    result.key_images = _key_images([good[k] for k in agg.key_slices], agg.key_slices, engine)
    result.seconds = seconds
    return result


def _ok_message(choice: SeriesChoice, decoded: list[_Decoded]) -> str:
    notes = list(choice.warnings)
    failed = [d for d in decoded if d.error]
    if failed:
        notes.append(f"{len(failed)} slice(s) could not be decoded and were left out")
    warnings = sorted({w for d in decoded for w in d.warnings})
    notes.extend(warnings)
    return "; ".join(notes)


def _key_images(slices: list[_Decoded], indices: tuple[int, ...], engine: Engine) -> dict[int, dict[str, np.ndarray]]:
    """Brain window, class-activation overlay on it, and the three windows, for each key slice."""
    card = engine.bundle.card
    label = "any" if "any" in card.outputs else card.outputs[0]
    inputs = np.stack([windows_np(d.model_input, card.windows) for d in slices])
    maps = engine.explainer.maps(inputs.astype(np.float32), card.outputs.index(label))
    images: dict[int, dict[str, np.ndarray]] = {}
    for d, idx, heat in zip(slices, indices, maps):
        # Decoded again at full resolution: keeping every slice's full-size HU would make memory grow
        # with the study, and only these few are shown.
        hu = load_hu(d.ref).hu
        brain = to_uint8(hu, BRAIN)
        images[idx] = {
            "brain": brain,
            "gradcam": overlay(brain, heat),
            "subdural": to_uint8(hu, SUBDURAL),
            "bone": to_uint8(hu, BONE),
        }
    return images


def _base_result(choice: SeriesChoice, engine: Engine, status: Status, message: str) -> StudyResult:
    card = engine.bundle.card
    return StudyResult(
        study=choice.study,
        status=status,
        message=message,
        series_uid=choice.series.series_uid if choice.series else "",
        series_description=choice.series.description if choice.series else "",
        source_path=choice.slices[0].path if choice.slices else "",
        n_slices=len(choice.slices),
        labels=card.labels,
        outputs=card.outputs,
        warnings=choice.warnings,
        model=card.name,
        model_version=card.version,
        model_trained=card.trained,
        model_trained_on=card.trained_on,
        tta=engine.tta,
        heatmap=engine.explainer.describe(),
    )


def _skipped(choice: SeriesChoice, engine: Engine) -> StudyResult:
    result = _base_result(choice, engine, Status.SKIPPED, choice.message)
    result.n_slices = 0
    return result


def _failed(choice: SeriesChoice, engine: Engine, message: str) -> StudyResult:
    return _base_result(choice, engine, Status.FAILED, message)
