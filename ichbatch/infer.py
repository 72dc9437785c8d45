"""Stage 4: the streaming batched inference engine.

Slices are decoded by worker processes (ichbatch.workers) a bounded distance ahead of the model, so
decoding overlaps model execution and memory is bounded by batch size and prefetch depth, never by study
or folder size.
Every batch has the same size (the last one is padded) so the compiled predict function is traced once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .model.backend import forward
from .model.bundle import Bundle
from .model.folding import fold_batchnorm
from .model.inputs import prepare_layer, preparer, to_probabilities
from .preprocess import MAX_TTA


def default_device() -> str:
    """'gpu' when the Keras backend sees one, else 'cpu'."""
    import keras

    backend = keras.backend.backend()
    try:
        if backend == "jax":
            import jax

            return "gpu" if any(d.platform == "gpu" for d in jax.devices()) else "cpu"
        if backend == "tensorflow":
            import tensorflow as tf

            return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    except Exception:  # a broken GPU runtime must not stop a CPU run
        return "cpu"
    return "cpu"


def cpu_has_bfloat16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX), as oneDNN uses through
    TensorFlow. Without it bfloat16 is emulated, and slower than float32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:  # not Linux: assume not
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def default_tta(device: str) -> int:
    """Fewer views on CPU, where each costs a whole ResNet50 forward pass."""
    return MAX_TTA if device == "gpu" else 2


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


class Predictor:
    """The card's input preparation, TTA views and the network on int16 HU batches, then the card's
    activation, the mean over views and its output mapping. Keras bundles run it all as one compiled
    call; ONNX bundles prepare the input with the same keras.ops code and run the network in onnxruntime."""

    def __init__(self, bundle: Bundle, tta: int, batch_size: int, features: bool = False) -> None:
        """features: also return each slice's pooled features (for the domain check), at no extra pass."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
        self.bundle = bundle
        self.tta = tta
        self.batch_size = batch_size
        self.features = features
        if bundle.card.architecture == "onnx":
            self._run = onnx_runner(bundle, tta, features)
        else:
            self.serving = build_serving_model(bundle, tta, features)
            self._run = keras_runner(self.serving, features)

    def predict(self, hu_batch: np.ndarray) -> np.ndarray:
        """(n, S, S) or (n, 2k+1, S, S) int16 HU, n <= batch_size -> (n, outputs) probabilities."""
        return self.predict_both(hu_batch)[0]

    def predict_both(self, hu_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities averaged over the views and (with features=True) the pooled features of view 0."""
        if hu_batch.ndim == 3:
            hu_batch = hu_batch[:, None]
        n = hu_batch.shape[0]
        if n < self.batch_size:
            pad = np.full((self.batch_size - n, *hu_batch.shape[1:]), -1024, np.int16)
            hu_batch = np.concatenate([hu_batch, pad])
        raw, feats = self._run(hu_batch)
        card = self.bundle.card
        probs = to_probabilities(raw, card.output_activation, self.tta, card.output_map)[:n]
        # View v of image b is row v * batch + b: view 0, the image as it is, comes first.
        return probs, None if feats is None else np.asarray(feats, np.float32)[:n]

    def stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        """(key, int16 slice or slice stack) -> (key, probabilities, features or None), in input order,
        in fixed-size batches."""
        keys: list[Any] = []
        arrays: list[np.ndarray] = []
        for key, arr in items:
            keys.append(key)
            arrays.append(arr)
            if len(keys) == self.batch_size:
                yield from self._batch(keys, arrays)
                keys, arrays = [], []
        if keys:
            yield from self._batch(keys, arrays)

    def _batch(self, keys: list[Any], arrays: list[np.ndarray]) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        probs, feats = self.predict_both(np.stack(arrays))
        for k, key in enumerate(keys):
            yield key, probs[k], None if feats is None else feats[k]


def keras_runner(serving, features: bool):  # type: ignore[no-untyped-def]
    """(B, D, S, S) HU -> (raw outputs of every view, pooled features of every view or None)."""
    call = forward(serving)

    def run(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        out = call(hu)
        if features:
            return np.asarray(out[0]), np.asarray(out[1])
        return np.asarray(out), None

    return run


def onnx_runner(bundle: Bundle, tta: int, features: bool):  # type: ignore[no-untyped-def]
    """The same input preparation, compiled on its own, in front of onnxruntime."""
    network = bundle.model
    prepare = preparer(bundle.card.input_spec, tta)

    def run(hu: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        raw, maps = network.run(prepare(hu), features)
        return raw, None if maps is None else network.pooled(maps)

    return run


def feature_model(model):  # type: ignore[no-untyped-def]
    """The same network with a second output: the input of its last Dense layer (the pooled features)."""
    import keras

    head = next((layer for layer in reversed(model.layers) if isinstance(layer, keras.layers.Dense)), None)
    if head is None:
        raise ValueError("the model has no Dense head whose input could serve as its features")
    return keras.Model(model.inputs[0], [model.outputs[0], head.input])


def build_serving_model(bundle: Bundle, tta: int, features: bool = False):  # type: ignore[no-untyped-def]
    """int16 HU (B, D, S, S) -> the card's channels -> TTA views -> network, as one Keras model.
    Outputs are per view (view v of image b at row v * B + b); Predictor averages them."""
    import keras

    spec = bundle.card.input_spec
    # Batch normalisation folded into the convolutions: the same scores in 0.89 of the time in float32,
    # 0.68 in bfloat16 (Keras-TensorFlow on a CPU), and the heat maps share this copy (folding.py).
    network = fold_batchnorm(bundle.model)
    hu = keras.Input((spec.depth, spec.size, spec.size), dtype="int16", name="hu")
    views = prepare_layer(spec, tta)(hu)
    if not features:
        return keras.Model(hu, network(views), name="ich_serving")
    return keras.Model(hu, feature_model(network)(views), name="ich_serving")
