"""Bare-model vs end-to-end throughput, measured in one run so the ratio is robust to a noisy machine.

    python benchmarks/throughput.py [--model NAME] [--studies 6] [--batch-size 16] [--tta 1] [--phantoms anatomy]
    KERAS_BACKEND=jax python benchmarks/throughput.py --model ich-resnet50-untrained --batch-size 256 \
        --precision float16 --tta 4 --studies 32 --slices 32 --uncompressed --workers 15
                                                  # the README's GPU rows (benchmarks/gpu_session.sh bench)

Bare: the serving model (windowing + TTA views + network) on int16 batches already in memory.
End to end: the study path over generated phantom studies (discovery, decode, resize, inference,
aggregation, CAM for key slices; with --reports also drawing the key slices, each study's PDF, JSON and
thumbnail in the run's report-writer processes, and its CSV row), counted in slices per second at the
same TTA, after one untimed pass that starts the decoder (and writer) processes (once per run, like
compiling the model once). Anatomy phantoms
by default: the demo model is trained on them (on ellipse phantoms it may say "not assessed" and draw
no heat maps, which would flatter the ratio).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

from ichbatch.config import PHANTOM_KINDS  # noqa: E402  (light: no TensorFlow)
from ichbatch.study import FINISH_AHEAD  # noqa: E402


def _generate(job: tuple) -> None:  # type: ignore[type-arg]
    from ichbatch.synth import synth_studies

    folder, seed, n_slices, encoding, phantoms = job
    synth_studies(folder, 1, seed=seed, n_slices=n_slices, size=512, encoding=encoding, phantoms=phantoms)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--studies", type=int, default=6)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--uncompressed", action="store_true",
                        help="store every study explicit VR little endian (default: study i in the generator's "
                             "i-th transfer syntax, cycling through all six)")
    parser.add_argument("--phantoms", default="anatomy", choices=PHANTOM_KINDS)
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--reports", action="store_true",
                        help="end to end also writes each study's reports and CSV row, as `ichbatch run` does")
    parser.add_argument("--keep", type=Path, default=None,
                        help="generate the studies into this folder and keep them; a later run with the same "
                             "studies, slices, codecs and phantoms reuses them (a GPU lease is short)")
    parser.add_argument("--workers", type=int, default=0,
                        help="decoder processes (default: the run's own default, one per core up to 8)")
    args = parser.parse_args()
    setup = Phases()

    import keras
    import numpy as np

    from ichbatch.model.locate import default_model
    from ichbatch.infer import default_device
    from ichbatch.pipeline import Engine, RunSettings, process_studies, select
    from ichbatch.study import StudyPath
    from ichbatch.discover import discover
    from ichbatch.report.outputs import OutputSettings, OutputWriter

    class TimedMaps:  # the explainer, timed: heat maps are the one cost that depends on what is flagged
        def __init__(self, inner) -> None:  # type: ignore[no-untyped-def]
            self.inner, self.seconds, self.calls = inner, 0.0, 0

        def describe(self) -> str:
            return self.inner.describe()

        def maps(self, inputs, output_index):  # type: ignore[no-untyped-def]
            t = time.perf_counter()
            try:
                return self.inner.maps(inputs, output_index)
            finally:
                self.seconds += time.perf_counter() - t
                self.calls += 1

    class Clock:  # where the end-to-end time goes: the scoring thread, and the thread that finishes studies
        def __init__(self) -> None:
            self.decode = self.model = self.finish = 0.0
            # CPU seconds of each thread itself (time.thread_time): what a faster model or more cores
            # cannot hide, since the scoring and finishing threads share one interpreter lock.
            self.model_cpu = self.finish_cpu = self.pool_cpu = 0.0
            self.studies = self.groups = 0

        def waited(self, iterator, pool):  # type: ignore[no-untyped-def]
            pool_clock, pool_cpu = None, 0.0  # the decoder pool's driver thread, read after each slice
            while True:
                t = time.perf_counter()
                try:
                    item = next(iterator)
                except StopIteration:
                    self.pool_cpu += pool_cpu
                    return
                finally:
                    self.decode += time.perf_counter() - t
                if pool_clock is None:
                    pool_clock = time.pthread_getcpuclockid(pool._driver._thread.ident)
                pool_cpu = time.clock_gettime(pool_clock)
                yield item

    clock = Clock()

    settings = RunSettings(model=args.model or default_model(), tta=args.tta, batch_size=args.batch_size,
                           precision=args.precision)
    if args.workers:
        settings = replace(settings, workers=args.workers)
    engine = Engine(settings)
    engine.explainer = timed = TimedMaps(engine.explainer)
    pool_map, model_run = engine.decoders.map, engine.predictor._run

    def timed_run(hu):  # type: ignore[no-untyped-def]
        t, c = time.perf_counter(), time.thread_time()
        try:
            return model_run(hu)
        finally:
            clock.model += time.perf_counter() - t
            clock.model_cpu += time.thread_time() - c

    engine.decoders.map = lambda jobs, depth: clock.waited(pool_map(jobs, depth), engine.decoders)  # type: ignore[method-assign,assignment]
    finish_group = StudyPath._finish_group

    def timed_finish(self, studies):  # type: ignore[no-untyped-def]
        t, c = time.perf_counter(), time.thread_time()
        try:
            return finish_group(self, studies)
        finally:
            clock.finish += time.perf_counter() - t
            clock.finish_cpu += time.thread_time() - c
            clock.studies += len(studies)
            clock.groups += 1

    StudyPath._finish_group = timed_finish  # type: ignore[method-assign]
    size = engine.bundle.card.input_size
    setup.done("imports, model loaded")
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory() as out:
        # One writer for every pass, as one run has: its processes start in the untimed first pass.
        writer = OutputWriter(OutputSettings(csv=Path(out) / "r.csv", reports=Path(out) / "reports")) \
            if args.reports else None
        tmp = args.keep or Path(scratch)
        stored = _studies(tmp, args)
        setup.done("studies generated (or found in --keep)")
        choices = select(discover([tmp]), settings.rules)
        batch = np.random.default_rng(0).integers(-1000, 100, (args.batch_size, size, size)).astype(np.int16)
        engine.predictor.predict(batch)  # compile once before timing either path
        setup.done("model compiled")
        t = time.perf_counter()  # and start the decoder processes once, as a run does for all its studies
        first = process_studies(choices, engine, writer)
        first_rate = first.n_slices / (time.perf_counter() - t)
        setup.done("first pass")
        compiled_first = compile_map_sizes(engine.explainer.inner, size)
        setup.done("heat-map sizes compiled")
        timed.seconds, timed.calls = 0.0, 0
        engine.predictor._run = timed_run  # the bare passes below call it too: counted apart
        bare, e2e, e2e_seconds, e2e_model = [], [], 0.0, 0.0
        clock.decode = clock.finish = clock.finish_cpu = clock.pool_cpu = 0.0
        clock.studies = clock.groups = 0
        scoring_cpu = 0.0
        n_batches = max(1, args.studies * args.slices // args.batch_size)
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            t = time.perf_counter()
            for _ in range(n_batches):
                engine.predictor.predict(batch)
            bare.append(n_batches * args.batch_size / (time.perf_counter() - t))
            model_before, model_cpu_before = clock.model, clock.model_cpu
            t, c = time.perf_counter(), time.thread_time()
            flagged: list[tuple[bool, bool]] = []  # (flagged, and assessed: a study outside the domain gets no maps)
            summary = process_studies(choices, engine, writer,
                                      on_result=lambda r: flagged.append((any(r.flags.values()),
                                                                          r.status.value == "ok")))
            e2e_seconds += time.perf_counter() - t
            e2e_model += clock.model - model_before
            scoring_cpu += time.thread_time() - c - (clock.model_cpu - model_cpu_before)
            e2e.append(summary.n_slices / (time.perf_counter() - t))
        if writer is not None:
            writer.close()
    setup.done("timed passes")
    b, e = float(np.median(bare)), float(np.median(e2e))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"backend {keras.backend.backend()} on {default_device()}")
    print(f"model {engine.bundle.card.display_name}, input {size}px, {engine.precision}, batch {args.batch_size}, TTA {args.tta}, "
          f"{args.studies} {args.phantoms} studies x {args.slices} slices of 512x512, "
          f"stored as: {', '.join(stored)}; end to end {'with' if args.reports else 'without'} reports")
    mapped = sum(f and ok for f, ok in flagged)
    print(f"studies: {dict(summary.counts)}, {sum(f for f, _ in flagged)} flagged, {mapped} of them assessed "
          "(those get heat maps)")
    print(f"bare model:  {b:8.1f} slices/s ({b * args.tta:.1f} images/s)")
    print(f"end to end:  {e:8.1f} slices/s (median of {args.repeats}: {', '.join(f'{x:.1f}' for x in e2e)}; "
          f"the first pass, which also starts the decoder processes: {first_rate:.1f})")
    if timed.calls and mapped:  # one call makes the maps of every such study in a group finished together
        n_mapped = mapped * args.repeats
        print(f"heat maps: {timed.seconds / n_mapped:.2f} s per study with maps, "
              f"{100 * timed.seconds / e2e_seconds:.0f}% of the end-to-end time; {timed.calls} calls for "
              f"{n_mapped} studies with maps; {clock.studies} studies finished in {clock.groups} groups")
    def share(seconds: float) -> str:
        return f"{100 * seconds / e2e_seconds:.0f}%"

    print(f"end-to-end time, scoring thread: model {share(e2e_model)}, waiting for decoded slices "
          f"{share(clock.decode)}, the rest (assembly, waiting for finished studies) "
          f"{share(e2e_seconds - e2e_model - clock.decode)}; finishing thread busy {share(clock.finish)} "
          f"(heat maps {share(timed.seconds)}, aggregation, domain check)")
    n_scored = args.repeats * summary.n_slices
    if not n_scored:  # e.g. studies too short for the card's eligibility rules: nothing reached the model
        raise SystemExit("no slice was scored: every study was set aside before the model (see studies above)")
    print(f"host CPU time, on the threads that share the interpreter lock: scoring thread outside the model "
          f"{1000 * scoring_cpu / n_scored:.2f} ms per slice; decoder pool's driver thread "
          f"{1000 * clock.pool_cpu / n_scored:.2f} ms per slice; finishing thread {1000 * clock.finish_cpu / clock.studies:.1f} "
          f"ms per study ({1000 * clock.finish_cpu / n_scored:.2f} ms per slice)")
    fixed = engine.explainer.inner.padded
    if compiled_first is not None and fixed is not None:
        print(f"heat-map batch sizes compiled before timing: {sorted(compiled_first)}; during the timed passes: "
              f"{sorted(fixed.sizes - compiled_first) or 'none'}")
    print(f"ratio end-to-end / bare: {e / b:.2f}")
    print(f"where this run's {setup.total():.0f} s went: {setup}")


class Phases:
    """Seconds of each phase of the benchmark itself: on a lease of minutes, what to cut next time."""

    def __init__(self) -> None:
        self.start = self.last = time.perf_counter()
        self.seen: list[tuple[str, float]] = []

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.seen.append((name, now - self.last))
        self.last = now
        print(f"  ({name}: {self.seen[-1][1]:.1f} s)", flush=True)

    def total(self) -> float:
        return self.last - self.start

    def __str__(self) -> str:
        return "; ".join(f"{name} {seconds:.1f} s" for name, seconds in self.seen)


def _studies(folder: Path, args: argparse.Namespace) -> list[str]:
    """The studies' folders under `folder`, generated unless an earlier run with the same arguments left
    them (a marker names those arguments); the transfer syntax each is stored in."""
    from ichbatch.synth import TRANSFER_SYNTAXES, Encoding, can_encode

    stored, jobs = [], []
    for i in range(args.studies):  # every codec equally often: a random draw of a few studies is not a mix
        ts = TRANSFER_SYNTAXES[i % len(TRANSFER_SYNTAXES)]
        encoding = Encoding() if args.uncompressed or not can_encode(ts) else Encoding(transfer_syntax=ts)
        stored.append(encoding.transfer_syntax.name)
        jobs.append((folder / f"s{i}", 99 + i, args.slices, encoding, args.phantoms))
    marker = folder / "generated.txt"
    made = f"{args.studies} studies, {args.slices} slices, {args.phantoms}, {stored}"
    if marker.is_file() and marker.read_text() == made:
        return stored
    if folder.is_dir() and any(folder.iterdir()):
        raise SystemExit(f"{folder} holds other files or studies made with other arguments: give an empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    # Generating is not what is measured; spawned, since the model's backend already runs threads.
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_generate, jobs))
    marker.write_text(made)
    return stored


def compile_map_sizes(explainer, size: int) -> set[int] | None:  # type: ignore[no-untyped-def]
    """Compile the heat maps' call (jax.jit; TensorFlow's jit_compile in float32) for every padded batch
    size a group of up to FINISH_AHEAD studies can reach, so the timed passes measure the steady state: a
    run pays each compilation once, for all its studies. None where the maps are not compiled per size;
    else the sizes compiled."""
    import numpy as np

    fixed = explainer.padded
    if fixed is None or not fixed.step:
        return None
    views = 1 + len(explainer.augment)  # maps() sends each image once per view, in one call
    for k in range(1, FINISH_AHEAD + 1):  # the first call's size is one study's key slices and views
        explainer.maps(np.zeros((fixed.step * k // views, size, size, 3), np.float32), 0)
    return set(fixed.sizes)


if __name__ == "__main__":
    main()
