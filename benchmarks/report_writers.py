"""Writing studies' files (PDF, JSON, thumbnail) on the run's own thread against in report writer processes.

    python benchmarks/report_writers.py [--model NAME] [--studies 8] [--slices 24] [--writers 1] [--repeats 3]

Anatomy studies of 512x512 slices go through the study path once (model, heat maps, key images); their
finished results and images are kept, then written again and again through OutputWriter.write_many,
alternating `writers=0` (every file on the calling thread, as before 2026-11-27) and `writers=N`
(report writer processes), each time into a fresh output folder. Printed per study: wall time, and
the CPU time spent in the run's own process (the calling thread, and with writer processes also the
pool's driver thread, which pickles each study's images to a writer): threads that share the
interpreter lock with the model. That CPU time is what beside a GPU would otherwise stall the threads that feed
the model.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--writers", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.studies < 2:
        parser.error("--studies must be at least 2: the first of each round starts the writers, untimed")

    import numpy as np

    from ichbatch.discover import discover
    from ichbatch.model.locate import default_model
    from ichbatch.pipeline import Engine, RunSettings, select
    from ichbatch.report.outputs import OutputSettings, OutputWriter
    from ichbatch.study import StudyPath
    from ichbatch.synth import Encoding, synth_studies

    with tempfile.TemporaryDirectory() as tmp:
        synth_studies(Path(tmp) / "in", args.studies, seed=5, n_slices=args.slices, size=512,
                      encoding=Encoding(), phantoms="anatomy")
        settings = RunSettings(model=args.model or default_model(), tta=1)
        engine = Engine(settings)
        try:
            finished = list(StudyPath(engine)._finished(select(discover([Path(tmp) / "in"]), settings.rules)))
        finally:
            engine.close()
        seen: dict[int, list[tuple[float, float]]] = {0: [], args.writers: []}
        for n in range(args.repeats + 1):  # the first round starts the writer processes: not counted
            for writers in seen:
                out = Path(tmp) / f"out{n}-{writers}"
                with OutputWriter(OutputSettings(csv=out / "r.csv", reports=out / "reports", writers=writers)) as sink:
                    wall, cpu = _write(sink, finished)
                if n:
                    seen[writers].append((wall, cpu))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{len(finished)} anatomy studies x {args.slices} slices of 512x512, model {engine.bundle.card.display_name}, "
          f"{sum(bool(r.key_slices) for r, _ in finished)} with key images; median of {args.repeats}, each round timed from its second study")
    for writers, got in seen.items():
        wall, cpu = (float(np.median([g[k] for g in got])) / (len(finished) - 1) * 1e3 for k in (0, 1))
        where = "on the calling thread" if not writers else f"in {writers} writer process(es)"
        print(f"  files {where}: {wall:.1f} ms a study wall, {cpu:.1f} ms a study CPU in the run's own process")


def _write(sink, finished) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Wall and CPU seconds of this process to write every study but the first. Nothing else runs in it
    meanwhile (the engine is closed), so its CPU time is the calling thread's and the writer pool's driver
    thread's. The first study, untimed, starts the writer processes (and loads the fonts): a run starts
    them once for all its studies, and until 2026-11-28 their start was counted in every round."""
    for _ in sink.write_many(iter(finished[:1])):
        pass
    start, cpu = time.perf_counter(), time.process_time()
    for _ in sink.write_many(iter(finished[1:])):
        pass
    return time.perf_counter() - start, time.process_time() - cpu


if __name__ == "__main__":
    main()
