"""What committing one study costs the run's process (or the Ray driver): the results store's
transaction, the CSV row appended with its fsync, and the HTML index, written after every study
(`index_seconds` 0, as before 2026-11-28) or at most every 2 s (the default); and, since 2026-12-08,
studies ready at the same time committed together (`commit_many`, groups of --group). Alternated in one run.

    python benchmarks/commit_cost.py [--studies 300] [--slices 40] [--repeats 3] [--group 8]

The commits run on the thread that collects finished studies; on the Ray engine they are the driver's
bound (README: Running on a Ray cluster). Each prints CPU time too: a wait for the disk costs the
thread its time but not the interpreter lock.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from ichbatch.config import LABELS
from ichbatch.domain import Status, StudyMeta, StudyResult
from ichbatch.report.html_index import INDEX_SECONDS
from ichbatch.report.outputs import OutputSettings, OutputWriter, StudyFiles


def _result(slices: int, rng: np.random.Generator) -> StudyResult:
    return StudyResult(study=StudyMeta(generate_uid()), status=Status.OK, message="", series_uid=generate_uid(),
                       labels=LABELS, outputs=LABELS, model="bench", model_version="1", n_slices=slices,
                       slice_probs=rng.random((slices, len(LABELS)), dtype=np.float32),
                       study_probs={label: 0.1 for label in LABELS}, flags={label: False for label in LABELS})


def _per_commit(folder: Path, seconds: float, studies: int, slices: int, group: int) -> tuple[float, float]:
    """(wall, CPU) seconds a study."""
    rng = np.random.default_rng(0)
    results = [_result(slices, rng) for _ in range(studies)]
    settings = OutputSettings(csv=folder / "results.csv", reports=folder / "reports", writers=0, index_seconds=seconds)
    with OutputWriter(settings) as writer:
        start, cpu = time.perf_counter(), time.thread_time()
        for k in range(0, studies, group):
            writer.commit_many([StudyFiles(result, ()) for result in results[k:k + group]])
        took, cpu = time.perf_counter() - start, time.thread_time() - cpu
    return took / studies, cpu / studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group", type=int, default=8, help="studies a group commit holds")
    args = parser.parse_args()
    ways = {"index after every study": (0.0, 1), f"index at most every {INDEX_SECONDS:g} s": (INDEX_SECONDS, 1),
            f"the same, in groups of {args.group}": (INDEX_SECONDS, args.group)}
    times: dict[str, list[tuple[float, float]]] = {way: [] for way in ways}
    tmp = Path(tempfile.mkdtemp(prefix="ichcommit"))
    try:
        for k in range(args.repeats):
            for n, way in enumerate(list(ways) if k % 2 == 0 else list(ways)[::-1]):
                seconds, group = ways[way]
                times[way].append(_per_commit(tmp / f"{k}_{n}", seconds, args.studies, args.slices, group))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.studies} studies of {args.slices} slices a pass, median of {args.repeats} alternated passes:")
    medians = {way: statistics.median(wall for wall, _ in got) for way, got in times.items()}
    for way, got in times.items():
        cpu = statistics.median(c for _, c in got)
        print(f"  {way}: {1000 * medians[way]:.2f} ms a commit ({1000 * cpu:.2f} ms of CPU)")
    first, second, third = medians.values()
    print(f"ratio, index at every study / at most every {INDEX_SECONDS:g} s: {first / second:.2f}")
    print(f"ratio, one study a commit / groups of {args.group}: {second / third:.2f}")

if __name__ == "__main__":
    main()
