"""Settings and series-selection rules as data, so they can be read and changed in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

LABELS: tuple[str, ...] = (
    "any",
    "epidural",
    "intraparenchymal",
    "intraventricular",
    "subarachnoid",
    "subdural",
)
SUBTYPES: tuple[str, ...] = LABELS[1:]

# Phantom generators: ellipse, ichbatch.synth's quick geometric heads (tests); anatomy, ichbatch.anatomy
# revision 1 (what the shipped demo model is trained on); anatomy-v2 and -v3, its revisions 2 and 3 (README:
# Anatomy phantoms).
PHANTOM_KINDS: tuple[str, ...] = ("ellipse", "anatomy", "anatomy-v2", "anatomy-v3")


@dataclass(frozen=True)
class Window:
    name: str
    center: float
    width: float


# The RSNA 2019 convention: brain, subdural and bone windows as the three channels.
BRAIN = Window("brain", 40, 80)
SUBDURAL = Window("subdural", 80, 200)
BONE = Window("bone", 600, 2800)
DEFAULT_WINDOWS: tuple[Window, ...] = (BRAIN, SUBDURAL, BONE)
NAMED_WINDOWS = {w.name: w for w in DEFAULT_WINDOWS}

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE})

# Storage range kept after HU conversion; decoded values far outside it are not CT.
HU_MIN, HU_MAX = -1024, 3071
AIR_HU = -1024


@dataclass(frozen=True)
class SelectionRules:
    """How the axial non-contrast head series is chosen. See series.choose_series."""

    modality: str = "CT"
    min_slices: int = 8
    # |slice normal . patient z| at least this: up to ~35 degrees of gantry tilt still counts as axial.
    min_axial_cosine: float = 0.8
    excluded_image_types: tuple[str, ...] = ("LOCALIZER", "SCOUT", "DOSE_INFO", "SCREEN SAVE")
    # Reconstruction kernels (and series descriptions) that mark a bone/sharp reconstruction.
    bone_kernel_words: tuple[str, ...] = (
        "BONE", "SHARP", "LUNG", "H60", "H70", "H80", "H90", "J70", "BR6", "BR7", "FC30", "FC8", "YC", "D45",
    )
    max_gap_factor: float = 1.5  # a gap larger than this times the median spacing is reported


DEFAULT_RULES = SelectionRules()


def cache_dir() -> Path:
    """Where what a run can make once and reuse is kept (ONNX exports, JAX's compiled programs)."""
    return Path(os.environ.get("ICHBATCH_CACHE") or Path.home() / ".cache" / "ichbatch")
