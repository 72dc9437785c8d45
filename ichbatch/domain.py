"""Small frozen dataclasses passed between the pipeline stages.

discover -> InstanceRef / FileIssue; series -> SeriesChoice (with SliceRef); study path -> StudyResult
(small, frozen, kept) and StudyImages (thumbnails, key slices and their maps, dropped once the writers
have used them).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

Vec3 = tuple[float, float, float]


class Status(str, Enum):
    OK = "ok"
    NOT_ASSESSED = "not_assessed"  # the model's card rules it out, or it lies outside the training domain
    SKIPPED = "skipped"
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class StudyMeta:
    """Identifiers copied from the header; PHI, so never logged by default."""

    study_uid: str
    accession: str = ""
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    study_description: str = ""


@dataclass(frozen=True, slots=True)
class FrameGeometry:
    """Per-frame position and rescale of an Enhanced (multi-frame) CT object."""

    position: Vec3 | None
    orientation: tuple[float, ...] | None
    slope: float | None = None
    intercept: float | None = None


@dataclass(frozen=True, slots=True)
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
    body_part: str = ""
    slice_thickness: float | None = None  # mm
    pixel_spacing: float | None = None  # mm, the larger of row and column spacing
    kvp: float | None = None
    source: str = ""  # a plain image (images.py): its path relative to the input root; DICOM: ""

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
    z: float  # position along the head axis in mm, increasing from inferior to superior
    slope: float | None = None  # per-frame rescale (Enhanced CT), else read from the file
    intercept: float | None = None
    sop_uid: str = ""
    instance_number: int | None = None


@dataclass(frozen=True)
class SliceId:
    """What a radiologist can find again in the viewer: never an index after decoding.

    index is the 1-based place in the series' inferior-to-superior order, counted before decoding, so a
    slice that fails to decode shifts no other slice's identity.
    """

    index: int
    sop_uid: str
    instance_number: int | None
    z_mm: float
    frame: int | None = None  # 0-based frame of a multi-frame (Enhanced CT) object

    @property
    def label(self) -> str:
        """Short name for captions: Instance Number (and frame) and position."""
        name = f"Im {self.instance_number}" if self.instance_number is not None else f"slice {self.index}"
        if self.frame is not None:
            name += f" fr {self.frame + 1}"
        return f"{name}, z {self.z_mm:.1f} mm"


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
    instances_digest: str = ""  # sha256 of the study's SOP Instance UIDs: same digest, same inputs (--resume)


@dataclass(frozen=True, eq=False)
class StudyResult:
    """What is kept of one study: identifiers, scores, flags, status, reasons and slice identities.

    Small by design (no images): a run over 100,000 studies keeps none of these beyond its own study.
    """

    study: StudyMeta
    status: Status
    message: str
    series_uid: str = ""
    series_description: str = ""
    source_path: str = ""  # one file of the series that was run, for copying patient/study modules
    n_slices: int = 0  # slices scored (0 when the study failed or was skipped)
    labels: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()  # the model's outputs: the columns of slice_probs
    slices: tuple[SliceId, ...] = ()  # the scored slices, inferior to superior: the rows of slice_probs
    slice_probs: np.ndarray | None = None  # (n_slices, n_outputs) after TTA
    smoothed_probs: np.ndarray | None = None
    study_probs: Mapping[str, float | None] = field(default_factory=dict)  # None: label not provided
    flags: Mapping[str, bool | None] = field(default_factory=dict)
    key_slices: tuple[SliceId, ...] = ()  # highest smoothed 'any' first
    warnings: tuple[str, ...] = ()
    model: str = ""
    model_version: str = ""
    model_trained: bool = True
    model_trained_on: str = ""  # from the card, shown on every output
    tta: int = 1
    heatmap: str = ""  # how the key images' maps were made, e.g. "HiResCAM at pool1_pool, ..."
    seconds: float = 0.0
    instances_digest: str = ""
    report_pdf: str = ""
    domain_score: float | None = None  # distance from the model's training data (None: the card has no check)
    domain_threshold: float | None = None  # above it the study is not assessed
    thresholds: Mapping[str, float] = field(default_factory=dict)  # the card's, for calibrated scores
    source: str = ""  # a plain image: its path relative to the input root (not Hounsfield units); DICOM: ""


@dataclass(frozen=True)
class KeyImage:
    """One key slice rendered for the reports, uint8 at full size: the brain, subdural and bone windows
    (grey) and the overlay on the brain window (RGB).

    The overlay's heat is the class-activation map's shape times the slice's probability for the label:
    one fixed 0-1 scale for every study, so a faint map means a low score, never a rescaled one."""

    slice: SliceId
    brain: np.ndarray
    gradcam: np.ndarray | None  # the overlay, or None when no label is flagged (nothing to explain)
    subdural: np.ndarray
    bone: np.ndarray
    heat_label: str = ""  # the flagged label the overlay explains


@dataclass(frozen=True)
class KeySlice:
    """A key slice still to be drawn for the reports: the file to read again at full size and the heat
    map to lay over it ([0, 1] at any size; None when nothing is flagged)."""

    slice: SliceId
    ref: SliceRef
    heat: np.ndarray | None
    heat_label: str = ""


@dataclass(frozen=True)
class StudyImages:
    """Pictures for the writers of one study; they live only until the study's outputs are written.

    The study path hands on its key slices undrawn (`to_draw`): whoever writes the reports draws them
    (decode.draw_key_images), in a writer process or a Ray task, and a run that writes no reports never
    reads them again."""

    thumbnails: tuple[np.ndarray, ...] = ()  # small brain-window uint8, one per scored slice
    key_images: tuple[KeyImage, ...] = ()  # in the order of StudyResult.key_slices
    to_draw: tuple[KeySlice, ...] = ()  # in that order too; empty once drawn

    def key_image(self, ident: SliceId) -> KeyImage | None:
        return next((k for k in self.key_images if k.slice == ident), None)
