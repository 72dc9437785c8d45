"""A small training fit run eagerly against traced into a graph (TensorFlow), in one run: what sets
`train.EAGER_STEPS`.

    python benchmarks/small_fit.py [--size 32] [--batch-size 4] [--steps 1 4]

The training model `ichbatch train` builds (ResNet50 with the augmentation layers, Adam, AUC metric),
fitted on random images for each number of steps (one step an epoch, a validation step each), first
eagerly, then traced, each in a fresh model. Printed: the wall time of each fit, and from the two the
cost of tracing and the extra cost of an eager step.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def fit_seconds(size: int, batch: int, steps: int, eager: bool) -> float:
    import keras
    import numpy as np

    from ichbatch.model.resnet import build_resnet50
    from ichbatch.train import _quiet_retracing, _training_model

    model = _training_model(build_resnet50(size, 6, seed=0), size, seed=0)
    model.compile(optimizer=keras.optimizers.Adam(1e-4), loss="binary_crossentropy",
                  metrics=[keras.metrics.AUC(multi_label=True, name="auc")], run_eagerly=eager)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 255, (batch, size, size, 3), dtype=np.uint8)
    y = (rng.random((batch, 6)) < 0.5).astype("float32")
    start = time.perf_counter()
    with _quiet_retracing(eager):
        model.fit(x, y, validation_data=(x, y), epochs=steps, batch_size=batch, verbose=0)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, nargs=2, default=[1, 4])
    args = parser.parse_args()

    import keras

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Keras {keras.__version__} on "
          f"{keras.backend.backend()}; {args.size} px, batch {args.batch_size}")
    seconds = {}
    for eager in (True, False):
        for steps in args.steps:
            seconds[eager, steps] = fit_seconds(args.size, args.batch_size, steps, eager)
            print(f"  {'eager' if eager else 'traced'}, {steps} step(s): {seconds[eager, steps]:.1f} s")
    few, many = args.steps
    per_eager = (seconds[True, many] - seconds[True, few]) / (many - few)
    per_traced = (seconds[False, many] - seconds[False, few]) / (many - few)
    tracing = seconds[False, few] - few * per_traced
    print(f"tracing: about {tracing:.1f} s; a step: {per_eager:.2f} s eager, {per_traced:.2f} s traced; "
          f"eager pays off up to about {tracing / max(per_eager - per_traced, 1e-9):.0f} steps")


if __name__ == "__main__":
    main()
