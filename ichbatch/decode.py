"""Stage 3, as run for the study path: one slice decoded, checked and reduced to the model's input.

This runs in worker processes (ichbatch.workers), so it imports nothing heavy and returns small arrays:
the model input (int16 at the card's size) and a thumbnail, never the full-size slice.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .config import BRAIN
from .domain import SliceId, SliceRef
from .errors import DecodeError
from .pixels import load_hu
from .preprocess import resize_hu, to_uint8

THUMB = 96


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
    thumb = to_uint8(resize_hu(hs.hu, THUMB), BRAIN)
    return Decoded(job.study, job.ident, job.ref, resize_hu(hs.hu, job.size), thumb, hs.warnings)


def failed(job: DecodeJob, reason: str) -> Decoded:
    return Decoded(job.study, job.ident, job.ref, None, None, (), reason)


def crashed(job: DecodeJob, reason: str) -> Decoded:
    """What the worker pool reports for a slice whose decoder process died."""
    return failed(job, f"{job.ref.path}: {reason}")
