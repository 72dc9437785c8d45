"""The README's montage of anatomy phantoms (ichbatch.anatomy), brain window, lesion outlines in red.

    python examples/anatomy_montage.py [--out docs/anatomy-montage.png]

Top row: three generated subjects, each at the skull base, the orbits, the ventricles and the vertex.
Bottom row: one subject per kind of bleed at the slice where its mask is largest, one with several kinds,
then the three subjects' skull base and orbit levels in a bone window.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from ichbatch.anatomy import anatomy_phantom
from ichbatch.config import BONE, BRAIN
from ichbatch.preprocess import to_uint8

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
    while len(bottom) < len(top):
        bottom.append(np.zeros_like(top[0]))
    grid = np.vstack([np.hstack(top), np.hstack(bottom)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(args.out), grid, [cv2.IMWRITE_PNG_COMPRESSION, 9])
    print(f"wrote {args.out} ({args.out.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
