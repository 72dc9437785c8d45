"""What a model takes and gives, as its card says: the one place that turns HU slices into the tensor a
network expects, and the network's raw outputs into our labels' probabilities.

Input: a stack of D = 2k+1 HU slices per image (k: the card's `context`, slices s-k..s+k) -> channels
(one per window per slice, or raw HU times a scale) in the card's order -> range and mean/std
normalisation -> TTA views -> NHWC or NCHW. Written with keras.ops so it runs inside a compiled Keras
model (on the GPU when there is one) and, as a small compiled model of its own, in front of onnxruntime
and the heat maps.

Output: the card's activation (a sigmoid or softmax the model already applied, or logits that need
one) -> mean over TTA views -> the outputs the card maps to labels.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..config import Window

LAYOUTS = ("nhwc", "nchw")
CHANNELS = ("windows", "hu")
ORDERS = ("slice-major", "window-major")
ACTIVATIONS = ("sigmoid", "softmax", "logits", "softmax-logits")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """The model's input, from the card. Channel c of a slice-major input is window c % W of slice
    c // W (slices s-k..s+k); window-major puts all slices of window 0 first."""

    size: int
    windows: tuple[Window, ...]
    channels: str = "windows"  # or "hu": one channel per slice, (HU - offset) / scale, not clipped
    hu_offset: float = 0.0
    hu_scale: float = 1.0
    layout: str = "nhwc"
    context: int = 0
    order: str = "slice-major"
    value_range: tuple[float, float] = (0.0, 1.0)  # what a window's [0, 1] is stretched to
    mean: tuple[float, ...] = ()  # subtracted per channel after the range (1, per-slice or all channels)
    std: tuple[float, ...] = ()

    @property
    def per_slice(self) -> int:
        return len(self.windows) if self.channels == "windows" else 1

    @property
    def depth(self) -> int:
        return 2 * self.context + 1

    @property
    def n_channels(self) -> int:
        return self.per_slice * self.depth

    def shape(self) -> tuple[int, int, int]:
        """The input's shape without the batch axis."""
        s, c = self.size, self.n_channels
        return (c, s, s) if self.layout == "nchw" else (s, s, c)

    def describe(self) -> str:
        chans = ",".join(w.name for w in self.windows) if self.channels == "windows" else \
            f"(HU - {self.hu_offset:g}) / {self.hu_scale:g}"
        ctx = f", slices s-{self.context}..s+{self.context} ({self.order})" if self.context else ""
        return f"{self.layout.upper()} {self.size}x{self.size}x{self.n_channels}: {chans}{ctx}"

    def problems(self) -> list[str]:
        out = []
        if self.layout not in LAYOUTS:
            out.append(f"layout must be one of {list(LAYOUTS)}. Received: {self.layout!r}")
        if self.channels not in CHANNELS:
            out.append(f"channels must be one of {list(CHANNELS)}. Received: {self.channels!r}")
        if self.order not in ORDERS:
            out.append(f"context_order must be one of {list(ORDERS)}. Received: {self.order!r}")
        if isinstance(self.context, bool) or not isinstance(self.context, int) or not 0 <= self.context <= 8:
            return out + [f"context must be a whole number from 0 to 8. Received: {self.context!r}"]
        if self.channels == "windows" and not self.windows:
            out.append("channels 'windows' needs at least one window")
        if self.channels == "hu" and not self.hu_scale:
            out.append("hu_scale.scale must not be 0")
        for name, values in (("mean", self.mean), ("std", self.std)):
            allowed = sorted({1, self.per_slice, self.n_channels})
            if values and len(values) not in allowed:
                out.append(f"normalisation {name} has {len(values)} values; expected {' or '.join(map(str, allowed))} "
                           f"(one for all channels, one per channel of a slice, or one per input channel; "
                           f"the input has {self.n_channels}: {self.describe()})")
        if len(self.mean) != len(self.std) and self.mean and self.std:
            out.append("normalisation mean and std must have the same number of values")
        if any(s == 0 for s in self.std):
            out.append("normalisation std must not contain 0")
        return out

    def _per_channel(self, values: tuple[float, ...], default: float) -> np.ndarray:
        if not values:
            return np.full(self.n_channels, default, np.float32)
        if len(values) == 1:
            return np.full(self.n_channels, values[0], np.float32)
        if len(values) == self.n_channels:
            return np.asarray(values, np.float32)
        # One value per slice channel, repeated for every context slice in the card's order.
        per = np.asarray(values, np.float32)
        return np.tile(per, self.depth) if self.order == "slice-major" else np.repeat(per, self.depth)


def spec_from_card(card: Any) -> InputSpec:
    """The InputSpec of a ModelCard (its fields, as the JSON card spells them)."""
    norm = card.normalisation
    value_range, mean, std = (0.0, 1.0), (), ()
    if isinstance(norm, dict):
        value_range = tuple(norm.get("range", (0.0, 1.0)))  # type: ignore[assignment]
        mean, std = tuple(norm.get("mean", ())), tuple(norm.get("std", ()))
    hu = card.hu_scale if isinstance(card.hu_scale, dict) else {}
    return InputSpec(size=card.input_size, windows=card.windows, channels=card.channels,
                     hu_offset=float(hu.get("offset", 0.0)), hu_scale=float(hu.get("scale", 1.0)),
                     layout=card.layout, context=card.context, order=card.context_order,
                     value_range=value_range, mean=mean, std=std)


