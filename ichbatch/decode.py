"""Stage 3, as run for the study path: one slice decoded, checked and reduced to the model's input;
and, once a study is scored, its few key slices decoded again and rendered for the reports.

This runs in worker processes (ichbatch.workers), so it imports nothing heavy. A scored slice comes back
small (the model input, int16 at the card's size, and a thumbnail), never at full size; only the key
slices come back at full size, as the uint8 images the reports show.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BONE, BRAIN, SUBDURAL
from .domain import SliceId, SliceRef
from .errors import DecodeError
from .pixels import load_hu
from .preprocess import resize_hu, to_uint8

THUMB = 96  # made from the model input when that is at least as large: from 512 px it cost 0.3 ms more a slice


@dataclass(frozen=True)
class DecodeJob:
    study: int  # place of the study in the stream
    ident: SliceId
    ref: SliceRef
    size: int  # the model's input size


@dataclass(frozen=True)
class Decoded:
    study: int
    ident: SliceId
    ref: SliceRef
    model_input: np.ndarray | None
    thumb: np.ndarray | None
    warnings: tuple[str, ...]
    error: str = ""

    @property
    def z(self) -> float:
        """Position along the head axis (mm), for choosing slice context."""
        return self.ref.z


def decode_slice(job: DecodeJob) -> Decoded:
    """Never raises: a file that cannot be decoded is a Decoded with an error, not a failed batch."""
    try:
        hs = load_hu(job.ref)
    except DecodeError as exc:
        return failed(job, str(exc))
    except MemoryError:
        return failed(job, f"{job.ref.path}: decoding needs more memory than a decoder process may use")
    except Exception as exc:  # a decoder bug is one bad file
        return failed(job, f"{job.ref.path}: {type(exc).__name__}: {exc}")
    model_input = resize_hu(hs.hu, job.size)
    thumb = to_uint8(resize_hu(model_input if job.size >= THUMB else hs.hu, THUMB), BRAIN)
    return Decoded(job.study, job.ident, job.ref, model_input, thumb, hs.warnings)


def failed(job: DecodeJob, reason: str) -> Decoded:
    return Decoded(job.study, job.ident, job.ref, None, None, (), reason)


def crashed(job: DecodeJob, reason: str) -> Decoded:
    """What the worker pool reports for a slice whose decoder process died."""
    return failed(job, f"{job.ref.path}: {reason}")


@dataclass(frozen=True)
class RenderJob:
    ref: SliceRef
    heat: np.ndarray | None  # the heat map to overlay, [0, 1] at any size; None: nothing flagged


@dataclass(frozen=True)
class Rendered:
    """A key slice at full resolution: brain window, the overlay on it, subdural and bone windows."""

    brain: np.ndarray | None
    overlay: np.ndarray | None
    subdural: np.ndarray | None
    bone: np.ndarray | None
    error: str = ""


def render_key_slice(job: RenderJob) -> Rendered:
    """Decoded again at full resolution: keeping every slice's full-size HU would make memory grow with
    the study, and only these few are shown. In a worker process, so the study path's threads, which
    share one interpreter lock with the model's, do not parse DICOM. Never raises."""
    from .model.gradcam import overlay  # light: OpenCV and numpy

    try:
        hu = load_hu(job.ref).hu
    except Exception as exc:  # it decoded for the model a moment ago: the file changed or went away
        return render_failed(job, f"{type(exc).__name__}: {exc}")
    brain = to_uint8(hu, BRAIN)
    shown = None if job.heat is None else overlay(brain, job.heat)
    return Rendered(brain, shown, to_uint8(hu, SUBDURAL), to_uint8(hu, BONE))


def render_failed(job: RenderJob, reason: str) -> Rendered:
    return Rendered(None, None, None, None, f"{job.ref.path}: key image could not be made: {reason}")
