"""Screenshot-style augmentation: a CT slice as people share it, for training models that accept images.

A slice found on the web or in a screenshot is some window's 8-bit rendering (the window unknown),
often cropped, with a border, not square, with burned-in text (patient data, scale, arrows), JPEG
compressed and stored as RGB. `screenshot` makes such an image from an HU slice; training then reads
it exactly as `run` reads an image file (images.image_to_hu), so the model learns what it will see.
"""

from __future__ import annotations

import string

import numpy as np

from .images import image_to_hu
from .train_stream import hu_to_channels

TEXT = string.ascii_uppercase + string.digits + " :/.-"


def screenshot(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """An 8-bit rendering of the slice (H x W, or H x W x 3 BGR), as a user would have it."""
    import cv2

    centre, width = (rng.uniform(30, 50), rng.uniform(70, 130)) if rng.random() < 0.8 else \
        (rng.uniform(50, 90), rng.uniform(130, 260))  # mostly a brain window, sometimes a subdural one
    image: np.ndarray = (np.clip((hu - (centre - width / 2)) / width, 0, 1) * 255 + 0.5).astype(np.uint8)
    rows, cols = image.shape
    if rng.random() < 0.5:  # cropped
        top, bottom, left, right = (int(rng.uniform(0, 0.12) * n) for n in (rows, rows, cols, cols))
        image = image[top:rows - bottom, left:cols - right]
    if rng.random() < 0.6:  # rescaled, often not square
        side = rng.uniform(180, 700)
        aspect = rng.uniform(0.75, 1.35)
        image = cv2.resize(image, (int(side * aspect), int(side)), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.3:  # a border from the viewer or the page
        top, bottom, left, right = (int(rng.uniform(0, 0.1) * image.shape[k // 2]) for k in range(4))
        image = cv2.copyMakeBorder(image, top, bottom, left, right, cv2.BORDER_CONSTANT,
                                   value=int(rng.choice([0, 0, 40, 255])))
    if rng.random() < 0.6:
        _burn_in_text(image, rng)
    if rng.random() < 0.7:
        quality = int(rng.uniform(25, 95))
        ok, data = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
        decoded = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE) if ok else None
        if decoded is not None:
            image = decoded
    if rng.random() < 0.6:
        image = cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    return image


def _burn_in_text(image: np.ndarray, rng: np.random.Generator) -> None:
    import cv2

    rows, cols = image.shape[:2]
    for _ in range(int(rng.integers(1, 5))):
        text = "".join(rng.choice(list(TEXT), size=int(rng.integers(4, 16))))
        scale = rng.uniform(0.3, 0.9) * rows / 512
        corner = (int(rng.uniform(0, 0.3) * cols), int(rng.choice([rng.uniform(0.05, 0.2), rng.uniform(0.85, 0.98)]) * rows))
        cv2.putText(image, text, corner, cv2.FONT_HERSHEY_SIMPLEX, max(scale, 0.25), int(rng.uniform(150, 255)),
                    1, cv2.LINE_AA)


def screenshot_channels(hu: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """The model's uint8 window channels for the slice seen as a screenshot, read the way `run` reads images."""
    return hu_to_channels(image_to_hu(screenshot(hu, rng)), size)
