"""Generated head-CT phantom studies, written as real DICOM CT series, with a manifest of the truth.

Anatomy along z (skull, scalp, grey and white matter, ventricles, sulci, a calcified pineal gland that must
not count as blood) with scanner noise, and optionally hemorrhages of the five RSNA subtypes. This is the
demo data, the test data and the training data for the shipped demo weights. Not a medical simulation.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from .config import CT_IMAGE_STORAGE, SUBTYPES

BLOOD_HU = (60.0, 85.0)


@dataclass
class Phantom:
    hu: np.ndarray  # (n_slices, rows, cols) float32, slice 0 at the skull base
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # subtype -> (n, rows, cols) bool
    spacing_mm: float = 0.9
    thickness_mm: float = 5.0

    def labels(self) -> dict[str, int]:
        present = {s: int(self.masks.get(s, np.zeros(1, bool)).any()) for s in SUBTYPES}
        return {"any": int(any(present.values())), **present}


def make_phantom(
    rng: np.random.Generator, n_slices: int = 24, size: int = 256, subtypes: tuple[str, ...] = ()
) -> Phantom:
    """One head volume in HU with the given hemorrhage subtypes planted."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = size / 2 + rng.normal(0, size * 0.01), size / 2 + rng.normal(0, size * 0.01)
    a0, b0 = size * rng.uniform(0.36, 0.40), size * rng.uniform(0.29, 0.33)  # head semi-axes, AP > LR
    skull_px = rng.uniform(0.025, 0.035) * size
    hu = np.full((n_slices, size, size), -1000.0, np.float32)
    inner = np.zeros((n_slices, size, size), np.float32)  # normalised radius inside the inner table
    for k in range(n_slices):
        t = (k + 0.5) / n_slices  # 0 skull base .. 1 vertex
        scale = np.sqrt(max(1 - ((t - 0.45) / 0.62) ** 2, 0.05))
        r = np.sqrt(((yy - cy) / (a0 * scale)) ** 2 + ((xx - cx) / (b0 * scale)) ** 2)
        skull_frac = skull_px / (b0 * scale)
        rin = r / (1 - skull_frac)
        hu[k][r < 1.04] = 45.0  # scalp
        hu[k][r < 1.0] = rng.uniform(900, 1400)  # skull
        brain = rin < 1.0
        hu[k][brain] = np.where(rin[brain] > 0.8, 38.0, 28.0)  # grey rim, white core
        inner[k] = np.where(brain, rin, 2.0)
        _sulci(hu[k], rin, rng, yy, xx, cy, cx)
        if 0.35 < t < 0.75:
            hu[k][_ventricles(yy, xx, cy, cx, a0 * scale, b0 * scale)] = 5.0
        if abs(t - 0.5) < 0.05:
            hu[k][(yy - cy - a0 * 0.1) ** 2 + (xx - cx) ** 2 < (size * 0.012) ** 2] = 180.0  # pineal
    masks = {s: _PLANTERS[s](rng, hu, inner, yy, xx, cy, cx, a0, b0) for s in subtypes}
    hu = _blur_and_noise(hu, rng)
    return Phantom(hu=hu, masks=masks, thickness_mm=5.0, spacing_mm=230.0 / size)


def _ventricles(yy, xx, cy, cx, a, b) -> np.ndarray:  # type: ignore[no-untyped-def]
    left = ((yy - cy + a * 0.05) / (a * 0.28)) ** 2 + ((xx - cx + b * 0.12) / (b * 0.08)) ** 2 < 1
    right = ((yy - cy + a * 0.05) / (a * 0.28)) ** 2 + ((xx - cx - b * 0.12) / (b * 0.08)) ** 2 < 1
    return left | right


def _sulci(sl: np.ndarray, rin: np.ndarray, rng, yy, xx, cy, cx) -> None:  # type: ignore[no-untyped-def]
    angle = np.arctan2(yy - cy, xx - cx)
    for theta in rng.uniform(-np.pi, np.pi, 10):
        d = np.abs(np.angle(np.exp(1j * (angle - theta))))
        sl[(d < 0.025) & (rin > 0.82) & (rin < 1.0)] = 8.0


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


def _epidural(rng, hu, inner, yy, xx, cy, cx, a0, b0):  # type: ignore[no-untyped-def]
    mask = np.zeros(hu.shape, bool)
    theta = rng.uniform(-np.pi, np.pi)
    angle = np.arctan2(yy - cy, xx - cx)
    d = np.abs(np.angle(np.exp(1j * (angle - theta))))
    value = rng.uniform(*BLOOD_HU)
    for k in _slab(rng, hu.shape[0]):
        depth = 0.14 * np.clip(1 - d / 0.45, 0, None)  # biconvex lens: thickest at its centre
        _paint(hu, mask, k, (inner[k] < 1.0) & (inner[k] > 1.0 - depth), value)
    return mask


def _subdural(rng, hu, inner, yy, xx, cy, cx, a0, b0):  # type: ignore[no-untyped-def]
    mask = np.zeros(hu.shape, bool)
    theta = rng.uniform(-np.pi, np.pi)
    angle = np.arctan2(yy - cy, xx - cx)
    d = np.abs(np.angle(np.exp(1j * (angle - theta))))
    value = rng.uniform(*BLOOD_HU)
    for k in _slab(rng, hu.shape[0], 0.25, 0.85):
        _paint(hu, mask, k, (inner[k] < 1.0) & (inner[k] > 0.93) & (d < 1.0), value)  # thin crescent
    return mask


