"""The README's montage of anatomy phantoms (ichbatch.anatomy), brain window, lesion outlines in red.

    python examples/anatomy_montage.py [--out docs/anatomy-montage.png]

Top row: three generated subjects, each at the skull base, the orbits, the ventricles and the vertex.
Middle row: one subject per kind of bleed at the slice where its mask is largest, one with several kinds,
then the three subjects' skull base and orbit levels in a bone window.
Bottom row: what the generator draws only now and then, each forced here: subdurals beside the falx and
on the tentorium, a haematoma with and without its mass effect, metal streaks, a bone-kernel study, a
subject scanned with the gantry tilted 20 degrees, and arteries and calcified siphons at the skull base.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ichbatch import anatomy
from ichbatch.anatomy import anatomy_phantom, draw_subject
from ichbatch.config import BONE, BRAIN
from ichbatch.preprocess import to_uint8
from ichbatch.synth import Phantom

TILE = 192
SLICES = 28


def tile(hu: np.ndarray, masks: list[np.ndarray], caption: str, window=BRAIN) -> np.ndarray:  # type: ignore[no-untyped-def]
    img = cv2.cvtColor(cv2.resize(to_uint8(hu, window), (TILE, TILE), interpolation=cv2.INTER_AREA), cv2.COLOR_GRAY2BGR)
    for mask in masks:
        small = cv2.resize(mask.astype(np.uint8), (TILE, TILE), interpolation=cv2.INTER_NEAREST)
        contours, _ = cv2.findContours(small, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(img, contours, -1, (0, 0, 255), 1)
    cv2.putText(img, caption, (4, TILE - 6), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
    return img


@contextmanager
def forced(**settings: Any) -> Iterator[None]:
    """Generator settings (module constants) changed for one drawing, so a rare variant shows."""
    old = {name: getattr(anatomy, name) for name in settings}
    for name, value in settings.items():
        setattr(anatomy, name, value)
    try:
        yield
    finally:
        for name, value in old.items():
            setattr(anatomy, name, value)


def lesion_tile(ph: Phantom, caption: str) -> np.ndarray:
    union = np.logical_or.reduce(list(ph.masks.values()))
    level = int(np.argmax(union.sum(axis=(1, 2))))
    return tile(ph.hu[level], [m[level] for m in ph.masks.values()], caption)


def rare_variants() -> list[np.ndarray]:
    row = []
    for site in ("falx", "tentorium"):
        with forced(SUBDURAL_SITES={site: 1.0}):
            row.append(lesion_tile(anatomy_phantom(np.random.default_rng(300), SLICES, 256, ("subdural",)),
                                   f"subdural, {site}"))
    subject = draw_subject(np.random.default_rng(1307))
    drawn = anatomy._mass
    for push, caption in ((0.0, "haematoma, no push"), (0.9, "haematoma, mass effect")):
        with forced(_mass=lambda rng, t, p=push: replace(mass := drawn(rng, t), axes=np.maximum(mass.axes, 13.0), push=p)):
            row.append(lesion_tile(anatomy_phantom(np.random.default_rng(307), SLICES, 256, ("intraparenchymal",),
                                                   subject=subject), caption))
    for seed in range(302, 330):  # the first subject whose metal is a clip (dental work is low in the face)
        with forced(METAL_SHARE=1.0):
            ph = anatomy_phantom(np.random.default_rng(seed), SLICES, 256)
        level = int(np.argmax((ph.hu > 2900).sum(axis=(1, 2))))
        if level >= SLICES // 5:
            break
    row.append(tile(ph.hu[level], [], "metal streaks"))
    with forced(BONE_KERNEL_SHARE=1.0):
        row.append(tile(anatomy_phantom(np.random.default_rng(303), SLICES, 256).hu[int(0.5 * SLICES)], [],
                        "bone kernel"))
    tilted = replace(draw_subject(np.random.default_rng(304)), angles=np.radians([20.0, 0.0, 0.0]))
    ph = anatomy_phantom(np.random.default_rng(304), SLICES, 256, subject=tilted)
    row.append(tile(ph.hu[int(0.4 * SLICES)], [], "gantry tilt 20 deg"))
    old = replace(draw_subject(np.random.default_rng(305)), atrophy=0.9, angles=np.zeros(3))
    ph = anatomy_phantom(np.random.default_rng(305), SLICES, 256, subject=old)
    row.append(tile(ph.hu[int(0.25 * SLICES)], [], "arteries, siphons"))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("docs/anatomy-montage.png"))
    args = parser.parse_args()
    top, bone = [], []
    for subject in range(3):
        ph = anatomy_phantom(np.random.default_rng(100 + subject), SLICES, 256)
        for name, level in (("base", 0.08), ("orbits", 0.2), ("ventricles", 0.5), ("vertex", 0.85)):
            top.append(tile(ph.hu[int(level * SLICES)], [], f"subject {subject + 1}, {name}"))
            if name in ("base", "orbits"):
                bone.append(tile(ph.hu[int(level * SLICES)], [], f"subject {subject + 1}, {name}, bone", BONE))
    bottom = []
    kinds = [("epidural",), ("subdural",), ("subarachnoid",), ("intraventricular",), ("intraparenchymal",),
             ("subdural", "intraventricular", "intraparenchymal")]
    for k, kind in enumerate(kinds):
        ph = anatomy_phantom(np.random.default_rng(200 + k), SLICES, 256, kind)
        union = np.logical_or.reduce(list(ph.masks.values())) if ph.masks else np.zeros(ph.hu.shape, bool)
        level = int(np.argmax(union.sum(axis=(1, 2))))
        caption = "several kinds" if len(kind) > 1 else kind[0]
        bottom.append(tile(ph.hu[level], [m[level] for m in ph.masks.values()], caption))
    bottom += bone
    rare = rare_variants()
    for row in (bottom, rare):
        while len(row) < len(top):
            row.append(np.zeros_like(top[0]))
    grid = np.vstack([np.hstack(top), np.hstack(bottom), np.hstack(rare)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), grid, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
