"""Training data as a stream: slices decoded as training reads them, never all held at once.

The RSNA 2019 training set is 752,803 slices, about 150 GB at 256 px once decoded; reading it into one
array first does not fit. Here a training source is a small index (one file path, label row and
patient per slice) and SliceReader turns index positions into uint8 window images in order: decoded
in worker processes sized to the machine (ichbatch.workers, the same capped processes that decode for
`run`), or read back from an on-disk cache of decoded slices written during the first pass. Memory
holds one batch per worker and a bounded read-ahead, whatever the size of the data set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import DEFAULT_WINDOWS
from .domain import SliceRef
from .preprocess import resize_hu, windows_np
from .workers import IsolatedPool, chunk_for

DEPTH = 64  # slices decoded ahead of training

def hu_to_channels(hu: np.ndarray, size: int) -> np.ndarray:
    """The same windows the inference path builds on the device, here in numpy as uint8."""
    return (windows_np(resize_hu(hu, size), DEFAULT_WINDOWS) * 255 + 0.5).astype(np.uint8)


@dataclass(frozen=True)
class SliceJob:
    path: str
    size: int


@dataclass(frozen=True)
class SliceImage:
    image: np.ndarray | None  # (size, size, 3) uint8
    error: str = ""


def decode_training_slice(job: SliceJob) -> SliceImage:
    """Runs in a worker process. A file that cannot be decoded is an error result, not a stopped training."""
    from .pixels import load_hu

    try:
        return SliceImage(hu_to_channels(load_hu(SliceRef(job.path, None, (0.0, 0.0, 0.0), 0.0)).hu, job.size))
    except Exception as exc:
        return SliceImage(None, f"{Path(job.path).name}: {type(exc).__name__}: {exc}")


def _crashed(job: SliceJob, reason: str) -> SliceImage:
    return SliceImage(None, f"{Path(job.path).name}: {reason}")


class SliceCache:
    """Decoded slices on disk: one raw uint8 file of n x size x size x 3, and a done flag per slice.

    Read and written with pread/pwrite, not mapped, so reading the cache does not grow the process.
    A slice is flagged done only after its bytes are written; a cache cut short by a killed run is
    simply refilled where flags are missing. The cache is keyed by the source index and size.
    """

    def __init__(self, folder: Path, key: str, n: int, size: int) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.record = size * size * 3
        self.shape = (size, size, 3)
        self.n = n
        data, flags = folder / f"{key}.u8", folder / f"{key}.done"
        self.data = os.open(data, os.O_RDWR | os.O_CREAT, 0o644)
        self.flags = os.open(flags, os.O_RDWR | os.O_CREAT, 0o644)
        if os.fstat(self.flags).st_size != n:
            os.ftruncate(self.flags, 0)
            os.ftruncate(self.flags, n)
            os.ftruncate(self.data, n * self.record)

    def complete(self) -> bool:
        chunk = 1 << 20
        return all(os.pread(self.flags, min(chunk, self.n - start), start).count(b"\x00") == 0
                   for start in range(0, self.n, chunk))

    def read(self, i: int) -> np.ndarray:
        return np.frombuffer(os.pread(self.data, self.record, i * self.record), np.uint8).reshape(self.shape)

    def write(self, i: int, image: np.ndarray) -> None:
        os.pwrite(self.data, np.ascontiguousarray(image, np.uint8).tobytes(), i * self.record)
        os.pwrite(self.flags, b"\x01", i)

    def close(self) -> None:
        os.close(self.data)
        os.close(self.flags)


class SliceReader:
    """uint8 window images for index positions, in order: from memory, from the cache, or decoded."""

    def __init__(self, size: int, *, images: np.ndarray | None = None, paths: np.ndarray | None = None,
                 workers: int = 1, cache: SliceCache | None = None) -> None:
        if (images is None) == (paths is None):
            raise ValueError("give the images or the paths of the slices")
        self.size = size
        self.images, self.paths = images, paths
        self.cache = cache
        self.pool: IsolatedPool[SliceJob, SliceImage] | None = None
        if paths is not None:
            self.pool = IsolatedPool(decode_training_slice, _crashed, workers, chunk=chunk_for(DEPTH, workers))
        self.errors = 0
        self.first_error = ""

    def read(self, indices: np.ndarray, depth: int = DEPTH) -> Iterator[np.ndarray]:
        """One image per index, in order; a slice that cannot be decoded comes back black (and counted)."""
        if self.images is not None:
            for i in indices:
                yield self.images[i]
            return
        if self.cache is not None and self.cache.complete():  # every later epoch: no decoding at all
            for i in indices:
                yield self.cache.read(int(i))
            return
        assert self.pool is not None and self.paths is not None
        jobs = (SliceJob(str(self.paths[i]), self.size) for i in indices)
        for i, got in zip(indices, self.pool.map(jobs, depth)):
            if got.image is None:
                self.errors += 1
                self.first_error = self.first_error or got.error
                yield np.zeros((self.size, self.size, 3), np.uint8)
                continue
            if self.cache is not None:
                self.cache.write(int(i), got.image)
            yield got.image

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.cache is not None:
            self.cache.close()


def batches(reader: SliceReader, indices: np.ndarray, y: np.ndarray, weights: np.ndarray | None,
            batch_size: int, seed: int | None, epochs: int | None = None) -> Iterator[tuple[np.ndarray, ...]]:
    """(x, y[, w]) batches over the indices, epoch after epoch (reshuffled each epoch when seeded)."""
    epoch = 0
    while epochs is None or epoch < epochs:
        order = indices if seed is None else np.random.default_rng([seed, epoch]).permutation(indices)
        images = reader.read(order)
        for start in range(0, len(order), batch_size):
            part = order[start:start + batch_size]
            x = np.stack([next(images) for _ in part])
            yield (x, y[part]) if weights is None else (x, y[part], weights[part])
        epoch += 1


def steps(n: int, batch_size: int) -> int:
    return max(1, math.ceil(n / batch_size))
