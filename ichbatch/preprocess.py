"""Stage 3b: HU slice -> compact model input, and on-device windowing and TTA views.

The CPU side only resizes HU to the model's input size and stores int16 (2 bytes a pixel). Windowing
into channels and the TTA views run inside the compiled model call (keras.ops), so they run on the
GPU when there is one and the host sends the least data.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from .config import BRAIN, HU_MAX, HU_MIN, Window

MAX_TTA = 8


def resize_hu(hu: np.ndarray, size: int) -> np.ndarray:
    """HU (any shape) -> (size, size) int16. Area interpolation when shrinking avoids aliasing."""
    interp = cv2.INTER_AREA if hu.shape[0] > size else cv2.INTER_LINEAR
    out = cv2.resize(hu.astype(np.float32), (size, size), interpolation=interp)
    return np.clip(np.rint(out), HU_MIN, HU_MAX).astype(np.int16)


def window_np(hu: np.ndarray, window: Window) -> np.ndarray:
    """HU -> [0, 1] for one window (numpy, for reports)."""
    lo = window.center - window.width / 2
    return np.clip((hu.astype(np.float32) - lo) / window.width, 0.0, 1.0)


def windows_np(hu: np.ndarray, windows: tuple[Window, ...]) -> np.ndarray:
    """HU (H, W) -> (H, W, C) float32 in [0, 1]: the model's channels, in numpy (CAM, training)."""
    return np.stack([window_np(hu, w) for w in windows], axis=-1)


def to_uint8(hu: np.ndarray, window: Window = BRAIN) -> np.ndarray:
    return (window_np(hu, window) * 255 + 0.5).astype(np.uint8)


def tta_transforms(n: int) -> list[tuple[str, float, float, float, float]]:
    """The first n views as (name, flip, angle in degrees, scale, shift as a fraction of the size)."""
    views: list[tuple[str, float, float, float, float]] = [
        ("identity", 0, 0.0, 1.0, 0.0),
        ("hflip", 1, 0.0, 1.0, 0.0),
        ("rotate+8", 0, 8.0, 1.0, 0.0),
        ("rotate-8", 0, -8.0, 1.0, 0.0),
        ("zoom1.1", 0, 0.0, 1.1, 0.0),
        ("shift+5%", 0, 0.0, 1.0, 0.05),
        ("hflip-zoom0.92", 1, 0.0, 0.92, 0.0),
        ("shift-5%", 0, 0.0, 1.0, -0.05),
    ]
    if not 1 <= n <= MAX_TTA:
        raise ValueError(f"tta must be between 1 and {MAX_TTA}. Received: tta={n}")
    return views[:n]


def _affine(size: int, angle: float, scale: float, shift: float) -> list[float]:
    """The 8-vector that keras.ops.image.affine_transform maps output pixels to input pixels with."""
    c = (size - 1) / 2
    t = math.radians(angle)
    cos, sin = math.cos(t) / scale, math.sin(t) / scale
    # input = R/scale * (output - c) + c - shift
    a0, a1, b0, b1 = cos, -sin, sin, cos
    a2 = c - a0 * c - a1 * c - shift * size
    b2 = c - b0 * c - b1 * c
    return [a0, a1, a2, b0, b1, b2, 0.0, 0.0]


def tta_views(images, n: int):  # type: ignore[no-untyped-def]
    """(B, H, W, C) -> (n*B, H, W, C): view v of image b at index v*B + b."""
    from keras import ops

    size = int(images.shape[1])
    out = []
    for _, flip, angle, scale, shift in tta_transforms(n):
        view = ops.flip(images, axis=2) if flip else images
        if angle or scale != 1.0 or shift:
            batch = ops.shape(view)[0]
            tf = ops.convert_to_tensor(np.asarray(_affine(size, angle, scale, shift), np.float32))
            tf = ops.broadcast_to(ops.expand_dims(tf, 0), (batch, 8))
            view = ops.image.affine_transform(view, tf, interpolation="bilinear", fill_mode="constant")
        out.append(view)
    return ops.concatenate(out, axis=0)
