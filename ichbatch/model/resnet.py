"""The default architecture: Keras ResNet50 (no top) -> global average pooling -> Dense(k, sigmoid).

Built from code with weights=None: nothing is ever downloaded. Layer names are stable so the
class-activation map can find the last convolutional block and the head.
"""

from __future__ import annotations

FEATURE_LAYER = "conv5_block3_out"
HEAD_LAYER = "ich_head"
POOL_LAYER = "ich_pool"


def build_resnet50(input_size: int, n_outputs: int, seed: int | None = None):  # type: ignore[no-untyped-def]
    """A ResNet50 classifier on (input_size, input_size, 3) inputs in [0, 1]."""
    import keras

    if input_size < 32:
        raise ValueError(f"ResNet50 needs an input of at least 32 pixels. Received: input_size={input_size}")
    if seed is not None:
        keras.utils.set_random_seed(seed)
    inputs = keras.Input((input_size, input_size, 3), name="image")
    backbone = keras.applications.ResNet50(include_top=False, weights=None, input_tensor=inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(backbone.output)
    outputs = keras.layers.Dense(n_outputs, activation="sigmoid", name=HEAD_LAYER, dtype="float32")(pooled)
    return keras.Model(inputs, outputs, name="ich_resnet50")
