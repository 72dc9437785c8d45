"""Discovery on one machine: every header read in the run's own process, or in header-reading processes
(discover.pooled_examiner, what `ichbatch run` uses from the 1,000th file on), over the same files,
alternated in one run.

    python benchmarks/header_reads.py [--files 4000] [--workers N] [--repeats 3]

Prints, per way, the median wall time per file and the run process's own CPU time per file (the
readers' CPU is theirs): the first bounds a run's start on an archive, the second what one run process
can plan however many cores read for it. Then the memory the index of those headers holds per file,
which grouping by UID keeps until each study runs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=0, help="header-reading processes [default: as a run]")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from ichbatch.discover import discover, pooled_examiner
    from ichbatch.infer import default_workers
    from ichbatch.synth import synth_studies

    workers = args.workers or default_workers()
    tmp = Path(tempfile.mkdtemp(prefix="ichheaders"))
    ways = ["this process", f"{workers} processes"]
    wall: dict[str, list[float]] = {way: [] for way in ways}
    cpu: dict[str, list[float]] = {way: [] for way in ways}
    try:
        synth_studies(tmp, max(1, args.files // 40), seed=12, n_slices=40, size=64)
        files = 0
        for k in range(args.repeats):
            for way in ways if k % 2 == 0 else ways[::-1]:
                examiner = pooled_examiner(workers, pool_from=0) if way != "this process" else None
                t, c = time.perf_counter(), time.process_time()
                found = discover([tmp], examiner=examiner)
                wall[way].append(time.perf_counter() - t)
                cpu[way].append(time.process_time() - c)
                files = len(found.instances) + len(found.issues)
        tracemalloc.start()
        found = discover([tmp])
        held = tracemalloc.get_traced_memory()[0] / len(found.instances)
        tracemalloc.stop()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{files} files, {os.cpu_count()} cores, median of {args.repeats} alternated passes (the processes' start "
          "included):")
    for way in ways:
        print(f"  {way:>12}: {1000 * statistics.median(wall[way]) / files:.3f} ms wall a file, "
              f"{1000 * statistics.median(cpu[way]) / files:.3f} ms of the run process's CPU a file")
    here, pooled = (statistics.median(wall[way]) for way in ways)
    print(f"wall ratio (this process / processes): {here / pooled:.2f}")
    print(f"the header index held until grouping: {held:.0f} bytes a file (tracemalloc, one more pass)")


if __name__ == "__main__":
    main()
