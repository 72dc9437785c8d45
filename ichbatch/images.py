"""Plain images as inputs (PNG, JPEG, TIFF): what people find on the web and in screenshots.

Each image is its own study of one slice, named by its path relative to the input root (the CSV's
`source`). Its pixels are not Hounsfield units: they are some window's 8-bit rendering, often RGB and
not square. ichbatch takes the grey level (luma for colour), pads the image to a square with black,
and reads grey g as the brain window (40/80) would have drawn it: HU = 80 * g / 255. Whether a model
may be run on that is the card's say (eligibility `windowed_images`); a model that was not made for
images gives `not_assessed` with the reason, never a number.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from .config import BRAIN
from .domain import InstanceRef, StudyMeta
from .errors import DecodeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
IMAGE_MODALITY = "OT"
NOT_HU = "plain image: its pixel values are not Hounsfield units (read as a brain-window rendering)"
MAX_IMAGE_PIXELS = 8192 * 8192


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def is_image(instance: InstanceRef) -> bool:
    """Made from an image file (it has a source path), not from a DICOM header."""
    return bool(instance.source)


def image_instance(path: Path, source: str) -> InstanceRef:
    """An image file as a study of one slice; UIDs derived from the relative path (a UID-like '2.25.' form)."""
    digest = int(hashlib.sha256(source.encode()).hexdigest()[:30], 16)
    study_uid = f"2.25.{digest}"
    return InstanceRef(
        path=str(path), study=StudyMeta(study_uid), series_uid=f"{study_uid}.1", sop_uid=f"{study_uid}.1.1",
        sop_class_uid="", modality=IMAGE_MODALITY, image_type=("DERIVED", "SECONDARY"),
        orientation=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), position=(0.0, 0.0, 0.0), instance_number=1,
        has_pixels=True, series_description="plain image", source=source)


def load_image_hu(path: str) -> np.ndarray:
    """The image as a square float32 slice in 'HU' under the brain-window reading (see module doc)."""
    import cv2

    data = np.fromfile(path, np.uint8)
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        raise DecodeError(f"{path}: not a readable PNG, JPEG or TIFF image")
    if image.shape[0] * image.shape[1] > MAX_IMAGE_PIXELS:
        raise DecodeError(f"{path}: {image.shape[1]}x{image.shape[0]} pixels, more than the limit of {MAX_IMAGE_PIXELS}")
    return image_to_hu(image)


def image_to_hu(image: np.ndarray) -> np.ndarray:
    """A decoded image (grey, BGR or BGRA; 8 or 16 bit) as the square 'HU' slice of the brain-window reading;
    also what training's screenshot augmentation (ichbatch.screenshots) goes through."""
    grey = image.astype(np.float32)
    if image.dtype == np.uint16:
        grey /= 257.0  # 16-bit PNG or TIFF of a windowed image: back to 0-255
    if grey.ndim == 3:
        channels = grey.shape[2]
        colour = grey[..., :3] if channels >= 3 else grey[..., :1]
        # OpenCV gives BGR; luma weights (ITU-R BT.601) on B, G, R.
        grey = colour @ np.array([0.114, 0.587, 0.299], np.float32) if channels >= 3 else colour[..., 0]
    rows, cols = grey.shape
    side = max(rows, cols)
    square = np.zeros((side, side), np.float32)
    top, left = (side - rows) // 2, (side - cols) // 2
    square[top:top + rows, left:left + cols] = grey
    lo = BRAIN.center - BRAIN.width / 2
    return lo + square / 255.0 * BRAIN.width
