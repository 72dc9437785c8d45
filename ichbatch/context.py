"""Stage 3c: slice context (2.5D). A card with `context: k` feeds each slice with its neighbours
s-k..s+k as channels; this module picks them and stacks them, in the streaming path.

Neighbours are chosen by position along the head axis, never by file or arrival order: for offset j the
slice nearest to z_s + j * spacing (the card's expected spacing, or the series' own), among the slices
that decoded. Past either end of the series that is the edge slice, so edges repeat. Where a slice is
missing, a tie between the slices either side goes to the one further out, so a neighbour channel never
shows the centre slice when another slice is as near.

Decoded slices arrive in position order (series selection sorts them), so a slice's context is complete
as soon as a slice at or beyond its last target has arrived: memory stays within one study.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol, TypeVar

import numpy as np


class HasSlice(Protocol):
    """What context needs of a decoded slice (decode.Decoded)."""

    @property
    def study(self) -> int: ...

    @property
    def model_input(self) -> np.ndarray | None: ...

    @property
    def z(self) -> float: ...


T = TypeVar("T", bound=HasSlice)


def series_spacing(zs: Sequence[float]) -> float:
    """The median gap between consecutive slice positions (mm); 1.0 when it cannot be measured."""
    gaps = np.diff(np.sort(np.asarray(zs, np.float64)))
    gaps = gaps[gaps > 1e-6]
    return float(np.median(gaps)) if len(gaps) else 1.0


def neighbours(zs: Sequence[float], i: int, k: int, spacing: float) -> list[int]:
    """Indices into zs (ascending) of the slices for offsets -k..k around slice i."""
    out = []
    for j in range(-k, k + 1):
        if j == 0:
            out.append(i)
            continue
        target = zs[i] + j * spacing
        hi = bisect.bisect_left(zs, target)
        candidates = [c for c in (hi - 1, hi) if 0 <= c < len(zs)]
        # Nearest first; on a tie, the slice further from the centre in the offset's direction.
        out.append(min(candidates, key=lambda c: (round(abs(zs[c] - target), 6), -c if j > 0 else c)))
    return out


def stack(slices: Sequence[HasSlice], i: int, k: int, spacing: float, zs: Sequence[float] | None = None) -> np.ndarray:
    """(2k+1, S, S) int16: slice i with its neighbours, from slices of one study in position order
    (zs: their positions, when the caller already has them)."""
    zs = [s.z for s in slices] if zs is None else zs
    return np.stack([_pixels(slices[c]) for c in neighbours(zs, i, k, spacing)])


def _pixels(item: HasSlice) -> np.ndarray:
    assert item.model_input is not None
    return item.model_input


def assemble(items: Iterable[T], k: int, spacing_of: Callable[[int], float]) -> Iterator[tuple[T, np.ndarray]]:
    """Decoded slices (position order within each study, studies one after another) -> (slice, stack),
    in the same order. spacing_of(study) gives the spacing of the study's neighbours."""
    if k == 0:
        for item in items:
            yield item, _pixels(item)[None]
        return
    study: list[T] = []
    zs: list[float] = []  # their positions, kept beside them: read once per slice
    emitted = 0
    spacing = 1.0
    for item in items:
        if study and item.study != study[0].study:
            yield from _emit(study, zs, emitted, len(study), k, spacing)
            study, zs, emitted = [], [], 0
        if not study:
            spacing = spacing_of(item.study)
        study.append(item)
        zs.append(item.z)
        ready = emitted
        while ready < len(study) and zs[-1] >= zs[ready] + k * spacing - 1e-6:
            ready += 1  # every target of slice `ready` is at or below the newest slice
        yield from _emit(study, zs, emitted, ready, k, spacing)
        emitted = ready
    if study:
        yield from _emit(study, zs, emitted, len(study), k, spacing)


def _emit(study: list[T], zs: list[float], start: int, stop: int, k: int,
          spacing: float) -> Iterator[tuple[T, np.ndarray]]:
    for i in range(start, stop):
        yield study[i], stack(study, i, k, spacing, zs)
