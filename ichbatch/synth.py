"""Generated head-CT phantom studies, written as real DICOM CT series, with a manifest of the truth.

Anatomy along z from the skull base to the vertex: scalp and skull of varying thickness, orbits,
sphenoid sinus and mastoid air, petrous ridges and the posterior fossa, basal cisterns, grey and white
matter, ventricles and sulci. Hyperdensities that are not blood and must not count: a calcified pineal
gland, choroid-plexus and falx calcification, beam-hardening cupping along the inner table and dark
streaks between the petrous bones. Partial volume, scanner noise, a random in-plane rotation and shift,
and per-study slice thickness, rescale intercept and transfer syntax. Hemorrhages of the five RSNA
subtypes, sometimes several in one study, with per-slice masks. This is the demo data, the test data and
the training data for the shipped demo weights. Not a medical simulation.
"""

from __future__ import annotations

import datetime as _dt
import functools
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    UID,
    RLELossless,
    generate_uid,
)

from .config import CT_IMAGE_STORAGE, PHANTOM_KINDS, SUBTYPES

BLOOD_HU = (60.0, 85.0)
CSF_HU, SULCUS_HU, CISTERN_HU = 5.0, 8.0, 7.0  # exact values before noise: the planters find these spaces
THICKNESSES = (5.0, 5.0, 3.0, 2.5)  # mm: routine 5 mm most often
INTERCEPTS = (-1024.0, -1024.0, -1000.0, 0.0)  # 0: signed storage, as some scanners write
TRANSFER_SYNTAXES = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
                     RLELossless, JPEG2000Lossless, JPEGLSLossless)


@dataclass
class Phantom:
    hu: np.ndarray  # (n_slices, rows, cols) float32, slice 0 at the skull base
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # subtype -> (n, rows, cols) bool
    spacing_mm: float = 0.9
    thickness_mm: float = 5.0
    kernel: str = "STANDARD"  # the reconstruction kernel, written as Convolution Kernel

    def labels(self) -> dict[str, int]:
        present = {s: int(self.masks.get(s, np.zeros(1, bool)).any()) for s in SUBTYPES}
        return {"any": int(any(present.values())), **present}


@dataclass(frozen=True)
class _Head:
    """One head's random anatomy, in pixels of a size x size grid (upright: anterior at the top)."""

    yy: np.ndarray
    xx: np.ndarray
    cy: float
    cx: float
    a0: float  # anterior-posterior semi-axis
    b0: float  # left-right semi-axis
    skull_px: float
    choroid_calcified: bool
    falx_calcified: bool
    pineal: bool
    cupping_hu: float  # beam hardening: brightening of the brain next to the inner table

    def angle_from(self, theta: float) -> np.ndarray:
        """Each pixel's angular distance (0..pi) from direction theta around the head's centre."""
        angle = np.arctan2(self.yy - self.cy, self.xx - self.cx)
        return np.abs(np.angle(np.exp(1j * (angle - theta))))

    @classmethod
    def draw(cls, rng: np.random.Generator, size: int) -> _Head:
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        return cls(
            yy=yy, xx=xx, cy=size / 2 + rng.normal(0, size * 0.01), cx=size / 2 + rng.normal(0, size * 0.01),
            a0=size * rng.uniform(0.34, 0.41), b0=size * rng.uniform(0.27, 0.33),
            skull_px=rng.uniform(0.02, 0.04) * size, choroid_calcified=rng.random() < 0.5,
            falx_calcified=rng.random() < 0.3, pineal=rng.random() < 0.7, cupping_hu=rng.uniform(0, 14),
        )


def make_phantom(
    rng: np.random.Generator, n_slices: int = 24, size: int = 256, subtypes: tuple[str, ...] = ()
) -> Phantom:
    """One head volume in HU with the given hemorrhage subtypes planted."""
    head = _Head.draw(rng, size)
    hu = np.full((n_slices, size, size), -1000.0, np.float32)
    inner = np.zeros((n_slices, size, size), np.float32)  # normalised radius inside the inner table
    for k in range(n_slices):
        inner[k] = _anatomy_slice(hu[k], head, (k + 0.5) / n_slices, rng)
    masks = {s: _PLANTERS[s](rng, hu, inner, head) for s in subtypes}
    _beam_hardening(hu, inner, head, rng)
    hu, masks = _rotate_and_shift(hu, masks, rng)
    hu = _blur_and_noise(hu, rng)
    return Phantom(hu=hu, masks=masks, thickness_mm=float(rng.choice(THICKNESSES)),
                   spacing_mm=rng.uniform(200.0, 250.0) / size)


