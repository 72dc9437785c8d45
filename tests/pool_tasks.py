"""Tasks for the worker-pool tests: module-level so that spawned worker processes can import them."""

from __future__ import annotations

import os
import time

import numpy as np  # loaded with the task, before the worker's own code runs, as a decoder's numpy is

# What the libraries loaded with a task saw: the environment when this module was imported.
LOADED_WITH = {name: os.environ.get(name) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}


def square_or_die(n: int) -> int:
    """n squared; -1 kills the worker process as a segfaulting decoder would."""
    if n == -1:
        os._exit(139)
    return n * n


def allocate_gb(gb: float) -> str:
    try:
        block = bytearray(int(gb * (1 << 30)))
    except MemoryError:
        return "MemoryError"
    return f"allocated {len(block) >> 30} GiB"


def reserve_then_allocate(gb: float) -> str:
    """Reserve gb GiB of address space that is never written, as the libraries of a many-core machine
    do (a 64 MB heap arena and a stack for each thread they start), then allocate and fill 256 MiB."""
    import mmap

    try:
        reserved = mmap.mmap(-1, int(gb * (1 << 30)), flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        block = bytearray(b"x" * (256 << 20))
    except (MemoryError, OSError) as exc:
        return type(exc).__name__
    return f"reserved {len(reserved) >> 30} GiB, wrote {len(block) >> 20} MiB"


def blas_threads(_: object) -> tuple[int, dict[str, str | None]]:
    """The threads numpy's BLAS uses in this process, and the environment its module loaded with."""
    from threadpoolctl import threadpool_info

    np.ones((64, 64)) @ np.ones((64, 64))
    return max(pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"), LOADED_WITH


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "woke"


def crashed(item: object, reason: str) -> str:
    return f"crashed: {reason}"


def decode_and_count_faults(job: object) -> tuple[str, int]:
    """Decode one slice as a run does: its error ('' when it decoded) and the minor page faults it took."""
    import resource

    from ichbatch.decode import decode_slice

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    decoded = decode_slice(job)  # type: ignore[arg-type]
    return decoded.error, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def arrays(spec: tuple[int, str]) -> dict[str, object]:
    """Arrays of `spec` = (elements, layout) made in the worker: contiguous, a strided view, or empty."""
    import numpy as np

    n, layout = spec
    data = np.arange(n, dtype=np.int16)
    picked = data[::2] if layout == "strided" else data
    return {"n": n, "array": picked, "thumb": (data[:64] % 251).astype(np.uint8), "pid": os.getpid()}


def write_files_or_die(job):  # type: ignore[no-untyped-def]
    """A report writer that dies, as a crash in a PDF library would, on the study named in
    $ICHBATCH_TEST_WRITER_DIES_ON, and one whose PDF needs more memory than its cap on the study named in
    $ICHBATCH_TEST_WRITER_OOM_ON; writes the others' files as a run does, and says where and under what
    memory cap."""
    from dataclasses import replace

    from ichbatch.report.outputs import write_files_job

    if job.result.study.study_uid == os.environ.get("ICHBATCH_TEST_WRITER_DIES_ON"):
        os._exit(139)
    if job.result.study.study_uid == os.environ.get("ICHBATCH_TEST_WRITER_OOM_ON"):
        from ichbatch.report import outputs

        real = outputs.render_pdf
        outputs.render_pdf = lambda *args: bytes(bytearray(8 << 30))  # beyond the cap: a real MemoryError
        try:
            return write_files_job(job)
        finally:
            outputs.render_pdf = real
    import resource

    files = write_files_job(job)
    cap, _ = resource.getrlimit(resource.RLIMIT_DATA)
    return replace(files, result=replace(files.result, message=f"written by {os.getpid()} within {cap}"))
