"""What finishing one study costs the model's process: wall time and the finishing thread's own CPU.

    python benchmarks/finish_cost.py [--model NAME] [--studies 8] [--slices 32] [--repeats 5] [--groups 1 8]
    KERAS_BACKEND=jax JAX_PLATFORMS=cpu python benchmarks/finish_cost.py --model PATH-TO-A-TINY-MODEL

Generated anatomy studies of 512x512 slices (explicit VR little endian) are scored once through the
study path; then each scored study is finished (calibration, aggregation, domain check, heat maps of
its key slices) again and again on this thread, as the study path's finishing thread does, in groups
of each size given (a finishing thread takes the studies that queued while it was busy together, with
one heat-map call for all; the sizes are interleaved per repeat). Printed per group size: per study,
the median over repeats of the wall time and of this thread's CPU time (time.thread_time), the host
work that shares the interpreter lock with the model. Beside a GPU that CPU time, not the
wall time, bounds end to end; a model that costs little on a CPU (a small Keras model imported with
`ichbatch models import`) makes the host part stand out here.
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

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _generate(job: tuple[Path, int, int]) -> None:
    from ichbatch.synth import Encoding, synth_studies

    folder, seed, n_slices = job
    synth_studies(folder, 1, seed=seed, n_slices=n_slices, size=512, encoding=Encoding(), phantoms="anatomy")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--studies", type=int, default=8)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2, help="decoder processes for the one scoring pass")
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 8], help="studies finished together")
    args = parser.parse_args()

    import keras
    import numpy as np

    from ichbatch.discover import discover
    from ichbatch.model.locate import default_model
    from ichbatch.pipeline import Engine, RunSettings, select
    from ichbatch.study import StudyPath

    with tempfile.TemporaryDirectory() as tmp:
        # Generating is not what is measured; spawned, since the model's backend already runs threads.
        jobs = [(Path(tmp) / f"s{i}", 99 + i, args.slices) for i in range(args.studies)]
        with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(_generate, jobs))
        engine = Engine(RunSettings(model=args.model or default_model(), tta=1, batch_size=32,
                                    workers=args.workers))
        try:
            path = StudyPath(engine)
            scored = [(*study, 0.0) for study in path._score(select(discover([tmp]), engine.settings.rules))]

            def finish_all(size: int) -> list:  # type: ignore[type-arg]
                return [done for n in range(0, len(scored), size) for done in path._finish_group(scored[n:n + size])]

            warm = {size: finish_all(size) for size in args.groups}  # once untimed: compiles each batch's call
            flagged = sum(any(result.flags.values()) for result, _ in warm[args.groups[0]])
            walls: dict[int, list[float]] = {size: [] for size in args.groups}
            cpus: dict[int, list[float]] = {size: [] for size in args.groups}
            for _ in range(args.repeats):
                for size in args.groups:
                    wall, cpu = time.perf_counter(), time.thread_time()
                    finish_all(size)
                    walls[size].append((time.perf_counter() - wall) / len(scored))
                    cpus[size].append((time.thread_time() - cpu) / len(scored))
        finally:
            engine.close()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; backend "
          f"{keras.backend.backend()}; model {engine.bundle.card.display_name}; {len(scored)} anatomy studies x "
          f"{args.slices} slices of 512x512, {flagged} flagged (heat maps for those)")
    for size in args.groups:
        print(f"finishing a study, {size} at a time: {1000 * float(np.median(walls[size])):.2f} ms wall, "
              f"{1000 * float(np.median(cpus[size])):.2f} ms CPU of the finishing thread (median of {args.repeats})")


if __name__ == "__main__":
    main()
