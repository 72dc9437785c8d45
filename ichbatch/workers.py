"""Work that a hostile file can break, run in worker processes with a memory cap and a time limit.

A decoder handed a crafted file can allocate without bound, crash in C, or never return. In a worker
process each of those is one item's failure: the memory cap (RLIMIT_DATA) turns a huge allocation into a
MemoryError, a worker that runs past the time limit is killed, and a worker that dies is replaced.
A worker decodes its items one after the other, in the order given, and holds at most two messages: the
one it is on and the next, already sent, so that it never waits for the parent between items. A message
carries up to `chunk` items and its reply all their results: each message costs the parent's driver
thread a wake-up and a few system calls, which at one slice per message was most of its time. The item
that killed a worker is in the oldest message it held; alone in it, it is known exactly, and the failure
is its own. A message of several items that killed its worker or ran out of time is handed out again
item by item, so that only the guilty item fails; what was queued behind it goes to another worker, not
lost. (concurrent.futures' process pool breaks as a whole when one worker dies, and on Python 3.11
can hang on shutdown after that.)

The arrays in a reply (a slice's model input and thumbnail) do not go through the pipe: the worker
writes them into shared memory of its own and the pipe carries the rest (SharedSlots).
"""

from __future__ import annotations

import ctypes
import mmap
import multiprocessing
import os
import pickle
import queue
import resource
import selectors
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

IN_FLIGHT = 2  # messages per worker: the one it decodes and the next, so no round trip is waited for
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD_MAX = 32 << 20  # glibc's ceiling for M_MMAP_THRESHOLD on 64-bit systems
# Items per message: at 1 the driver thread took 0.35 ms a 512 x 512 slice, at 8 0.16 ms through the pipe
# (2 decoder processes on 2 cores; benchmarks/decode_rate.py, its driver section). More gains little.
LARGEST_CHUNK = 8


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

    # Writable private memory (RLIMIT_DATA): the libraries take 100-300 MB of it, a 512 x 512 slice
    # little. Not address space (RLIMIT_AS), which grows with each thread a library starts (a 64 MB heap
    # arena and a stack, reserved, not written): on a 16-core machine 15 OpenCV threads and a few arrays
    # took a worker from 0.37 to 1.49 GB of address space, and from 0.13 to 0.28 GB written.
    memory_mb: int = 2048
    seconds: int = 120  # a CT slice decodes in well under a second
    keep_freed_mb: int = 64  # free heap kept for the next item (keep_freed_memory); 0: the C library's own way

    @classmethod
    def from_env(cls) -> WorkerLimits:
        return cls(_env_int("ICHBATCH_DECODE_MEMORY_MB", cls.memory_mb),
                   _env_int("ICHBATCH_DECODE_TIMEOUT_S", cls.seconds),
                   _env_int("ICHBATCH_DECODE_KEEP_FREED_MB", cls.keep_freed_mb))

    def describe(self) -> str:
        memory = f"{self.memory_mb} MB written (ICHBATCH_DECODE_MEMORY_MB)" if self.memory_mb else "no memory limit"
        limit = f"{self.seconds} s (ICHBATCH_DECODE_TIMEOUT_S)" if self.seconds else "no time limit"
        return f"{memory}, {limit}"


