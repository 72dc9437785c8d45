"""Keras (TensorFlow backend) against onnxruntime on the same demo network, in one run.

    pip install -c constraints.txt -e ".[cpu,onnx]"
    python benchmarks/onnx_runtime.py [--model ich-resnet50-demo] [--batch-size 16] [--batches 10] [--repeats 3]
                                      [--studies 6]

The bundle's network is exported with Keras' own ONNX export (tf2onnx underneath) and run by
onnxruntime's CPU provider; both get the same float32 batches of windowed images (the part of the
serving model after windowing and TTA), interleaved batch for batch; Keras both as a run calls it (batch
normalisation folded into the convolutions) and on the network as trained. Import time and peak memory are
measured in fresh interpreters: import of the runtime only, and the peak RSS of a process that loads
the model and runs one batch.

Then the whole study path: `ichbatch run` with --runtime keras and --runtime onnx (the bundle's cached
ONNX export) over the same generated studies, alternated, and the largest difference in study
probabilities between them.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _import_seconds(statement: str) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return float(out.stdout.strip().splitlines()[-1])


# VmHWM, not ru_maxrss: ru_maxrss survives exec and would count the forked copy of this big process.
PEAK = ("print([int(l.split()[1]) / 1024 for l in open('/proc/self/status') if l.startswith('VmHWM')][0])")
KERAS_ONE_BATCH = ("import numpy as np; from ichbatch.model.bundle import load_bundle; b = load_bundle({model!r}); "
                   "b.model.predict_on_batch(np.zeros(({n}, {s}, {s}, 3), np.float32)); " + PEAK)
ORT_ONE_BATCH = ("import numpy as np, onnxruntime as ort; "
                 "o = ort.InferenceSession({path!r}, providers=['CPUExecutionProvider']); "
                 "o.run(None, {{o.get_inputs()[0].name: np.zeros(({n}, {s}, {s}, 3), np.float32)}}); " + PEAK)


def _peak_mb(code: str) -> float:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ich-resnet50-demo")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--studies", type=int, default=6, help="Generated studies for the end-to-end part (0: skip it).")
    args = parser.parse_args()

    import numpy as np

    keras_import = _import_seconds("import keras, tensorflow")
    ort_import = _import_seconds("import onnxruntime")

    from ichbatch.model.backend import forward
    from ichbatch.model.bundle import load_bundle
    from ichbatch.model.folding import fold_batchnorm

    bundle = load_bundle(args.model)
    size = bundle.card.input_size
    batch = np.random.default_rng(0).random((args.batch_size, size, size, 3)).astype(np.float32)
    model = bundle.model
    # Keras as a run calls it (normalisations folded into the convolutions, one compiled call) and as trained.
    keras_calls = {"folded": forward(fold_batchnorm(model)), "as trained": forward(model)}
    for call in keras_calls.values():
        call(batch)
    keras_mb = _peak_mb(KERAS_ONE_BATCH.format(model=args.model, n=args.batch_size, s=size))

    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.onnx"
        t = time.perf_counter()
        model.export(str(path), format="onnx", verbose=False)
        export_s = time.perf_counter() - t
        ort_mb = _peak_mb(ORT_ONE_BATCH.format(path=str(path), n=args.batch_size, s=size))
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        session.run(None, {name: batch})

        ort_out = session.run(None, {name: batch})[0]
        difference = float(np.abs(np.asarray(keras_calls["folded"](batch)) - ort_out).max())
        runs = {"ort": lambda: session.run(None, {name: batch}), **{k: (lambda c=c: c(batch)) for k, c in keras_calls.items()}}
        times: dict[str, list[float]] = {k: [] for k in runs}
        order = list(runs)
        for k in range(args.repeats * args.batches):
            for which in (order if k % 2 else order[::-1]):  # alternate the order: no bias to any
                t = time.perf_counter()
                runs[which]()
                times[which].append(time.perf_counter() - t)
    rates = {k: args.batch_size / float(np.median(v)) for k, v in times.items()}
    k_rate, o_rate = rates["folded"], rates["ort"]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"onnxruntime {ort.__version__}, model {bundle.card.display_name} at {size}px, batch {args.batch_size}")
    print(f"images/s:       Keras-TensorFlow {k_rate:8.1f}   onnxruntime {o_rate:8.1f}   ratio ort/keras {o_rate / k_rate:.2f}"
          f"   (Keras on the network as trained, normalisations not folded: {rates['as trained']:.1f})")
    print(f"import time:    Keras-TensorFlow {keras_import:8.2f} s onnxruntime {ort_import:8.2f} s")
    print(f"peak RSS:       Keras-TensorFlow {keras_mb:8.0f} MB onnxruntime {ort_mb:8.0f} MB "
          "(a fresh process that loads the model and runs one batch)")
    print(f"export to ONNX: {export_s:.1f} s; largest difference in probabilities: {difference:.2e}")
    if args.studies:
        _end_to_end(args)


def _end_to_end(args: argparse.Namespace) -> None:
    """Slices per second of the whole study path, Keras against onnxruntime, runs alternated."""
    import numpy as np

    from ichbatch.pipeline import process_folder
    from ichbatch.study import Engine, RunSettings
    from ichbatch.synth import synth_studies

    with tempfile.TemporaryDirectory() as tmp:
        synth_studies(Path(tmp) / "studies", args.studies, seed=5)
        os.environ.setdefault("ICHBATCH_CACHE", str(Path(tmp) / "cache"))
        engines = {r: Engine(RunSettings(model=args.model, runtime=r, tta=2, batch_size=args.batch_size))
                   for r in ("keras", "onnx")}
        rates: dict[str, list[float]] = {r: [] for r in engines}
        probs: dict[str, dict[str, float]] = {r: {} for r in engines}
        for k in range(2 * args.repeats):
            for r in (("keras", "onnx") if k % 2 else ("onnx", "keras")):
                def keep(result, r=r):  # type: ignore[no-untyped-def]
                    probs[r].update({result.study.study_uid + label: v for label, v in result.study_probs.items()})

                summary = process_folder([Path(tmp) / "studies"], engines[r].settings, on_result=keep, engine=engines[r])
                if k:  # the first round warms both up
                    rates[r].append(summary.n_slices / summary.seconds)
        for engine in engines.values():
            engine.close()
    diff = max(abs(probs["keras"][key] - probs["onnx"][key]) for key in probs["keras"])
    k_rate, o_rate = float(np.median(rates["keras"])), float(np.median(rates["onnx"]))
    print(f"ichbatch run, {args.studies} studies x 24 slices, --tta 2, whole study path (decode, model, reports off): "
          f"slices/s keras {k_rate:.1f}, onnx {o_rate:.1f}, ratio {o_rate / k_rate:.2f}; "
          f"largest difference in study probabilities {diff:.2e}")


if __name__ == "__main__":
    main()
