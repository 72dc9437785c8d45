"""What committing one study costs the run's process (or the Ray driver): the results store's
transaction, the CSV row appended with its fsync, and the HTML index, written after every study
(`index_seconds` 0, as before 2026-11-28) or at most every 2 s (the default). Alternated in one run.

    python benchmarks/commit_cost.py [--studies 300] [--slices 40] [--repeats 3]

The commits run on the thread that collects finished studies; on the Ray engine they are the driver's
bound (README: Running on a Ray cluster).
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


def _per_commit(folder: Path, seconds: float, studies: int, slices: int) -> float:
    rng = np.random.default_rng(0)
    results = [_result(slices, rng) for _ in range(studies)]
    settings = OutputSettings(csv=folder / "results.csv", reports=folder / "reports", writers=0, index_seconds=seconds)
    with OutputWriter(settings) as writer:
        start = time.perf_counter()
        for result in results:
            writer.commit(StudyFiles(result, ()))
        took = time.perf_counter() - start
    return took / studies


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=300)
    parser.add_argument("--slices", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    ways = {"index after every study": 0.0, f"index at most every {INDEX_SECONDS:g} s": INDEX_SECONDS}
    times: dict[str, list[float]] = {way: [] for way in ways}
    tmp = Path(tempfile.mkdtemp(prefix="ichcommit"))
    try:
        for k in range(args.repeats):
            for n, way in enumerate(list(ways) if k % 2 == 0 else list(ways)[::-1]):
                times[way].append(_per_commit(tmp / f"{k}_{n}", ways[way], args.studies, args.slices))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{args.studies} studies of {args.slices} slices a pass, median of {args.repeats} alternated passes:")
    for way, seconds in times.items():
        print(f"  {way}: {1000 * statistics.median(seconds):.2f} ms a commit")
    before, after = (statistics.median(times[way]) for way in ways)
    print(f"ratio (before / after): {before / after:.2f}")


if __name__ == "__main__":
    main()