def _anatomy_slice(sl: np.ndarray, h: _Head, t: float, rng: np.random.Generator) -> np.ndarray:
    """Paint one axial slice at height t (0 skull base .. 1 vertex); return the normalised inner radius."""
    yy, xx, cy, cx = h.yy, h.xx, h.cy, h.cx
    scale = np.sqrt(max(1 - ((t - 0.45) / 0.62) ** 2, 0.05))
    a, b = h.a0 * scale, h.b0 * scale
    r = np.sqrt(((yy - cy) / a) ** 2 + ((xx - cx) / b) ** 2)
    rin = r / (1 - h.skull_px / b)
    sl[r < 1.04] = 45.0  # scalp
    sl[r < 1.0] = rng.uniform(900, 1400)  # skull
    brain = rin < 1.0
    sl[brain] = np.where(rin[brain] > 0.8, 38.0, 28.0)  # grey rim, white core
    _sulci(sl, rin, rng, h)
    if t < 0.32:
        _skull_base(sl, h, t, a, b, brain)
    if 0.35 < t < 0.75:
        sl[_ventricles(yy, xx, cy, cx, a, b)] = CSF_HU
        if h.choroid_calcified and 0.42 < t < 0.62:  # calcified glomus in each atrium
            for side in (-1, 1):
                d2 = (yy - cy - a * 0.16) ** 2 + (xx - cx - side * b * 0.12) ** 2
                sl[d2 < (b * 0.035) ** 2] = rng.uniform(90, 250)
    if h.pineal and abs(t - 0.5) < 0.05:
        sl[(yy - cy - h.a0 * 0.1) ** 2 + (xx - cx) ** 2 < (h.b0 * 0.04) ** 2] = rng.uniform(120, 250)
    if t > 0.4:  # falx: a dense midline sheet, sometimes calcified
        falx = (np.abs(xx - cx) < 0.8) & brain & (np.abs(yy - cy) > a * 0.25)
        sl[falx] = 55.0
        if h.falx_calcified:  # calcified plaques along it
            sl[falx & (np.sin(yy * 0.25 + t * 7) > 0.7)] = rng.uniform(100, 300)
    return np.where(brain, rin, 2.0)


def _skull_base(sl: np.ndarray, h: _Head, t: float, a: float, b: float, brain: np.ndarray) -> None:
    """Orbits, sphenoid sinus, petrous ridges with mastoid air, posterior fossa and basal cisterns."""
    yy, xx, cy, cx = h.yy, h.xx, h.cy, h.cx
    if t < 0.2:
        for side in (-1, 1):
            d = np.sqrt((yy - cy + h.a0 * 0.78) ** 2 + (xx - cx - side * h.b0 * 0.38) ** 2)
            sl[d < h.b0 * 0.22] = -90.0  # orbital fat
            sl[d < h.b0 * 0.15] = 12.0  # globe
        sinus = ((yy - cy + a * 0.3) / (a * 0.12)) ** 2 + ((xx - cx) / (b * 0.18)) ** 2 < 1
        sl[sinus] = -1000.0
    if 0.06 < t < 0.3:
        for side in (-1, 1):  # petrous ridge: a dense bar running postero-laterally
            p0 = np.array([cy + a * 0.02, cx + side * b * 0.15])
            p1 = np.array([cy + a * 0.38, cx + side * b * 0.85])
            sl[_segment_distance(yy, xx, p0, p1) < h.b0 * 0.06] = 1600.0
            mastoid = (yy - p1[0] + a * 0.05) ** 2 + (xx - p1[1] + side * b * 0.05) ** 2 < (h.b0 * 0.06) ** 2
            sl[mastoid] = -800.0
        fossa = brain & (yy > cy + a * 0.15)
        sl[fossa & (sl < 100)] = 34.0  # cerebellum
        sl[(yy - cy - a * 0.32) ** 2 + (xx - cx) ** 2 < (b * 0.07) ** 2] = CSF_HU  # fourth ventricle
    if 0.2 < t < 0.36:  # suprasellar and ambient cisterns around the midbrain
        d = np.sqrt((yy - cy + a * 0.02) ** 2 + (xx - cx) ** 2)
        sl[(d > b * 0.13) & (d < b * 0.19) & brain] = CISTERN_HU


