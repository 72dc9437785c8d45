"""What the feature-space domain check costs, as a fraction of inference, measured in one run.

    python benchmarks/domain_cost.py [--model ich-resnet50-demo] [--batch-size 16] [--tta 2] [--repeats 5]

Plain: the serving model as run without a domain check (probabilities only). Checked: the same model with
its pooled features as a second output, plus the Mahalanobis distances of every slice. The two are
interleaved batch for batch, so drift in machine load hits both alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ich-resnet50-demo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tta", type=int, default=2)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import keras
    import numpy as np

    from ichbatch.infer import Predictor, default_device
    from ichbatch.model.bundle import load_bundle

    bundle = load_bundle(args.model)
    if bundle.domain is None:
        raise SystemExit(f"{args.model} has no domain check (ichbatch models fit-domain)")
    plain = Predictor(bundle, args.tta, args.batch_size)
    checked = Predictor(bundle, args.tta, args.batch_size, features=True)
    size = bundle.card.input_size
    batch = np.random.default_rng(0).integers(-1000, 100, (args.batch_size, size, size)).astype(np.int16)
    plain.predict(batch), checked.predict_both(batch)  # compile both before timing
    t_plain, t_checked, t_distance = [], [], []
    def time_plain() -> None:
        t = time.perf_counter()
        plain.predict(batch)
        t_plain.append(time.perf_counter() - t)

    def time_checked() -> None:
        t = time.perf_counter()
        _, feats = checked.predict_both(batch)
        t_checked.append(time.perf_counter() - t)
        t = time.perf_counter()
        bundle.domain.slice_distances(feats)
        t_distance.append(time.perf_counter() - t)

    for k in range(args.repeats * args.batches):
        first, second = (time_plain, time_checked) if k % 2 else (time_checked, time_plain)  # no order bias
        first()
        second()
    p, c, d = (float(np.median(v)) for v in (t_plain, t_checked, t_distance))
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"backend {keras.backend.backend()} on {default_device()}")
    print(f"model {bundle.card.display_name}, input {size}px, batch {args.batch_size}, TTA {args.tta}, "
          f"median of {args.repeats * args.batches} batches")
    print(f"inference without check: {1000 * p / args.batch_size:7.2f} ms/slice")
    print(f"inference with features: {1000 * c / args.batch_size:7.2f} ms/slice")
    print(f"distances:               {1000 * d / args.batch_size:7.3f} ms/slice")
    print(f"cost of the domain check: {(c + d - p) / p:+.1%} of inference time")


if __name__ == "__main__":
    main()
