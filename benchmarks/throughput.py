"""Bare-model vs end-to-end throughput, measured in one run so the ratio is robust to a noisy machine.

    python benchmarks/throughput.py [--model NAME] [--studies 4] [--batch-size 16] [--tta 1] [--phantoms anatomy]
    KERAS_BACKEND=jax python benchmarks/throughput.py --model ich-resnet50-untrained --batch-size 256 \
        --precision bfloat16 --studies 40 --slices 32        # the GPU figure the README asks for

Bare: the serving model (windowing + TTA views + network) on int16 batches already in memory.
End to end: `process_folder` over generated phantom studies (discovery, decode, resize, inference,
aggregation, CAM for key slices; no PDF), counted in slices per second at the same TTA. Anatomy phantoms
by default: the demo model is trained on them (on ellipse phantoms it may say "not assessed" and draw
no heat maps, which would flatter the ratio).
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
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uncompressed", action="store_true",
                        help="store every study explicit VR little endian (default: the generator's mix of codecs)")
    parser.add_argument("--phantoms", default="anatomy", choices=["anatomy", "ellipse"])
    parser.add_argument("--precision", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    args = parser.parse_args()

    import keras
    import numpy as np

    from ichbatch.model.locate import default_model
    from ichbatch.infer import default_device
    from ichbatch.pipeline import Engine, RunSettings, process_studies, select
    from ichbatch.discover import discover
    from ichbatch.synth import Encoding, synth_studies

    settings = RunSettings(model=args.model or default_model(), tta=args.tta, batch_size=args.batch_size,
                           precision=args.precision)
    engine = Engine(settings)
    size = engine.bundle.card.input_size
    with tempfile.TemporaryDirectory() as tmp:
        synth_studies(Path(tmp), args.studies, seed=99, n_slices=args.slices, size=512,
                      encoding=Encoding() if args.uncompressed else None, phantoms=args.phantoms)
        choices = select(discover([tmp]), settings.rules)
        batch = np.random.default_rng(0).integers(-1000, 100, (args.batch_size, size, size)).astype(np.int16)
        engine.predictor.predict(batch)  # compile once before timing either path
        bare, e2e = [], []
        n_batches = max(1, args.studies * args.slices // args.batch_size)
        for _ in range(args.repeats):  # interleaved, so drift in machine load hits both alike
            t = time.perf_counter()
            for _ in range(n_batches):
                engine.predictor.predict(batch)
            bare.append(n_batches * args.batch_size / (time.perf_counter() - t))
            t = time.perf_counter()
            flagged: list[bool] = []
            summary = process_studies(choices, engine, on_result=lambda r: flagged.append(any(r.flags.values())))
            e2e.append(summary.n_slices / (time.perf_counter() - t))
    b, e = float(np.median(bare)), float(np.median(e2e))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"backend {keras.backend.backend()} on {default_device()}")
    print(f"model {engine.bundle.card.display_name}, input {size}px, {engine.precision}, batch {args.batch_size}, TTA {args.tta}, "
          f"{args.studies} {args.phantoms} studies x {args.slices} slices of 512x512, "
          f"{'uncompressed' if args.uncompressed else 'mixed transfer syntaxes'}")
    print(f"studies: {dict(summary.counts)}, {sum(flagged)} flagged (those get heat maps)")
    print(f"bare model:  {b:8.1f} slices/s ({b * args.tta:.1f} images/s)")
    print(f"end to end:  {e:8.1f} slices/s")
    print(f"ratio end-to-end / bare: {e / b:.2f}")


if __name__ == "__main__":
    main()
