"""What one flagged study's heat maps cost, two ways side by side, interleaved call for call in one
process: with the batch normalisations folded into the convolutions (what a run does) and as trained
(`--compare fold`, the default), or the folded network's features-and-gradients call compiled by XLA
(what a run does under TensorFlow in float32) and as a plain TensorFlow graph (`--compare xla`).

    python benchmarks/heatmap_cost.py [--model NAME] [--key-slices 3] [--precision bfloat16 float32] [--repeats 30]
                                      [--compare fold|xla]

A flagged study's report shows the map of one label on its key slices (three), each averaged over the
card's flips: one call of the card's method (HiResCAM at pool1_pool with the horizontal flip for the
demo model) on key-slices x views images. Inputs are random images in [0, 1]: the cost of the passes
does not depend on what the pixels show. Printed per precision: median and best wall time and CPU time
per call of each, the ratio of the second to the first, and how far their maps are apart (largest
difference of maps normalised to [0, 1], and how often the peak is the same pixel).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


# What --compare sets side by side: (label, CamExplainer options) for each of the two.
VARIANTS: dict[str, tuple[tuple[str, dict[str, bool]], tuple[str, dict[str, bool]]]] = {
    "fold": (("as trained", {"fold": False}), ("folded", {"fold": True})),
    "xla": (("graph", {"xla": False}), ("XLA", {"xla": True})),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--key-slices", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--compare", choices=sorted(VARIANTS), default="fold",
                        help="fold: the folded network against the network as trained (both as a run compiles "
                             "them); xla: the folded network's call compiled by XLA against a plain TensorFlow graph")
    args = parser.parse_args()

    import keras
    import numpy as np

    from ichbatch.model.backend import import_backend
    from ichbatch.model.bundle import load_bundle
    from ichbatch.model.gradcam import CamExplainer
    from ichbatch.model.locate import default_model

    import_backend()
    if args.compare == "xla" and keras.backend.backend() != "tensorflow":
        raise SystemExit("--compare xla compares TensorFlow's two ways; under JAX every call is compiled by XLA")
    name = args.model or default_model()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Keras {keras.__version__} on {keras.backend.backend()}")
    rng = np.random.default_rng(0)
    for precision in args.precision:
        bundle = load_bundle(name, precision)
        card = bundle.card
        size = card.input_spec.size
        images = rng.random((args.key_slices, size, size, 3)).astype(np.float32)
        first, second = VARIANTS[args.compare]
        explainers = {label: CamExplainer(bundle.model, card.cam_layer, card.cam_augment, card.cam_method, **options)
                      for label, options in (first, second)}
        maps = {label: e.maps(images, 0) for label, e in explainers.items()}  # builds and compiles both
        times: dict[str, list[tuple[float, float]]] = {label: [] for label in explainers}
        for _ in range(args.repeats):
            for label, e in explainers.items():
                wall, cpu = time.perf_counter(), time.process_time()
                e.maps(images, 0)
                times[label].append((time.perf_counter() - wall, time.process_time() - cpu))
        print(f"{card.name} {card.version}, {explainers[second[0]].describe()}, {precision}, "
              f"{args.key_slices} key slices x {1 + len(card.cam_augment)} views, {args.repeats} calls each:")
        for label in explainers:
            walls = [t[0] * 1000 for t in times[label]]
            cpus = [t[1] * 1000 for t in times[label]]
            print(f"  {label:10s}: wall median {statistics.median(walls):6.1f} ms (best {min(walls):6.1f}), "
                  f"CPU median {statistics.median(cpus):6.1f} ms")
        a, b = times[first[0]], times[second[0]]
        ratio = statistics.median(t[0] for t in b) / statistics.median(t[0] for t in a)
        cpu_ratio = statistics.median(t[1] for t in b) / statistics.median(t[1] for t in a)
        m1, m2 = maps[first[0]], maps[second[0]]
        same = np.mean([np.argmax(x) == np.argmax(y) for x, y in zip(m2, m1)])
        print(f"  {second[0]} / {first[0]}: wall {ratio:.2f}, CPU {cpu_ratio:.2f}; maps differ by at most "
              f"{np.abs(m2 - m1).max():.4f}, same peak pixel on {same:.0%} of {len(images)}")


if __name__ == "__main__":
    main()
