"""Work that a hostile file can break, run in worker processes with a memory cap and a time limit.

A decoder handed a crafted file can allocate without bound, crash in C, or never return. In a worker
process each of those is one item's failure: the memory cap (RLIMIT_AS) turns a huge allocation into a
MemoryError, a worker that runs past the time limit is killed, and a worker that dies is replaced.
Each worker holds one item at a time, so the item that killed it is known exactly and no other item
is lost. (concurrent.futures' process pool breaks as a whole when one worker dies, and on Python 3.11
can hang on shutdown after that.)
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        raise ValueError(f"{name} must be a whole number. Received: {os.environ.get(name)!r}") from None
    if value < 0:
        raise ValueError(f"{name} must be 0 or more. Received: {value}")
    return value


@dataclass(frozen=True)
class WorkerLimits:
    """Per worker process and item. 0 turns a limit off."""

    memory_mb: int = 2048  # address space: the libraries take about 500 MB of it, a 512 x 512 slice little
    seconds: int = 120  # a CT slice decodes in well under a second

    @classmethod
    def from_env(cls) -> WorkerLimits:
        return cls(_env_int("ICHBATCH_DECODE_MEMORY_MB", cls.memory_mb),
                   _env_int("ICHBATCH_DECODE_TIMEOUT_S", cls.seconds))

    def describe(self) -> str:
        memory = f"{self.memory_mb} MB (ICHBATCH_DECODE_MEMORY_MB)" if self.memory_mb else "no memory limit"
        limit = f"{self.seconds} s (ICHBATCH_DECODE_TIMEOUT_S)" if self.seconds else "no time limit"
        return f"{memory}, {limit}"


def _worker_main(conn: Connection, fn: Callable[[Any], Any], memory_mb: int) -> None:
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"  # one thread per process; the pool is the parallelism
    if memory_mb:  # before any library allocates
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        cap = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        seq, item = job
        try:
            reply: tuple[int, bool, Any] = (seq, True, fn(item))
        except BaseException as exc:  # sent back and raised in the parent: fn's own bug, not the input's
            reply = (seq, False, exc)
        conn.send(reply)


class _Worker:
    def __init__(self, fn: Callable[[Any], Any], memory_mb: int) -> None:
        # spawn: the parent may hold TensorFlow's threads, which fork would copy in an unknown state.
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, fn, memory_mb), daemon=True,
                                   name="ichbatch-decode")
        self.process.start()
        child.close()
        self.job: tuple[int, Any] | None = None
        self.deadline = float("inf")

    def give(self, seq: int, item: Any, seconds: int) -> None:
        self.job = (seq, item)
        self.deadline = time.monotonic() + seconds if seconds else float("inf")
        self.conn.send(self.job)

    def stop(self, timeout: float = 5.0) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.process.join(timeout if self.job is None else 0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()


class IsolatedPool(Generic[T, R]):
    """map(fn, items) in worker processes, in order, with a bounded number of results held.

    on_crash(item, reason) gives the result for an item whose worker died or ran out of time.
    """

    def __init__(self, fn: Callable[[T], R], on_crash: Callable[[T, str], R], workers: int,
                 limits: WorkerLimits | None = None) -> None:
        self.fn = fn
        self.on_crash = on_crash
        self.size = max(1, workers)
        self.limits = limits or WorkerLimits.from_env()
        self._workers: list[_Worker] = []
        self._seq = 0  # across maps: a result from an abandoned map is recognised and dropped
        self.crashes = 0

    def map(self, items: Iterable[T], depth: int) -> Iterator[R]:
        if not self._workers:
            self._workers = [_Worker(self.fn, self.limits.memory_mb) for _ in range(self.size)]
        source = iter(items)
        first = self._seq
        done: dict[int, R] = {}
        exhausted = False
        while True:
            while not exhausted and self._seq - first < max(depth, 1) and self._idle():
                try:
                    item = next(source)
                except StopIteration:
                    exhausted = True
                    break
                self._idle()[0].give(self._seq, item, self.limits.seconds)
                self._seq += 1
            if first in done:
                yield done.pop(first)
                first += 1
                continue
            if exhausted and first == self._seq:
                return
            self._collect(done, first)

    def _idle(self) -> list[_Worker]:
        return [w for w in self._workers if w.job is None]

    def _collect(self, done: dict[int, R], first: int) -> None:
        """Wait for any busy worker to answer, die or run out of time."""
        busy = [w for w in self._workers if w.job is not None]
        timeout = max(0.0, min(w.deadline for w in busy) - time.monotonic())
        ready = wait([w.conn for w in busy] + [w.process.sentinel for w in busy],
                     None if timeout == float("inf") else timeout)
        for index, worker in enumerate(self._workers):
            if worker.job is None:
                continue
            seq, item = worker.job
            reason = ""
            if worker.conn in ready:
                try:
                    got, ok, value = worker.conn.recv()
                except (EOFError, OSError):
                    reason = self._death(worker)
                else:
                    worker.job = None
                    if not ok:
                        raise value
                    if got >= first:
                        done[got] = value
                    continue
            elif worker.process.sentinel in ready:
                reason = self._death(worker)
            elif time.monotonic() >= worker.deadline:
                reason = f"decoding ran past the time limit of {self.limits.seconds} s (ICHBATCH_DECODE_TIMEOUT_S)"
            if reason:
                self.crashes += 1
                worker.stop()
                self._workers[index] = _Worker(self.fn, self.limits.memory_mb)
                if seq >= first:
                    done[seq] = self.on_crash(item, reason)

    def _death(self, worker: _Worker) -> str:
        worker.process.join(1)
        code = worker.process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        return f"the decoder process {how} on this file (limits: {self.limits.describe()})"

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def __enter__(self) -> IsolatedPool[T, R]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