def _intraparenchymal(rng, hu, inner, yy, xx, cy, cx, a0, b0):  # type: ignore[no-untyped-def]
    mask = np.zeros(hu.shape, bool)
    oy, ox = cy + rng.uniform(-0.45, 0.45) * a0, cx + rng.choice([-1, 1]) * rng.uniform(0.25, 0.5) * b0
    radius = rng.uniform(0.05, 0.09) * 2 * b0
    value = rng.uniform(*BLOOD_HU)
    slab = _slab(rng, hu.shape[0])
    mid = (slab.start + slab.stop - 1) / 2
    for k in slab:
        rk = radius * np.sqrt(max(1 - ((k - mid) / (len(slab) / 2 + 0.5)) ** 2, 0.2))
        dist = np.sqrt((yy - oy) ** 2 + (xx - ox) ** 2)
        hu[k][(dist < rk * 1.5) & (inner[k] < 0.9)] = 18.0  # oedema rim
        _paint(hu, mask, k, (dist < rk) & (inner[k] < 0.9), value)
    return mask


def _intraventricular(rng, hu, inner, yy, xx, cy, cx, a0, b0):  # type: ignore[no-untyped-def]
    mask = np.zeros(hu.shape, bool)
    value = rng.uniform(*BLOOD_HU)
    n = hu.shape[0]
    for k in range(n):
        csf = np.abs(hu[k] - 5.0) < 0.5
        if csf.sum() == 0 or not 0.4 < (k + 0.5) / n < 0.7:
            continue
        ys = yy[csf]
        cut = np.quantile(ys, 0.55)  # blood layers in the dependent (posterior) part
        _paint(hu, mask, k, csf & (yy > cut), value)
    return mask


def _subarachnoid(rng, hu, inner, yy, xx, cy, cx, a0, b0):  # type: ignore[no-untyped-def]
    mask = np.zeros(hu.shape, bool)
    value = rng.uniform(55.0, 75.0)
    for k in _slab(rng, hu.shape[0], 0.2, 0.7):
        sulci = np.abs(hu[k] - 8.0) < 0.5
        basal = (inner[k] < 0.3) & (np.abs(yy - cy - a0 * 0.2) < a0 * 0.05)  # a cistern band
        _paint(hu, mask, k, sulci | basal, value)
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
) -> list[Path]:
    """Write one CT slice per file, in random file names, optionally across two sub-folders."""
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
        )
        path = sub / f"{rng.integers(1 << 62):016x}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


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
    """A CT Image Storage dataset holding one axial slice of HU values (unsigned 16-bit storage)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
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
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = intercept
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 80
    stored = np.clip(np.rint(hu - intercept), 0, 65535).astype(np.uint16)
    ds.PixelData = stored.tobytes()
    return ds


def synth_studies(
    out: Path, n_studies: int, seed: int = 0, n_slices: int = 24, size: int = 256, p_positive: float = 0.5
) -> dict:
    """Write n studies under out and a manifest.json with each study's labels and lesion slices."""
    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    studies = []
    masks: dict[str, np.ndarray] = {}
    for i in range(n_studies):
        positive = rng.random() < p_positive
        k = int(rng.integers(1, 3)) if positive else 0
        subtypes = tuple(sorted(rng.choice(SUBTYPES, size=k, replace=False))) if k else ()
        phantom = make_phantom(rng, n_slices=n_slices, size=size, subtypes=subtypes)
        study_uid, series_uid = generate_uid(), generate_uid()
        folder = out / f"study_{seed:04d}_{i:04d}"
        write_series(
            phantom, folder, study_uid=study_uid, series_uid=series_uid,
            patient_id=f"PH{seed:04d}{i:04d}", patient_name=f"PHANTOM^{seed:04d}^{i:04d}",
            accession=f"SYN{seed:04d}{i:04d}", rng=rng, split_folders=bool(i % 2),
        )
        studies.append(_manifest_entry(phantom, study_uid, series_uid, f"SYN{seed:04d}{i:04d}"))
        if phantom.masks:
            union = np.logical_or.reduce(list(phantom.masks.values()))
            masks[study_uid] = np.packbits(union, axis=-1)  # (slices, rows, cols/8), z order
    np.savez_compressed(out / "lesion_masks.npz", **masks)
    manifest = {"seed": seed, "generator": "ichbatch.synth", "size": size, "lesion_masks": "lesion_masks.npz",
                "studies": studies}
    tmp = out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out / "manifest.json")
    return manifest


def load_masks(folder: Path) -> dict[str, np.ndarray]:
    """study_uid -> (slices, rows, cols) bool lesion mask (any subtype), for studies with a lesion."""
    with np.load(folder / "lesion_masks.npz") as data:
        return {uid: np.unpackbits(data[uid], axis=-1).astype(bool) for uid in data.files}


def _manifest_entry(phantom: Phantom, study_uid: str, series_uid: str, accession: str) -> dict:
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
            "n_slices": int(phantom.hu.shape[0]), "labels": phantom.labels(), "lesion_slices": slices}
