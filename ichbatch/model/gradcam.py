"""Class-activation maps, batched.

For a GAP -> Dense head, Grad-CAM equals the class activation map: the last convolutional features
weighted by the dense kernel's column for the label (the sigmoid's derivative is a positive factor per
image, which the per-map normalisation removes). That needs no gradients and is backend-neutral.
Other heads fall back to gradient Grad-CAM, which needs the backend's autodiff (TensorFlow or JAX).
"""

from __future__ import annotations

import numpy as np


class CamExplainer:
    """Heat maps in [0, 1] at the model's input size, for any output of the model."""

    def __init__(self, model) -> None:  # type: ignore[no-untyped-def]
        import keras

        self.model = model
        gap, head = _gap_dense_head(model)
        if gap is not None:
            self.mode = "cam"
            self.kernel = keras.ops.convert_to_numpy(head.kernel).astype(np.float32)
            self.features = keras.Model(model.inputs, gap.input)
        else:
            self.mode = "gradcam"
            conv = _last_conv_output(model)
            self.features = keras.Model(model.inputs, [conv, model.outputs[0]])

    def maps(self, images: np.ndarray, output_index: int) -> np.ndarray:
        """images (B, S, S, 3) float in [0, 1] -> (B, S, S) maps in [0, 1]."""
        if self.mode == "cam":
            feats = np.asarray(self.features.predict_on_batch(images), np.float32)
            raw = feats @ self.kernel[:, output_index]
        else:
            raw = gradcam_raw(self.features, images, output_index)
        return _normalise_and_resize(raw, images.shape[1])

    def gradcam(self, images: np.ndarray, output_index: int) -> np.ndarray:
        """Gradient Grad-CAM regardless of head (used to check the CAM shortcut)."""
        import keras

        conv = self.features.outputs[0] if self.mode == "gradcam" else self.features.output
        model = keras.Model(self.model.inputs, [conv, self.model.outputs[0]])
        return _normalise_and_resize(gradcam_raw(model, images, output_index), images.shape[1])


def _gap_dense_head(model):  # type: ignore[no-untyped-def]
    import keras

    layers = model.layers
    if len(layers) >= 2 and isinstance(layers[-1], keras.layers.Dense) and isinstance(
        layers[-2], keras.layers.GlobalAveragePooling2D
    ):
        return layers[-2], layers[-1]
    return None, None


def _last_conv_output(model):  # type: ignore[no-untyped-def]
    for layer in reversed(model.layers):
        shape = getattr(layer, "output", None)
        if shape is not None and len(layer.output.shape) == 4:
            return layer.output
    raise ValueError("model has no layer with a 4-D (convolutional) output for Grad-CAM")


def gradcam_raw(feature_model, images: np.ndarray, output_index: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    """sum_k ReLU-free (mean of d y_c / d A_k) * A_k, per image, at the feature resolution."""
    import keras

    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(images, tf.float32)
        with tf.GradientTape() as tape:
            feats, probs = feature_model(x, training=False)
            score = tf.reduce_sum(probs[:, output_index])
        grads = tape.gradient(score, feats)
        feats, grads = feats.numpy(), grads.numpy()
    elif backend == "jax":
        import jax.numpy as jnp

        feats, grads = _jax_feature_grads(feature_model, jnp.asarray(images), output_index)
    else:
        raise NotImplementedError(f"gradient Grad-CAM is not implemented for the {backend} backend")
    weights = grads.mean(axis=(1, 2))  # (B, C)
    return np.einsum("bhwc,bc->bhw", feats, weights)


def _jax_feature_grads(feature_model, x, output_index: int):  # type: ignore[no-untyped-def]
    """d score / d features under JAX: rebuild the layers after the features as a head, differentiate it."""
    import jax
    import jax.numpy as jnp
    import keras

    conv_out = feature_model.outputs[0]
    # Split the graph at the feature tensor: head(features) recomputed from the conv output onward.
    head_input = keras.Input(tuple(conv_out.shape[1:]))
    idx = next(i for i, layer in enumerate(feature_model.layers) if layer.output is conv_out)
    h = head_input
    for layer in feature_model.layers[idx + 1 :]:
        h = layer(h)
    head = keras.Model(head_input, h)
    feats = feature_model(x, training=False)[0]

    def score(f):  # type: ignore[no-untyped-def]
        return jnp.sum(head(f, training=False)[:, output_index])

    grads = jax.grad(score)(feats)
    return np.asarray(feats), np.asarray(grads)


def _normalise_and_resize(raw: np.ndarray, size: int) -> np.ndarray:
    import cv2

    raw = np.maximum(np.asarray(raw, np.float32), 0)
    out = np.empty((raw.shape[0], size, size), np.float32)
    for i, m in enumerate(raw):
        top = float(m.max())
        m = m / top if top > 0 else m
        out[i] = cv2.resize(m, (size, size), interpolation=cv2.INTER_CUBIC)
    return np.clip(out, 0, 1)


def overlay(gray_u8: np.ndarray, heat: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """Brain-window slice (uint8) with a heat map (any size, [0, 1]) as a JET overlay -> RGB uint8."""
    import cv2

    heat = cv2.resize(heat.astype(np.float32), gray_u8.shape[::-1], interpolation=cv2.INTER_CUBIC)
    colour = cv2.applyColorMap((np.clip(heat, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    base = np.repeat(gray_u8[..., None], 3, axis=2)
    weight = (alpha * np.clip(heat, 0, 1))[..., None]
    return (base * (1 - weight) + colour * weight).astype(np.uint8)
