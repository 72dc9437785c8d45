"""Batch normalisation folded into the convolution before it, for copies of a network that only infer.

In inference a BatchNormalization layer is an affine map per channel, y = s * (x - mean) + beta with
s = gamma / sqrt(var + eps). After a convolution with no activation of its own, that map can be moved into
the convolution's kernel (times s, per output channel) and bias ((b - mean) * s + beta): the same
function, one pass over the activations fewer.

Why: the heat maps differentiate the network, and there every batch normalisation costs a forward and
a backward pass over its activations, and under a mixed bfloat16 policy two casts to float32 and back
each way as well. On the demo ResNet50 a flagged study's maps take 0.78 of the time folded in bfloat16
(with the weights stored as below), 0.94 in float32 (benchmarks/heatmap_cost.py). onnxruntime already does this fusion for the scores; the
maps come from Keras. Folding takes about a second, once, when the first map is asked for. Under a
mixed policy the copy's convolutions keep their weights in the compute dtype (bfloat16, float16):
what the mixed policy would cast them to at every call.
"""

from __future__ import annotations

import functools
import hashlib
import threading
import weakref
from collections.abc import Collection

import numpy as np


def fold_batchnorm(model, keep: Collection[str] = ()):  # type: ignore[no-untyped-def]
    """A functional model's copy with each foldable Conv2D -> BatchNormalization pair merged into the
    convolution; the normalisation layer stays, by name, as a pass-through (so a heat-map layer named
    after it still finds its output). `keep`: layer names whose own output must not change (a
    convolution named there keeps its normalisation). Returns the model itself when nothing folds."""
    pairs = foldable_pairs(model, keep)
    if not pairs:
        return model
    # The scores' and the heat maps' copies of one network are one copy, as long as its weights are
    # the ones it was folded with.
    key = (tuple(sorted(pairs.items())), _fingerprint(model))
    with _FOLDING:
        made = _FOLDED.setdefault(model, {})
        if key not in made:
            made.clear()
            made[key] = _folded_copy(model, pairs)
        return made[key]


def _fingerprint(model) -> str:  # type: ignore[no-untyped-def]
    from keras import ops

    digest = hashlib.blake2b(digest_size=16)
    for var in model.weights:
        digest.update(np.ascontiguousarray(ops.convert_to_numpy(var)).tobytes())
    return digest.hexdigest()


# source model -> {(its folded pairs, its weights' fingerprint): the folded copy}; an entry goes when its
# source model does.
_FOLDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # type: ignore[type-arg]
_FOLDING = threading.Lock()


def _folded_copy(model, pairs: dict[str, str]):  # type: ignore[no-untyped-def]
    import keras

    convs = set(pairs.values())

    def clone(layer):  # type: ignore[no-untyped-def]
        if layer.name in pairs:
            return _pass_through_class()(name=layer.name, dtype=layer.dtype_policy.name)
        config = layer.get_config()
        if layer.name in convs:
            config["use_bias"] = True  # the normalisation's shift becomes the bias
        policy = layer.dtype_policy
        if type(layer) in (keras.layers.Conv2D, keras.layers.Dense) and policy.name.startswith("mixed_"):
            # A mixed policy casts the float32 weights to the compute dtype at every call: store them in it
            # once instead (the same arithmetic; half the memory, no casts).
            config["dtype"] = policy.compute_dtype
        return layer.__class__.from_config(config)

    folded = keras.models.clone_model(model, clone_function=clone)
    for layer in model.layers:
        if layer.name not in pairs and layer.name not in convs and layer.weights:
            folded.get_layer(layer.name).set_weights(layer.get_weights())
    for norm_name, conv_name in pairs.items():
        kernel, bias = folded_weights(model.get_layer(conv_name), model.get_layer(norm_name))
        folded.get_layer(conv_name).set_weights([kernel, bias])
    return folded


def foldable_pairs(model, keep: Collection[str] = ()) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """{normalisation layer: the convolution it folds into}. A pair folds only when, in this model's
    graph, the convolution is called once, has no activation of its own, and feeds nothing but that
    normalisation, which normalises its channel axis; anything else is left as it is."""
    import keras

    # Keras 3 keeps the functional graph on private fields. A layer's own node lists also hold the calls
    # of other models cut from the same tensors (a heat map's halves), so only this model's nodes count.
    by_depth = getattr(model, "_nodes_by_depth", None)  # a functional model's; others are left alone
    if not by_depth:
        return {}
    nodes = [node for depth in by_depth.values() for node in depth]
    calls: dict[int, int] = {}
    consumers: dict[int, int] = {}
    for node in nodes:
        calls[id(node.operation)] = calls.get(id(node.operation), 0) + 1
        for tensor in node.input_tensors:
            consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    for tensor in model.outputs:
        consumers[id(tensor)] = consumers.get(id(tensor), 0) + 1
    pairs: dict[str, str] = {}
    for node in nodes:
        norm = node.operation
        if not isinstance(norm, keras.layers.BatchNormalization) or len(node.input_tensors) != 1:
            continue
        tensor = node.input_tensors[0]
        conv = tensor._keras_history.operation
        if (
            type(conv) is keras.layers.Conv2D
            and conv.name not in keep
            and calls.get(id(conv)) == 1 and calls[id(norm)] == 1
            and consumers[id(tensor)] == 1
            and conv.activation is keras.activations.linear
            and _channel_axis(norm, conv, len(tensor.shape))
            and not getattr(norm, "renorm", False)
        ):
            pairs[norm.name] = conv.name
    return pairs


def _channel_axis(norm, conv, rank: int) -> bool:  # type: ignore[no-untyped-def]
    axis = norm.axis if isinstance(norm.axis, int) else (norm.axis[0] if len(norm.axis) == 1 else None)
    if axis is None:
        return False
    axis %= rank
    return axis == (rank - 1 if conv.data_format == "channels_last" else 1)


def folded_weights(conv, norm) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    """The convolution's kernel and bias with the normalisation's inference affine map folded in,
    computed in float64 from the stored weights and returned in float32."""
    from keras import ops

    channels = int(conv.filters)
    ones, zeros = np.ones(channels), np.zeros(channels)

    def value(var, default):  # type: ignore[no-untyped-def]
        return default if var is None else np.asarray(ops.convert_to_numpy(var), np.float64)

    gamma = value(norm.gamma if norm.scale else None, ones)
    beta = value(norm.beta if norm.center else None, zeros)
    mean, var = value(norm.moving_mean, zeros), value(norm.moving_variance, ones)
    scale = gamma / np.sqrt(var + norm.epsilon)
    kernel = value(conv.kernel, None)  # (kh, kw, in / groups, out): out is last
    bias = value(conv.bias, None) if conv.use_bias else zeros
    return (kernel * scale).astype(np.float32), ((bias - mean) * scale + beta).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _pass_through_class():  # type: ignore[no-untyped-def]
    import keras

    class PassThrough(keras.layers.Layer):
        """Where a folded normalisation was: its output is now the convolution's."""

        def call(self, inputs, mask=None, training=None):  # type: ignore[no-untyped-def]
            return inputs

        def compute_output_shape(self, input_shape):  # type: ignore[no-untyped-def]
            return input_shape

    return PassThrough