def _segment_distance(yy: np.ndarray, xx: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    u = np.clip(((yy - p0[0]) * d[0] + (xx - p0[1]) * d[1]) / float(d @ d), 0, 1)
    return np.sqrt((yy - p0[0] - u * d[0]) ** 2 + (xx - p0[1] - u * d[1]) ** 2)


def _beam_hardening(hu: np.ndarray, inner: np.ndarray, h: _Head, rng: np.random.Generator) -> None:
    """Cupping: brain next to the inner table reads brighter (a subdural mimic); dark streaks between
    the petrous bones at the skull base (the Hounsfield bar)."""
    n = hu.shape[0]
    for k in range(n):
        brain = inner[k] < 1.0
        hu[k][brain] += h.cupping_hu * np.exp(-(1.0 - inner[k][brain]) / 0.04)
        t = (k + 0.5) / n
        if 0.08 < t < 0.28:
            band = np.abs(h.yy - h.cy - h.a0 * 0.22) < h.a0 * 0.04
            streaks = 0.5 + 0.5 * np.sin(h.xx * rng.uniform(0.3, 0.6) + rng.uniform(0, 6.3))
            hu[k][band & brain] -= (rng.uniform(15, 40) * streaks)[band & brain]


def _rotate_and_shift(
    hu: np.ndarray, masks: dict[str, np.ndarray], rng: np.random.Generator
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Patients are never perfectly straight: one in-plane rotation and shift for the whole head."""
    import cv2

    size = hu.shape[1]
    matrix = cv2.getRotationMatrix2D((size / 2, size / 2), rng.uniform(-12, 12), 1.0)
    matrix[:, 2] += rng.uniform(-0.04, 0.04, 2) * size
    warp = lambda img, interp, fill: cv2.warpAffine(  # noqa: E731
        img, matrix, (size, size), flags=interp, borderMode=cv2.BORDER_CONSTANT, borderValue=fill)
    out = np.stack([warp(s, cv2.INTER_LINEAR, -1000.0) for s in hu])
    moved = {name: np.stack([warp(m.astype(np.uint8), cv2.INTER_NEAREST, 0) > 0 for m in mk])
             for name, mk in masks.items()}
    return out, moved


def _ventricles(yy, xx, cy, cx, a, b) -> np.ndarray:  # type: ignore[no-untyped-def]
    left = ((yy - cy + a * 0.05) / (a * 0.28)) ** 2 + ((xx - cx + b * 0.12) / (b * 0.08)) ** 2 < 1
    right = ((yy - cy + a * 0.05) / (a * 0.28)) ** 2 + ((xx - cx - b * 0.12) / (b * 0.08)) ** 2 < 1
    return left | right


def _sulci(sl: np.ndarray, rin: np.ndarray, rng: np.random.Generator, h: _Head) -> None:
    for theta in rng.uniform(-np.pi, np.pi, 10):
        d = h.angle_from(theta)
        sl[(d < 0.025) & (rin > 0.82) & (rin < 1.0)] = SULCUS_HU


def _blur_and_noise(hu: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    import cv2

    out = np.empty_like(hu)
    for k in range(hu.shape[0]):
        out[k] = cv2.GaussianBlur(hu[k], (3, 3), 0.8)  # partial volume at edges
    return out + rng.normal(0, 4.0, hu.shape).astype(np.float32)


def _slab(rng: np.random.Generator, n: int, lo: float = 0.3, hi: float = 0.8) -> range:
    """A run of slices in the supratentorial part of the head."""
    length = int(rng.integers(max(2, n // 8), max(3, n // 4) + 1))
    start = int(rng.integers(int(n * lo), max(int(n * lo) + 1, int(n * hi) - length)))
    return range(start, min(n, start + length))


def _paint(hu, mask, k, region, value) -> None:  # type: ignore[no-untyped-def]
    hu[k][region] = value
    mask[k] |= region


def _epidural(rng: np.random.Generator, hu: np.ndarray, inner: np.ndarray, h: _Head) -> np.ndarray:
    mask = np.zeros(hu.shape, bool)
    d = h.angle_from(rng.uniform(-np.pi, np.pi))
    value, depth0, arc = rng.uniform(*BLOOD_HU), rng.uniform(0.10, 0.18), rng.uniform(0.35, 0.55)
    for k in _slab(rng, hu.shape[0]):
        depth = depth0 * np.clip(1 - (d / arc) ** 2, 0, None)  # biconvex lens: thickest at its centre
        _paint(hu, mask, k, (inner[k] < 1.0) & (inner[k] > 1.0 - depth), value)
    return mask


def _subdural(rng: np.random.Generator, hu: np.ndarray, inner: np.ndarray, h: _Head) -> np.ndarray:
    mask = np.zeros(hu.shape, bool)
    d = h.angle_from(rng.uniform(-np.pi, np.pi))
    value, width, arc = rng.uniform(55.0, 85.0), rng.uniform(0.04, 0.09), rng.uniform(0.7, 1.3)
    for k in _slab(rng, hu.shape[0], 0.25, 0.85):
        taper = width * np.clip(1 - (d / arc) ** 4, 0, None)  # crescent: thin ends along the convexity
        _paint(hu, mask, k, (inner[k] < 1.0) & (inner[k] > 1.0 - taper), value)
    return mask


def _intraparenchymal(rng: np.random.Generator, hu: np.ndarray, inner: np.ndarray, h: _Head) -> np.ndarray:
    mask = np.zeros(hu.shape, bool)
    oy, ox = h.cy + rng.uniform(-0.45, 0.45) * h.a0, h.cx + rng.choice([-1, 1]) * rng.uniform(0.25, 0.5) * h.b0
    radius = rng.uniform(0.05, 0.09) * 2 * h.b0
    value = rng.uniform(*BLOOD_HU)
    slab = _slab(rng, hu.shape[0])
    mid = (slab.start + slab.stop - 1) / 2
    for k in slab:
        rk = radius * np.sqrt(max(1 - ((k - mid) / (len(slab) / 2 + 0.5)) ** 2, 0.2))
        dist = np.sqrt((h.yy - oy) ** 2 + (h.xx - ox) ** 2)
        hu[k][(dist < rk * 1.5) & (inner[k] < 0.9)] = 18.0  # oedema rim
        _paint(hu, mask, k, (dist < rk) & (inner[k] < 0.9), value)
    return mask


def _intraventricular(rng: np.random.Generator, hu: np.ndarray, inner: np.ndarray, h: _Head) -> np.ndarray:
    mask = np.zeros(hu.shape, bool)
    value = rng.uniform(*BLOOD_HU)
    n = hu.shape[0]
    for k in range(n):
        csf = np.abs(hu[k] - CSF_HU) < 0.5
        if csf.sum() == 0 or not 0.4 < (k + 0.5) / n < 0.7:
            continue
        cut = np.quantile(h.yy[csf], 0.55)  # blood layers in the dependent (posterior) part
        _paint(hu, mask, k, csf & (h.yy > cut), value)
    return mask


def _subarachnoid(rng: np.random.Generator, hu: np.ndarray, inner: np.ndarray, h: _Head) -> np.ndarray:
    """Blood fills the sulci (some of them) and the basal cisterns where the slab reaches them."""
    mask = np.zeros(hu.shape, bool)
    value = rng.uniform(55.0, 75.0)
    theta, spread = rng.uniform(-np.pi, np.pi), rng.uniform(1.0, np.pi)
    d = h.angle_from(theta)
    for k in _slab(rng, hu.shape[0], 0.15, 0.7):
        spaces = ((np.abs(hu[k] - SULCUS_HU) < 0.5) & (d < spread)) | (np.abs(hu[k] - CISTERN_HU) < 0.5)
        _paint(hu, mask, k, spaces, value)
    return mask


_PLANTERS = {
    "epidural": _epidural,
    "intraparenchymal": _intraparenchymal,
    "intraventricular": _intraventricular,
    "subarachnoid": _subarachnoid,
    "subdural": _subdural,
}


def write_series(
    phantom: Phantom,
    folder: Path,
    *,
    study_uid: str,
    series_uid: str,
    patient_id: str,
    patient_name: str,
    accession: str,
    rng: np.random.Generator,
    split_folders: bool = False,
    encoding: Encoding | None = None,
) -> list[Path]:
    """Write one CT slice per file, in random file names, optionally across two sub-folders."""
    encoding = encoding or Encoding()
    n = phantom.hu.shape[0]
    paths = []
    for k in rng.permutation(n):
        sub = folder / (f"part{k % 2}" if split_folders else "")
        sub.mkdir(parents=True, exist_ok=True)
        ds = ct_slice_dataset(
            phantom.hu[k],
            z=k * phantom.thickness_mm,
            spacing=phantom.spacing_mm,
            thickness=phantom.thickness_mm,
            instance_number=int(k) + 1,
            study_uid=study_uid,
            series_uid=series_uid,
            patient_id=patient_id,
            patient_name=patient_name,
            accession=accession,
            intercept=encoding.intercept,
            kernel=phantom.kernel,
        )
        _encode(ds, encoding.transfer_syntax)
        path = sub / f"{rng.integers(1 << 62):016x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@dataclass(frozen=True)
class Encoding:
    """How a series is stored: the rescale intercept (0 means signed pixels) and the transfer syntax."""

    intercept: float = -1024.0
    transfer_syntax: UID = ExplicitVRLittleEndian

    @classmethod
    def draw(cls, rng: np.random.Generator) -> Encoding:
        ts = TRANSFER_SYNTAXES[int(rng.integers(len(TRANSFER_SYNTAXES)))]
        return cls(float(rng.choice(INTERCEPTS)), ts if can_encode(ts) else ExplicitVRLittleEndian)


def can_encode(transfer_syntax: UID) -> bool:
    """Whether this installation can write the transfer syntax (JPEG-LS needs the optional pyjpegls)."""
    from pydicom.pixels import get_encoder

    return not transfer_syntax.is_compressed or get_encoder(transfer_syntax).is_available


def _encode(ds: Dataset, transfer_syntax: UID) -> None:
    if transfer_syntax.is_compressed:
        ds.compress(transfer_syntax)  # lossless: the decoded pixels equal the written ones
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax


def ct_slice_dataset(
    hu: np.ndarray,
    *,
    z: float,
    spacing: float = 0.9,
    thickness: float = 5.0,
    instance_number: int = 1,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_id: str = "PHANTOM",
    patient_name: str = "PHANTOM^HEAD",
    accession: str = "",
    intercept: float = -1024.0,
    kernel: str = "STANDARD",
    series_description: str = "HEAD WO CONTRAST",
) -> Dataset:
    """A CT Image Storage dataset holding one axial slice of HU values: 16-bit storage, unsigned unless
    the intercept is 0 (then signed, as some scanners write)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(CT_IMAGE_STORAGE)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    ds.FrameOfReferenceUID = ds.StudyInstanceUID + ".1" if len(ds.StudyInstanceUID) < 62 else generate_uid()
    ds.Modality = "CT"
    ds.SpecificCharacterSet = "ISO_IR 192"  # UTF-8, so names such as MÜLLER^ZOË survive
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.AccessionNumber = accession
    ds.StudyDate = _dt.date(2026, 1, 1).strftime("%Y%m%d")
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD (synthetic phantom)"
    ds.SeriesDescription = series_description
    ds.SeriesNumber = 2
    ds.InstanceNumber = instance_number
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ConvolutionKernel = kernel
    ds.BodyPartExamined = "HEAD"
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    rows, cols = hu.shape
    ds.ImagePositionPatient = [-cols * spacing / 2, -rows * spacing / 2, float(z)]
    ds.SliceLocation = float(z)
    ds.SliceThickness = thickness
    ds.PixelSpacing = [spacing, spacing]
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = int(intercept >= 0)
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    if ds.PixelRepresentation:
        stored = np.clip(np.rint(hu - intercept), -32768, 32767).astype(np.int16)
    else:
        stored = np.clip(np.rint(hu - intercept), 0, 65535).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def synth_studies(
    out: Path, n_studies: int, seed: int = 0, n_slices: int = 24, size: int = 256, p_positive: float = 0.5,
    progress: Callable[[str, int, int], None] | None = None, encoding: Encoding | None = None,
    phantoms: str = "ellipse",
) -> dict:
    """Write n studies under out and a manifest.json with each study's labels and lesion slices.
    Each study's storage is drawn at random unless `encoding` fixes one for all. `phantoms`: "ellipse"
    (this module's geometric heads), "anatomy", "anatomy-v2" or "anatomy-v3" (ichbatch.anatomy: the MNI
    template brain, revision 1, 2 or 3)."""
    make = _generator(phantoms)
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    masks: dict[str, np.ndarray] = {}
    for i in range(n_studies):
        subtypes = draw_subtypes(rng, p_positive)
        phantom = make(rng, n_slices=n_slices, size=size, subtypes=subtypes)
        drawn = Encoding.draw(rng)  # drawn even when fixed, so a seed gives the same heads either way
        stored = encoding or drawn
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = out / f"study_{seed:04d}_{i:04d}"
        write_series(
            phantom, folder, study_uid=study_uid, series_uid=series_uid,
            patient_id=f"PH{seed:04d}{i:04d}", patient_name=f"PHANTOM^{seed:04d}^{i:04d}",
            accession=f"SYN{seed:04d}{i:04d}", rng=rng, split_folders=bool(i % 2), encoding=stored,
        )
        studies.append(_manifest_entry(phantom, study_uid, series_uid, f"SYN{seed:04d}{i:04d}", stored))
        if phantom.masks:
            union = np.logical_or.reduce(list(phantom.masks.values()))
            masks[study_uid] = np.packbits(union, axis=-1)  # (slices, rows, cols/8), z order
        if progress:
            progress("generating phantoms", i + 1, n_studies)
    np.savez_compressed(out / "lesion_masks.npz", **masks)  # type: ignore[arg-type]  # numpy stub: **kwds as bool
    manifest = {"seed": seed, "generator": "ichbatch.synth", "phantoms": phantoms, "size": size,
                "lesion_masks": "lesion_masks.npz", "studies": studies}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def _generator(phantoms: str) -> Callable[..., Phantom]:
    if phantoms == "ellipse":
        return make_phantom
    revision = {"anatomy": 1, "anatomy-v2": 2, "anatomy-v3": 3}.get(phantoms)
    if revision is None:
        raise ValueError(f"phantoms must be one of {', '.join(PHANTOM_KINDS)}. Received: {phantoms!r}")
    from .anatomy import anatomy_phantom

    return functools.partial(anatomy_phantom, revision=revision)


def load_masks(folder: Path) -> dict[str, np.ndarray]:
    """study_uid -> (slices, rows, cols) bool lesion mask (any subtype), for studies with a lesion."""
    with np.load(folder / "lesion_masks.npz") as data:
        return {uid: np.unpackbits(data[uid], axis=-1).astype(bool) for uid in data.files}


def draw_subtypes(rng: np.random.Generator, p_positive: float = 0.5) -> tuple[str, ...]:
    """No hemorrhage, or one to three subtypes (one most often)."""
    if rng.random() >= p_positive:
        return ()
    k = int(rng.choice([1, 1, 1, 2, 2, 3]))
    return tuple(sorted(rng.choice(SUBTYPES, size=k, replace=False)))


def _manifest_entry(phantom: Phantom, study_uid: str, series_uid: str, accession: str, encoding: Encoding) -> dict:
    lesion = np.zeros(phantom.hu.shape, bool)
    for m in phantom.masks.values():
        lesion |= m
    slices = []
    for k in np.flatnonzero(lesion.any(axis=(1, 2))):
        rows, cols = np.nonzero(lesion[k])
        present = [s for s, m in phantom.masks.items() if m[k].any()]
        slices.append({"index": int(k), "labels": present,
                       "bbox": [int(rows.min()), int(cols.min()), int(rows.max()), int(cols.max())]})
    return {"study_uid": study_uid, "series_uid": series_uid, "accession": accession,
            "n_slices": int(phantom.hu.shape[0]), "slice_thickness_mm": phantom.thickness_mm,
            "pixel_spacing_mm": round(phantom.spacing_mm, 4), "rescale_intercept": encoding.intercept,
            "transfer_syntax": str(encoding.transfer_syntax), "labels": phantom.labels(), "lesion_slices": slices}
