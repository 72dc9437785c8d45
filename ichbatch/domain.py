"""Small frozen dataclasses passed between the pipeline stages.

discover -> InstanceRef / FileIssue; series -> SeriesChoice (with SliceRef); infer -> slice probabilities;
aggregate -> StudyResult; report writers read StudyResult only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

import numpy as np

Vec3 = tuple[float, float, float]


class Status(str, Enum):
    OK = "ok"
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True)
class StudyMeta:
    """Identifiers copied from the header; PHI, so never logged by default."""

    study_uid: str
    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""


@dataclass(frozen=True)
class FrameGeometry:
    """Per-frame position and rescale of an Enhanced (multi-frame) CT object."""

    position: Vec3 | None
    orientation: tuple[float, ...] | None
    slope: float | None = None
    intercept: float | None = None


@dataclass(frozen=True)
class InstanceRef:
    """One DICOM file, from a header-only read: everything needed to group and select."""

    path: str
    study: StudyMeta
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    modality: str
    image_type: tuple[str, ...] = ()
    orientation: tuple[float, ...] | None = None
    position: Vec3 | None = None
    instance_number: int | None = None
    rows: int = 0
    columns: int = 0
    samples_per_pixel: int = 1
    photometric: str = ""
    has_pixels: bool = False
    kernel: str = ""
    series_description: str = ""
    series_number: int | None = None
    contrast_agent: str = ""
    gantry_tilt: float = 0.0
    frames: tuple[FrameGeometry, ...] = ()  # Enhanced CT only

    @property
    def study_uid(self) -> str:
        return self.study.study_uid


@dataclass(frozen=True)
class FileIssue:
    """A file that is not usable, with the reason. Recorded, never fatal."""

    path: str
    status: Status
    message: str


@dataclass(frozen=True)
class SliceRef:
    """One axial slice to decode: a file and, for multi-frame objects, a frame index."""

    path: str
    frame: int | None
    position: Vec3
    z: float  # position projected on the slice normal, in mm
    slope: float | None = None  # per-frame rescale (Enhanced CT), else read from the file
    intercept: float | None = None


@dataclass(frozen=True)
class SeriesGroup:
    study_uid: str
    series_uid: str
    instances: tuple[InstanceRef, ...]

    @property
    def description(self) -> str:
        return self.instances[0].series_description if self.instances else ""


@dataclass(frozen=True)
class SeriesChoice:
    """The outcome of series selection for one study, with reasons for every series."""

    study: StudyMeta
    series: SeriesGroup | None
    slices: tuple[SliceRef, ...]
    reasons: dict[str, str]  # series_uid -> why chosen / why rejected
    warnings: tuple[str, ...] = ()
    message: str = ""  # why nothing was chosen


@dataclass
class StudyResult:
    """Everything the report writers need about one study."""

    study: StudyMeta
    status: Status
    message: str
    series_uid: str = ""
    series_description: str = ""
    source_path: str = ""  # one file of the series that was run, for copying patient/study modules
    n_slices: int = 0
    labels: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # the model's outputs: the columns of slice_probs
    slice_probs: np.ndarray | None = None  # (n_slices, n_labels), z order, after TTA
    smoothed_probs: np.ndarray | None = None
    study_probs: dict[str, float | None] = field(default_factory=dict)  # None: label not provided
    flags: dict[str, bool | None] = field(default_factory=dict)
    key_slices: tuple[int, ...] = ()  # 0-based indices in z order
    slice_z: tuple[float, ...] = ()
    thumbnails: list[np.ndarray] = field(default_factory=list)  # small brain-window uint8 per slice
    key_images: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)  # idx -> name -> RGB
    warnings: tuple[str, ...] = ()
    model: str = ""
    model_version: str = ""
    model_trained: bool = True
    model_trained_on: str = ""  # from the card, shown on every output
    tta: int = 1
    heatmap: str = ""  # how the key images' maps were made, e.g. "HiResCAM at pool1_pool, ..."
    seconds: float = 0.0
    report_pdf: str = ""
