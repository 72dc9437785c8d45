"""What one flagged study's heat maps cost, with the batch normalisations folded into the convolutions
(what a run does) and as trained, interleaved call for call in one process.

    python benchmarks/heatmap_cost.py [--model NAME] [--key-slices 3] [--precision bfloat16 float32] [--repeats 30]

A flagged study's report shows the map of one label on its key slices (three), each averaged over the
card's flips: one call of the card's method (HiResCAM at pool1_pool with the horizontal flip for the
demo model) on key-slices x views images. Inputs are random images in [0, 1]: the cost of the passes
does not depend on what the pixels show. Printed per precision: median and best wall time and CPU time
per call, the ratio folded / as trained, and how far the folded maps are from the maps as trained
(largest difference of maps normalised to [0, 1], and how often the peak is the same pixel).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--key-slices", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()

    import keras
    import numpy as np

    from ichbatch.model.backend import import_backend
    from ichbatch.model.bundle import load_bundle
    from ichbatch.model.gradcam import CamExplainer
    from ichbatch.model.locate import default_model

    import_backend()
    name = args.model or default_model()
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores; Keras {keras.__version__} on {keras.backend.backend()}")
    rng = np.random.default_rng(0)
    for precision in args.precision:
        bundle = load_bundle(name, precision)
        card = bundle.card
        size = card.input_spec.size
        images = rng.random((args.key_slices, size, size, 3)).astype(np.float32)
        explainers = {fold: CamExplainer(bundle.model, card.cam_layer, card.cam_augment, card.cam_method, fold=fold)
                      for fold in (True, False)}
        maps = {fold: e.maps(images, 0) for fold, e in explainers.items()}  # builds and compiles both
        times: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
        for _ in range(args.repeats):
            for fold, e in explainers.items():
                wall, cpu = time.perf_counter(), time.process_time()
                e.maps(images, 0)
                times[fold].append((time.perf_counter() - wall, time.process_time() - cpu))
        print(f"{card.name} {card.version}, {explainers[True].describe()}, {precision}, "
              f"{args.key_slices} key slices x {1 + len(card.cam_augment)} views, {args.repeats} calls each:")
        for fold, label in ((False, "as trained"), (True, "folded")):
            walls = [t[0] * 1000 for t in times[fold]]
            cpus = [t[1] * 1000 for t in times[fold]]
            print(f"  {label:10s}: wall median {statistics.median(walls):6.1f} ms (best {min(walls):6.1f}), "
                  f"CPU median {statistics.median(cpus):6.1f} ms")
        ratio = statistics.median(t[0] for t in times[True]) / statistics.median(t[0] for t in times[False])
        cpu_ratio = statistics.median(t[1] for t in times[True]) / statistics.median(t[1] for t in times[False])
        same = np.mean([np.argmax(a) == np.argmax(b) for a, b in zip(maps[True], maps[False])])
        print(f"  folded / as trained: wall {ratio:.2f}, CPU {cpu_ratio:.2f}; maps differ by at most "
              f"{np.abs(maps[True] - maps[False]).max():.4f}, same peak pixel on {same:.0%} of {len(images)}")


if __name__ == "__main__":
    main()
