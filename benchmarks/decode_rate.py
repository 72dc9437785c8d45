"""What one decoder process does per slice, by transfer syntax: the figure that sizes the decoder pool.

    python benchmarks/decode_rate.py [--slices 24] [--size 128] [--repeats 3] [--workers 2]

Each of the generator's transfer syntaxes gets one anatomy study of 512x512 slices. Each study goes
through a pool of one decoder process (ichbatch.workers, the run's own decode function: read, HU,
checks, the model input at --size and the thumbnail), two slices in flight, so the process never waits
for the parent. Two pools side by side in one run, repeats interleaved:
  kept:   the run's workers, which keep freed heap for the next slice (workers.keep_freed_memory)
  own:    the same with ICHBATCH_DECODE_KEEP_FREED_MB=0: the C library's own way, as before 2026-11-27
Slices per second per process, with one process, is what a machine with N spare cores decodes N times
over while the model runs, as long as the pool's driver thread keeps up.

Then that driver thread: the uncompressed study, repeated to 256 slices, through a pool of --workers
processes fed 64 slices ahead (a CPU run's depth), interleaved: one slice per message with the arrays
through the pipe (as before 2026-11-27), LARGEST_CHUNK per message through the pipe, and
LARGEST_CHUNK per message with the arrays in shared memory (the run's way). Its CPU time per slice is
the figure: beside a GPU it shares the interpreter lock with the scoring and finishing threads.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def _generate(job: tuple) -> None:  # type: ignore[type-arg]
    from ichbatch.synth import synth_studies

    folder, encoding, n_slices = job
    synth_studies(folder, 1, seed=99, n_slices=n_slices, size=512, encoding=encoding, phantoms="anatomy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=128, help="the model input size (the demo card's: 128)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="decoder processes for the driver-thread figures")
    args = parser.parse_args()

    import numpy as np
    from pydicom.uid import ExplicitVRLittleEndian

    from ichbatch.decode import DecodeJob, crashed, decode_slice
    from ichbatch.discover import discover
    from ichbatch.pipeline import select
    from ichbatch.series import DEFAULT_RULES
    from ichbatch.study import decode_jobs
    from ichbatch.synth import TRANSFER_SYNTAXES, Encoding, can_encode
    from ichbatch.workers import IsolatedPool, WorkerLimits

    syntaxes = [ts for ts in TRANSFER_SYNTAXES if can_encode(ts)]
    with tempfile.TemporaryDirectory() as tmp:
        folders = [Path(tmp) / f"ts{i}" for i in range(len(syntaxes))]
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_generate, [(f, Encoding(transfer_syntax=ts), args.slices) for f, ts in zip(folders, syntaxes)]))
        studies: list[list[DecodeJob]] = []
        for folder in folders:
            (choice,) = select(discover([str(folder)]), DEFAULT_RULES)
            studies.append(list(decode_jobs(0, choice, args.size)))
        kept = WorkerLimits.from_env()
        modes = {"kept": kept, "own": WorkerLimits(kept.memory_mb, kept.seconds, keep_freed_mb=0)}
        pools = {name: IsolatedPool(decode_slice, crashed, 1, limits) for name, limits in modes.items()}
        rates: dict[tuple[str, str], list[float]] = {}
        try:
            for name, pool in pools.items():  # start each process and decode every codec once, untimed
                for jobs in studies:
                    assert all(not d.error for d in pool.map(jobs, depth=2)), f"{name}: a slice failed"
            for _ in range(args.repeats):
                for ts, jobs in zip(syntaxes, studies):
                    for name, pool in pools.items():
                        t = time.perf_counter()
                        list(pool.map(jobs, depth=2))
                        rates.setdefault((ts.name, name), []).append(len(jobs) / (time.perf_counter() - t))
        finally:
            for pool in pools.values():
                pool.close()
        plain = studies[syntaxes.index(ExplicitVRLittleEndian)]
        driver = _driver_cost((plain * (256 // len(plain) + 1))[:256], args.workers, args.repeats)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; one decoder process, "
          f"{args.slices} slices of 512x512 per codec, model input {args.size} px, median of {args.repeats}")
    print(f"{'transfer syntax':44s} {'kept: slices/s':>14s} {'ms':>6s} {'own: slices/s':>14s} {'ms':>6s} {'ratio':>6s}")
    for ts in syntaxes:
        fast, slow = (float(np.median(rates[(ts.name, m)])) for m in modes)
        print(f"{ts.name:44s} {fast:14.0f} {1e3 / fast:6.2f} {slow:14.0f} {1e3 / slow:6.2f} {fast / slow:6.2f}")
    print(f"the pool's driver thread, {args.workers} decoder processes, 256 uncompressed slices 64 ahead, "
          f"median of {args.repeats}:")
    for (chunk, shared), (cpu, rate) in driver.items():
        how = "shared memory" if shared else "the pipe"
        print(f"  {chunk} slice(s) a message, arrays through {how}: driver CPU {cpu:.3f} ms a slice, "
              f"{rate:.0f} slices/s through the pool")


def _driver_cost(jobs: list, workers: int, repeats: int) -> dict[tuple[int, bool], tuple[float, float]]:  # type: ignore[type-arg]
    """Per (chunk size, shared memory): the driver thread's CPU ms per slice and the pool's slices/s (medians)."""
    import numpy as np

    from ichbatch.decode import crashed, decode_slice
    from ichbatch.workers import LARGEST_CHUNK, IsolatedPool

    modes = [(1, False), (LARGEST_CHUNK, False), (LARGEST_CHUNK, True)]
    pools = {(chunk, shared): IsolatedPool(decode_slice, crashed, workers, chunk=chunk, shared_memory=shared)
             for chunk, shared in modes}
    seen: dict[tuple[int, bool], list[tuple[float, float]]] = {mode: [] for mode in pools}
    try:
        for pool in pools.values():
            list(pool.map(jobs[:32], 64))  # start the processes, untimed
        for _ in range(repeats):
            for mode, pool in pools.items():
                results = pool.map(jobs, 64)
                t = time.perf_counter()
                next(results)  # the driver thread of this map exists from here
                assert pool._driver is not None
                clock = time.pthread_getcpuclockid(pool._driver._thread.ident)
                cpu = time.clock_gettime(clock)
                for _ in results:
                    used = time.clock_gettime(clock) - cpu  # read while the thread lives
                seen[mode].append((1e3 * used / len(jobs), len(jobs) / (time.perf_counter() - t)))
    finally:
        for pool in pools.values():
            pool.close()
    return {mode: (float(np.median([c for c, _ in got])), float(np.median([r for _, r in got])))
            for mode, got in seen.items()}


if __name__ == "__main__":
    main()