def normalisation_problems(norm: Any) -> list[str]:
    if norm == "unit":
        return []
    if not isinstance(norm, dict) or not set(norm) <= {"range", "mean", "std"}:
        return [f"normalisation must be 'unit' or {{'range': [lo, hi], 'mean': [...], 'std': [...]}}. Received: {norm!r}"]
    problems = []
    rng = norm.get("range", [0, 1])
    if not (isinstance(rng, (list, tuple)) and len(rng) == 2 and all(_number(v) for v in rng) and rng[0] != rng[1]):
        problems.append(f"normalisation range must be two different numbers [lo, hi]. Received: {rng!r}")
    for key in ("mean", "std"):
        values = norm.get(key, [])
        if not (isinstance(values, (list, tuple)) and all(_number(v) for v in values)):
            problems.append(f"normalisation {key} must be a list of numbers. Received: {values!r}")
    return problems


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def channel_ops(hu, spec: InputSpec):  # type: ignore[no-untyped-def]
    """(B, D, S, S) HU, any numeric dtype -> (B, S, S, C) float32, normalised, NHWC (TTA works on NHWC)."""
    from keras import ops

    hu = ops.cast(hu, "float32")
    per_depth = []
    for d in range(spec.depth):
        plane = hu[:, d]
        if spec.channels == "hu":
            per_depth.append([(plane - spec.hu_offset) / spec.hu_scale])
        else:
            per_depth.append([ops.clip((plane - (w.center - w.width / 2)) / w.width, 0.0, 1.0) for w in spec.windows])
    if spec.order == "slice-major":
        chans = [c for planes in per_depth for c in planes]
    else:
        chans = [per_depth[d][w] for w in range(spec.per_slice) for d in range(spec.depth)]
    x = ops.stack(chans, axis=-1)
    lo, hi = spec.value_range
    if (lo, hi) != (0.0, 1.0):
        x = x * (hi - lo) + lo
    if spec.mean or spec.std:
        mean, std = spec._per_channel(spec.mean, 0.0), spec._per_channel(spec.std, 1.0)
        x = (x - ops.convert_to_tensor(mean)) / ops.convert_to_tensor(std)
    return x


def to_layout(x, spec: InputSpec):  # type: ignore[no-untyped-def]
    from keras import ops

    return ops.transpose(x, (0, 3, 1, 2)) if spec.layout == "nchw" else x


def prepare_layer(spec: InputSpec, tta: int):  # type: ignore[no-untyped-def]
    """A Keras layer: (B, D, S, S) HU -> channels -> TTA views -> layout (view v of image b at v * B + b)."""
    import keras

    from ..preprocess import tta_views

    shape = spec.shape()

    class PrepareViews(keras.layers.Layer):
        def call(self, hu):  # type: ignore[no-untyped-def]
            return to_layout(tta_views(channel_ops(hu, spec), tta), spec)

        def compute_output_shape(self, in_shape):  # type: ignore[no-untyped-def]
            batch = None if in_shape[0] is None else in_shape[0] * tta
            return (batch, *shape)

    return PrepareViews(name="prepare_views")


@functools.lru_cache(maxsize=8)
def preparer(spec: InputSpec, tta: int = 1):  # type: ignore[no-untyped-def]
    """The input preparation alone as one compiled call, HU batch -> float32 numpy: run op by op it cost
    more than a ResNet50 heat map (on a CPU, 10 ms per key slice; on a GPU, one launch per op)."""
    import keras

    from .backend import forward

    hu = keras.Input((spec.depth, spec.size, spec.size), dtype="float32", name="hu")
    call = forward(keras.Model(hu, prepare_layer(spec, tta)(hu), name="prepare"))
    return lambda x: np.asarray(call(np.asarray(x, np.float32)), np.float32)


def model_input(hu: np.ndarray, spec: InputSpec) -> np.ndarray:
    """The input for one view (no TTA) as numpy: (B, D, S, S) HU -> the model's tensor."""
    return preparer(spec)(hu)  # type: ignore[no-any-return]


def to_probabilities(raw: np.ndarray, activation: str, views: int, output_map: tuple[int, ...] | None) -> np.ndarray:
    """(views*B, n_raw) model outputs -> (B, outputs) probabilities: activation, view mean, mapping."""
    raw = np.asarray(raw, np.float64)
    if activation == "logits":
        p = 1.0 / (1.0 + np.exp(-np.clip(raw, -60, 60)))
    elif activation == "softmax-logits":
        e = np.exp(raw - raw.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
    else:
        p = raw
    p = p.reshape(views, -1, p.shape[-1]).mean(axis=0)
    if output_map is not None:
        p = p[:, list(output_map)]
    return p.astype(np.float32)