def chunk_for(depth: int, workers: int) -> int:
    """Items per message for a pool of `workers` fed `depth` items ahead: up to LARGEST_CHUNK, fewer where
    that many ahead would not give every worker its IN_FLIGHT full messages."""
    return max(1, min(LARGEST_CHUNK, depth // (IN_FLIGHT * max(1, workers))))


@lru_cache(maxsize=None)  # once per process and value: a Ray task calls it for every study it decodes
def keep_freed_memory(megabytes: int) -> bool:
    """Serve a slice's large arrays (a 512 x 512 float32 image is 1 MB) from memory the previous slice
    freed. glibc's defaults map each block of 128 kB or more afresh and unmap it when freed, so every array
    of every slice faults its pages in again: one decoder process took 3.4 ms an uncompressed slice
    instead of 2.2 (benchmarks/decode_rate.py, on a VM where a page fault is dear). glibc adapts its
    threshold on its own, but not reliably across the imports a worker does. What is kept is bounded: at
    most `megabytes` of free heap (arrays of up to half that, 32 MB at most, come from the heap), within
    the worker's memory cap. False where the C library has no mallopt (macOS); musl's does nothing."""
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None or megabytes <= 0:
        return False
    keep = megabytes << 20
    largest = min(keep // 2, MMAP_THRESHOLD_MAX)  # glibc refuses a larger one
    return bool(mallopt(M_MMAP_THRESHOLD, largest) and mallopt(M_TRIM_THRESHOLD, keep))


class SharedSlots:
    """Shared memory between the parent and one worker, for the arrays of the worker's replies.

    Through the pipe, a reply of eight 224 px slices is 880 kB that the parent's driver thread reads
    in many system calls, gathers and copies again while unpickling: about half its time per slice.
    Here the worker pickles a reply with its arrays out of band (pickle protocol 5), copies them into
    a slot, and sends only the rest; the parent copies them out once. Two slots, one per message a
    worker may hold: the worker writes its n-th reply into slot n % 2, and the parent has copied
    reply n out before it sends the message whose reply reuses that slot (n + 2). A reply whose arrays
    do not fit, or are not contiguous, goes through the pipe whole. An anonymous memory file
    (memfd): nothing in /dev/shm to size or to leak when a process is killed. None where the system
    has no memfd (not Linux): every reply goes through the pipe.
    """

    SLOT_BYTES = 8 << 20  # eight 512 px model inputs and their thumbnails; pages are used only once written

    def __init__(self, fd: int, size: int) -> None:
        self.fd, self.size = fd, size
        self._map = mmap.mmap(fd, 2 * size)
        self.view = memoryview(self._map)

    @classmethod
    def make(cls) -> SharedSlots | None:
        if not hasattr(os, "memfd_create"):
            return None
        fd = os.memfd_create("ichbatch-replies", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, 2 * cls.SLOT_BYTES)
            return cls(fd, cls.SLOT_BYTES)
        except OSError:
            os.close(fd)
            return None

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled only to start a worker: multiprocessing then passes the descriptor to the child.
        from multiprocessing.reduction import DupFd  # type: ignore[attr-defined]

        return _attach_slots, (DupFd(self.fd), self.size)

    def put(self, n: int, replies: list[tuple[int, bool, Any]]) -> Any:
        """What to send for the worker's n-th reply: (pickle, spans) with the arrays in slot n % 2, or
        the replies themselves where they cannot go there."""
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(replies, protocol=5, buffer_callback=buffers.append)
        try:
            raws = [buffer.raw() for buffer in buffers]
        except BufferError:  # not contiguous
            return replies
        if not raws or sum(raw.nbytes for raw in raws) > self.size:
            return replies
        spans, at = [], (n % 2) * self.size
        for raw in raws:
            self.view[at:at + raw.nbytes] = raw
            spans.append((at, raw.nbytes))
            at += raw.nbytes
        return _OutOfBand(data, spans)

    def take(self, sent: Any) -> list[tuple[int, bool, Any]]:
        """The replies from what put() made, their arrays copied out of the slot."""
        if not isinstance(sent, _OutOfBand):
            return sent  # type: ignore[no-any-return]
        buffers = [bytearray(self.view[at:at + size]) for at, size in sent.spans]
        return pickle.loads(sent.data, buffers=buffers)  # type: ignore[no-any-return]

    def close(self) -> None:
        if self.fd < 0:
            return
        self.view.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1


@dataclass(frozen=True)
class _OutOfBand:
    data: bytes  # the replies pickled without their arrays
    spans: list[tuple[int, int]]  # (offset, size) of each array in the shared memory


def _attach_slots(fd: Any, size: int) -> SharedSlots:
    return SharedSlots(fd.detach(), size)


# What a worker's libraries read when they load, before any of the worker's own code runs (its task's
# module, numpy with it, is imported while the process unpickles its arguments): one thread each, since
# the pool is the parallelism. Set later, they came too late. On a 16-core H200 machine numpy's
# OpenBLAS then started a thread per core as it loaded, and a worker held 2.7 GB of written memory
# before its first item, above the 2 GB cap: every report writer failed (benchmarks/worker_memory.py).
ONE_THREAD = {name: "1" for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                                     "OPENCV_FOR_THREADS_NUM", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS")}
_environment = threading.Lock()


@contextmanager
def _one_thread_per_library() -> Iterator[None]:
    """The environment a spawned child inherits is the parent's at its start (multiprocessing has no
    per-process environment), so ONE_THREAD is set for the start alone and the parent's own is put back."""
    with _environment:
        saved = {name: os.environ.get(name) for name in ONE_THREAD}
        os.environ.update(ONE_THREAD)
        try:
            yield
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def _worker_main(conn: Connection, fn: Callable[[Any], Any], limits: WorkerLimits,
                 slots: SharedSlots | None = None) -> None:
    keep_freed_memory(limits.keep_freed_mb)
    if limits.memory_mb:  # before any library allocates
        _, hard = resource.getrlimit(resource.RLIMIT_DATA)
        cap = limits.memory_mb << 20
        resource.setrlimit(resource.RLIMIT_DATA, (cap if hard == resource.RLIM_INFINITY else min(cap, hard), hard))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    sent = 0  # replies so far: the n-th goes to slot n % 2
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            return
        if job is None:
            return
        replies = [_call(fn, seq, item) for seq, item in job]
        conn.send(slots.put(sent, replies) if slots is not None else replies)
        sent += 1


def _call(fn: Callable[[Any], Any], seq: int, item: Any) -> tuple[int, bool, Any]:
    try:
        return seq, True, fn(item)
    except BaseException as exc:  # sent back and raised in the parent: fn's own bug, not the input's
        return seq, False, exc


class _Worker:
    def __init__(self, fn: Callable[[Any], Any], limits: WorkerLimits, shared: bool = True) -> None:
        # spawn: the parent may hold TensorFlow's threads, which fork would copy in an unknown state.
        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.slots = SharedSlots.make() if shared else None
        self.process = ctx.Process(target=_worker_main, args=(child, fn, limits, self.slots), daemon=True,
                                   name="ichbatch-decode")
        with _one_thread_per_library():
            self.process.start()
        child.close()
        self.jobs: deque[list[tuple[int, Any]]] = deque()  # messages sent and not answered; the first is in work
        self.seconds = limits.seconds
        self.deadline = float("inf")  # for the first message

    @property
    def job(self) -> list[tuple[int, Any]] | None:
        """The message of (seq, item) it is decoding now, if any."""
        return self.jobs[0] if self.jobs else None

    def give(self, job: list[tuple[int, Any]]) -> None:
        if not self.jobs:
            self._start_clock()
        self.jobs.append(job)
        try:
            self.conn.send(job)
        except OSError:  # it died on the job before: its death is seen next, and this one handed out again
            pass

    def receive(self) -> list[tuple[int, bool, Any]]:
        """The reply to the first message (EOFError or OSError if the worker died): the next message,
        already there, is being decoded from now."""
        sent = self.conn.recv()
        replies = self.slots.take(sent) if self.slots is not None else sent
        self.jobs.popleft()
        if self.jobs:
            self._start_clock()
        return replies  # type: ignore[no-any-return]

    def _start_clock(self) -> None:
        # Per message: a whole message of slices decodes in well under the limit, and one that runs past it
        # is handed out again item by item, each with the full limit.
        self.deadline = time.monotonic() + self.seconds if self.seconds else float("inf")

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
        if self.slots is not None:
            self.slots.close()


class IsolatedPool(Generic[T, R]):
    """map(fn, items) in worker processes, in order, with a bounded number of results held.

    on_crash(item, reason) gives the result for an item whose worker died or ran out of time. Items go
    to the workers up to `chunk` per message, in order. A thread hands out items and collects results,
    so the workers keep decoding while the caller's thread is busy (running the model, which releases
    the GIL); items are still drawn from `items` on the caller's thread, so what produces them
    (discovery, the results store) never runs on another thread.
    """

    def __init__(self, fn: Callable[[T], R], on_crash: Callable[[T, str], R], workers: int,
                 limits: WorkerLimits | None = None, chunk: int = 1, shared_memory: bool = True,
                 role: tuple[str, str] = ("decoder", "file")) -> None:
        self.fn = fn
        self.role, self.item = role  # for messages: the decoder process ... on this file
        self.on_crash = on_crash
        self.size = max(1, workers)
        self.chunk = max(1, chunk)
        self.shared_memory = shared_memory  # replies' arrays through SharedSlots where the system has them
        self.limits = limits or WorkerLimits.from_env()
        self._workers: list[_Worker] = []
        self._seq = 0  # across maps: a result from an abandoned map is recognised and dropped
        self._driver: _Driver | None = None
        self.crashes = 0

    def map(self, items: Iterable[T], depth: int) -> Iterator[R]:
        for group in self._map(items, depth, grouped=False):
            yield from group

    def map_ready(self, items: Iterable[T], depth: int) -> Iterator[list[R]]:
        """map, in groups: each time, every result in order that is ready, at least one (waited for).
        For a caller whose work per result is cheaper done for many at once (the store's commits)."""
        return self._map(items, depth, grouped=True)

    def _map(self, items: Iterable[T], depth: int, grouped: bool) -> Iterator[list[R]]:
        self._halt()  # an earlier map left unfinished stops handing out its items
        if not self._workers:
            self._workers = [self._worker() for _ in range(self.size)]
        source = iter(items)
        first = self._seq
        driver = self._driver = _Driver(self, first)
        done: dict[int, R] = {}
        exhausted = False
        try:
            while True:
                # Drawn a message's worth at a time: one result taken, one item drawn would hand the workers
                # messages of one item each.
                if self._seq - first <= max(depth - self.chunk, 0):
                    drawn = []
                    while not exhausted and self._seq - first < max(depth, 1):
                        try:
                            drawn.append((self._seq, next(source)))
                        except StopIteration:
                            exhausted = True
                            break
                        self._seq += 1
                    if drawn:
                        driver.give(drawn)
                if exhausted and first == self._seq:
                    return
                while first not in done:
                    self._take(driver.results.get(), done)
                while grouped and not driver.results.empty():  # what else has come, without waiting
                    self._take(driver.results.get_nowait(), done)
                group = [done.pop(first)]
                while grouped and first + len(group) in done:
                    group.append(done.pop(first + len(group)))
                first += len(group)
                yield group
        finally:
            if self._driver is driver:  # not when a later map has taken over the workers
                self._halt()

    @staticmethod
    def _take(replies: list[tuple[int, bool, Any]], done: dict[int, Any]) -> None:
        for seq, ok, value in replies:
            if not ok:
                raise value
            done[seq] = value

    def _halt(self) -> None:
        if self._driver is not None:
            self._driver.stop()
            self._driver = None

    def _collect(self, ready: set[Any], first: int, put: Callable[[list[tuple[int, bool, Any]]], None],
                 requeue: Callable[[list[tuple[int, Any]], bool], None]) -> None:
        """Results of the busy workers that answered, died or ran out of time. A lone item that killed its
        worker fails; a message of several is handed out again one item a message. The messages queued
        behind go back to be handed out again."""
        for index, worker in enumerate(self._workers):
            job = worker.job
            if job is None:
                continue
            reason = ""
            if worker.conn.fileno() in ready:
                try:
                    replies = worker.receive()
                except (EOFError, OSError):
                    reason = self._death(worker)
                else:
                    fresh = [reply for reply in replies if reply[0] >= first]
                    if fresh:
                        put(fresh)
                    continue
            elif worker.process.sentinel in ready:
                reason = self._death(worker)
            elif time.monotonic() >= worker.deadline:
                reason = (f"the {self.role} process ran past the time limit of {self.limits.seconds} s "
                          "(ICHBATCH_DECODE_TIMEOUT_S)")
            if reason:
                self.crashes += 1
                worker.stop()
                self._workers[index] = self._worker()
                requeue([(seq, item) for message in list(worker.jobs)[1:] for seq, item in message if seq >= first], False)
                mine = [(seq, item) for seq, item in job if seq >= first]
                if len(job) > 1:  # which of them did it is not known: each is tried alone
                    requeue(mine, True)
                elif mine:
                    put([(seq, True, self.on_crash(item, reason)) for seq, item in mine])

    def _worker(self) -> _Worker:
        return _Worker(self.fn, self.limits, self.shared_memory)

    def _death(self, worker: _Worker) -> str:
        worker.process.join(1)
        code = worker.process.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code is not None and code < 0 else f"exited ({code})"
        return f"the {self.role} process {how} on this {self.item} (limits: {self.limits.describe()})"

    def close(self) -> None:
        self._halt()
        for worker in self._workers:
            worker.stop()
        self._workers = []

    def __enter__(self) -> IsolatedPool[T, R]:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class _Driver:
    """The thread that drives a pool's workers for one map: items in from the caller, results out."""

    def __init__(self, pool: IsolatedPool[Any, Any], first: int) -> None:
        self.pool = pool
        self.first = first  # results of earlier maps are dropped
        self.results: queue.SimpleQueue[list[tuple[int, bool, Any]]] = queue.SimpleQueue()
        self._items: queue.SimpleQueue[list[tuple[int, Any]]] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # wakes the thread from its wait on the workers
        os.set_blocking(self._wake_w, False)
        self._thread = threading.Thread(target=self._run, name="ichbatch-pool", daemon=True)
        self._thread.start()

    def give(self, items: list[tuple[int, Any]]) -> None:
        self._items.put(items)
        self._wake()

    def stop(self) -> None:
        self._stopping.set()
        self._wake()
        self._thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:  # the pipe is full: the thread is awake already
            pass

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as exc:  # the caller waits on results: it must hear of this thread's death
            self.results.put([(-1, False, exc)])

    def _loop(self) -> None:
        pool = self.pool
        waiting: deque[tuple[int, Any]] = deque()
        alone: set[int] = set()  # items handed out again after a message of several failed: one a message

        def requeue(items: list[tuple[int, Any]], singly: bool) -> None:
            waiting.extendleft(reversed(items))  # to the front, in their order
            if singly:
                alone.update(seq for seq, _ in items)

        # One selector kept open, changed only as the busy workers change: multiprocessing's wait() builds
        # a new one over every pipe on each call (36 us for 15 workers, against 1 us), once per slice or
        # more. Made again after a worker is replaced: its pipe's number may come back for the new one.
        selector, watched, crashes = selectors.DefaultSelector(), set[int](), -1
        try:
            while not self._stopping.is_set():
                while not self._items.empty():
                    waiting.extend(self._items.get())
                for load in range(IN_FLIGHT):  # idle workers first, then a second message to each
                    for worker in pool._workers:
                        # A busy worker waits for a full message; an idle one takes what there is.
                        if len(worker.jobs) == load and waiting and (load == 0 or len(waiting) >= pool.chunk):
                            worker.give(self._message(waiting, alone))
                busy = [w for w in pool._workers if w.job is not None]
                deadline = min((w.deadline for w in busy), default=float("inf"))
                timeout = None if deadline == float("inf") else max(0.0, deadline - time.monotonic())
                if crashes != pool.crashes:
                    selector.close()
                    selector, watched, crashes = selectors.DefaultSelector(), set(), pool.crashes
                wanted = {self._wake_r} | {w.conn.fileno() for w in busy} | {w.process.sentinel for w in busy}
                for fd in watched - wanted:
                    selector.unregister(fd)
                for fd in wanted - watched:
                    selector.register(fd, selectors.EVENT_READ)
                watched = wanted
                ready = {key.fd for key, _ in selector.select(timeout)}
                if self._wake_r in ready:
                    os.read(self._wake_r, 4096)
                pool._collect(ready, self.first, self.results.put, requeue)
        finally:
            selector.close()

    def _message(self, waiting: deque[tuple[int, Any]], alone: set[int]) -> list[tuple[int, Any]]:
        """The next message: the waiting items up to the chunk size, or one item to be tried alone."""
        message = [waiting.popleft()]
        if message[0][0] in alone:
            alone.discard(message[0][0])
            return message
        while waiting and len(message) < self.pool.chunk and waiting[0][0] not in alone:
            message.append(waiting.popleft())
        return message
