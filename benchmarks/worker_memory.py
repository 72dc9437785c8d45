"""What a worker process holds on this machine: address space (VmSize), writable memory (VmData, what the
workers' memory cap counts since it moved off address space) and threads, for a decoder's and a report
writer's imports, after the numpy, OpenCV and PDF work they do. Once in the run's worker pool (started
with one thread per library in its environment) and once in a plain spawned process (each library's
default: a thread per core).

    python benchmarks/worker_memory.py

On a 2-core machine the two differ little. On a 16-core H200 machine (2026-11-27) a plain process held
2,744 MB written and 2,975 MB of address space after its imports, 31 threads; a pool worker 125 MB and
372 MB, one thread. That pool did not yet give OpenCV its variable, and the probe's OpenCV, loaded
after the worker set its thread count, started 16 threads: 1,487 MB of address space, 279 MB written.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor


def _status() -> str:
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmSize", "VmData", "Threads"):
                fields[key] = value.split()[0]
    return (f"address space {int(fields['VmSize']) >> 10} MB, writable {int(fields['VmData']) >> 10} MB, "
            f"{fields['Threads']} threads")


def probe(kind: str) -> str:
    import io

    import cv2
    import numpy as np

    if kind == "report writer":
        import ichbatch.report.outputs  # noqa: F401
    else:
        import ichbatch.decode  # noqa: F401
    loaded = _status()
    image = np.random.default_rng(0).random((512, 512)).astype(np.float32)
    _ = image @ image  # numpy's BLAS starts its threads on first use
    big = cv2.resize(cv2.GaussianBlur(image, (9, 9), 2), (1024, 1024), interpolation=cv2.INTER_CUBIC)
    if kind == "report writer":
        from reportlab.pdfgen import canvas

        page = canvas.Canvas(io.BytesIO())
        page.drawString(72, 72, f"{big.mean():.3f}")
        page.save()
    return f"{kind}: after imports {loaded}; after work {_status()}"


def failed(item: str, reason: str) -> str:
    return f"{item}: {reason}"


def main() -> None:
    from ichbatch.workers import IsolatedPool, WorkerLimits

    kinds = ["decoder", "report writer"]
    print(f"{os.cpu_count()} cores")
    with IsolatedPool(probe, failed, 2, WorkerLimits(memory_mb=0, seconds=0)) as pool:
        for line in pool.map(kinds, depth=2):
            print(f"  in the run's worker pool: {line}")
    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as plain:
        for line in plain.map(probe, kinds):
            print(f"  in a plain process:       {line}")


if __name__ == "__main__":
    main()
