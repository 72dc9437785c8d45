"""Stage 3, as run for the study path: one slice decoded, checked and reduced to the model's input;
and, where a study's reports are written, its few key slices decoded again and drawn for them.

This runs in worker processes (ichbatch.workers, the report writers' processes), so it imports nothing
heavy. A scored slice comes back small (the model input, int16 at the card's size, and a thumbnail),
never at full size; only the key slices are read at full size, by the process that writes the reports.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .config import BONE, BRAIN, SUBDURAL
from .domain import KeyImage, KeySlice, SliceId, SliceRef, StudyImages
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


def draw_key_images(images: StudyImages) -> StudyImages:
    """A study's key slices read again at full size and drawn, where its reports are written (a writer
    process, a Ray task): keeping every slice at full size would make memory grow with the study, and
    only these few are shown. Raises DecodeError when one cannot be read again (it was scored a moment
    ago: the file changed or went away)."""
    if not images.to_draw:
        return images
    drawn = tuple(_draw(key) for key in images.to_draw)
    return replace(images, key_images=images.key_images + drawn, to_draw=())


def _draw(key: KeySlice) -> KeyImage:
    """Brain, subdural and bone windows at full size, and the heat map on the brain window."""
    from .model.gradcam import overlay  # light: OpenCV and numpy

    try:
        hu = load_hu(key.ref).hu
    except Exception as exc:
        raise DecodeError(f"{key.ref.path}: key image could not be made: {type(exc).__name__}: {exc}") from exc
    brain = to_uint8(hu, BRAIN)
    shown = None if key.heat is None else overlay(brain, key.heat)
    return KeyImage(key.slice, brain, shown, to_uint8(hu, SUBDURAL), to_uint8(hu, BONE), key.heat_label)
