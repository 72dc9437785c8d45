"""The network alone: images/s of a bundle's ResNet50 on inputs already on the device, no windowing or TTA.

    KERAS_BACKEND=jax python benchmarks/network_rate.py --model ich-resnet50-untrained --batch-size 1024 \
        --precision float16 bfloat16

This is the figure the project's GPU anchor is stated in (ResNet50, 224 px, fp16 on one H100: about
25,000 images/s); benchmarks/throughput.py's "bare model" adds windowing, the TTA views and the copy of
int16 slices to the device, and scores on the network with its batch normalisations folded into the
convolutions (ichbatch.model.folding), which this script times too ("folded"). The call is the pipeline's own (ichbatch.model.backend.forward: under JAX
one jit-compiled stateless call, waited for with block_until_ready; elsewhere predict_on_batch),
timed after two warm-up calls.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def rate(model, batch_size: int, seconds: float) -> tuple[float, int]:  # type: ignore[no-untyped-def]
    """(images/s, calls timed) over about `seconds` of steady calls, after two warm-up calls."""
    import keras
    import numpy as np

    from ichbatch.model.backend import forward

    size = model.inputs[0].shape[1]
    x = np.random.default_rng(0).random((batch_size, size, size, 3), dtype=np.float32)  # never zeros
    run = forward(model)  # the inference call the pipeline itself makes
    if keras.backend.backend() == "jax":
        import jax

        x = jax.device_put(x)  # on the device once, as the docstring says

        def call():  # type: ignore[no-untyped-def]
            return jax.block_until_ready(run(x))  # JAX returns before the GPU has finished
    else:
        def call():  # type: ignore[no-untyped-def]
            return run(x)
    for _ in range(2):
        call()
    n, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        call()
        n += 1
    return n * batch_size / (time.perf_counter() - t), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ich-resnet50-untrained")
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1024])
    parser.add_argument("--precision", nargs="+", default=["float16"], choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    import keras

    from ichbatch.infer import default_device
    from ichbatch.model.bundle import load_bundle
    from ichbatch.model.folding import fold_batchnorm

    print(f"backend {keras.backend.backend()} on {default_device()}")
    for precision in args.precision:
        bundle = load_bundle(args.model, precision)
        for name, model in (("as trained", bundle.model), ("folded", fold_batchnorm(bundle.model))):
            for batch in args.batch_size:
                images, calls = rate(model, batch, args.seconds)
                print(f"{bundle.card.display_name}, {bundle.card.input_size}px, {precision}, {name}, batch {batch}: "
                      f"{images:,.0f} images/s ({calls} calls)")


if __name__ == "__main__":
    main()
