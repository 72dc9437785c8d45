"""Stage 4: the streaming batched inference engine.

Slices are decoded by worker processes (ichbatch.workers) a bounded distance ahead of the model, so
decoding overlaps model execution and memory is bounded by batch size and prefetch depth, never by study
or folder size.
Every batch has the same size (the last one is padded) so the compiled predict function is traced once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from .model.bundle import Bundle
from .preprocess import MAX_TTA, tta_views, window_ops


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


def default_tta(device: str) -> int:
    """Fewer views on CPU, where each costs a whole ResNet50 forward pass."""
    return MAX_TTA if device == "gpu" else 2


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2)))


class Predictor:
    """Windowing, TTA views and the network in one compiled call on int16 HU batches."""

    def __init__(self, bundle: Bundle, tta: int, batch_size: int, features: bool = False) -> None:
        """features: also return each slice's pooled features (for the domain check), at no extra pass."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1. Received: batch_size={batch_size}")
        self.bundle = bundle
        self.tta = tta
        self.batch_size = batch_size
        self.size = bundle.card.input_size
        self.features = features
        self.serving = build_serving_model(bundle, tta, features)
        self._call = _jax_call(self.serving) or self.serving.predict_on_batch

    def predict(self, hu_batch: np.ndarray) -> np.ndarray:
        """(n, S, S) int16 HU, n <= batch_size -> (n, outputs) probabilities averaged over the views."""
        return self.predict_both(hu_batch)[0]

    def predict_both(self, hu_batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities averaged over the views and (with features=True) the pooled features of view 0."""
        n = hu_batch.shape[0]
        if n < self.batch_size:
            pad = np.full((self.batch_size - n, self.size, self.size), -1024, np.int16)
            hu_batch = np.concatenate([hu_batch, pad])
        out = self._call(hu_batch)
        if self.features:
            probs, feats = out
            return np.asarray(probs, np.float32)[:n], np.asarray(feats, np.float32)[:n]
        return np.asarray(out, np.float32)[:n], None

    def stream(self, items: Iterable[tuple[Any, np.ndarray]]) -> Iterator[tuple[Any, np.ndarray, np.ndarray | None]]:
        """(key, int16 slice) -> (key, probabilities, features or None), in input order, in fixed-size batches."""
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


def _jax_call(serving):  # type: ignore[no-untyped-def]
    """Under JAX: one jit-compiled stateless call with the variables kept on the device.

    predict_on_batch re-enters Keras' training-loop machinery on every call; on a GPU that overhead
    is several times the ResNet50 forward pass itself.
    """
    import keras

    if keras.backend.backend() != "jax":
        return None
    import jax

    trainable = [v.value for v in serving.trainable_variables]
    non_trainable = [v.value for v in serving.non_trainable_variables]

    @jax.jit
    def call(tv, ntv, x):  # type: ignore[no-untyped-def]
        out, _ = serving.stateless_call(tv, ntv, x, training=False)
        return out

    return lambda x: call(trainable, non_trainable, x)


def feature_model(model):  # type: ignore[no-untyped-def]
    """The same network with a second output: the input of its last Dense layer (the pooled features)."""
    import keras

    head = next((layer for layer in reversed(model.layers) if isinstance(layer, keras.layers.Dense)), None)
    if head is None:
        raise ValueError("the model has no Dense head whose input could serve as its features")
    return keras.Model(model.inputs[0], [model.outputs[0], head.input])


def build_serving_model(bundle: Bundle, tta: int, features: bool = False):  # type: ignore[no-untyped-def]
    """int16 HU (B, S, S) -> windows -> TTA views -> network -> mean over views, as one Keras model."""
    import keras

    card = bundle.card
    size = card.input_size

    class WindowViews(keras.layers.Layer):
        def call(self, hu):  # type: ignore[no-untyped-def]
            return tta_views(window_ops(hu, card.windows), tta)

        def compute_output_shape(self, shape):  # type: ignore[no-untyped-def]
            batch = None if shape[0] is None else shape[0] * tta
            return (batch, size, size, 3)

    class ViewMean(keras.layers.Layer):
        def call(self, probs):  # type: ignore[no-untyped-def]
            k = probs.shape[-1]
            return keras.ops.mean(keras.ops.reshape(probs, (tta, -1, k)), axis=0)

        def compute_output_shape(self, shape):  # type: ignore[no-untyped-def]
            return (None, shape[-1])

    hu = keras.Input((size, size), dtype="int16", name="hu")
    views = WindowViews(name="window_views")(hu)
    if not features:
        return keras.Model(hu, ViewMean(name="view_mean")(bundle.model(views)), name="ich_serving")
    class FirstView(keras.layers.Layer):
        """The features of view 0, the image as it is: the domain check must not depend on --tta."""

        def call(self, feats):  # type: ignore[no-untyped-def]
            k = feats.shape[-1]
            return keras.ops.reshape(feats, (tta, -1, k))[0]

        def compute_output_shape(self, shape):  # type: ignore[no-untyped-def]
            return (None, shape[-1])

    probs, pooled = feature_model(bundle.model)(views)
    outputs = [ViewMean(name="view_mean")(probs), FirstView(name="first_view_features")(pooled)]
    return keras.Model(hu, outputs, name="ich_serving")
