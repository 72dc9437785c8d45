"""PACS outputs: a TID 1500 SR and a Key Object Selection (dicom_sr.py), the key images as Secondary
Capture and the PDF as Encapsulated PDF.

All go into the original study (same StudyInstanceUID, patient and study modules copied from a source
image), so a PACS files them beside the scan: one series per kind of object for each study and run
(a series has one modality, and SR, KO, OT and DOC are four). Checked with dciodvfy in the tests.
"""

from __future__ import annotations

import datetime as dt
import io
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from .. import NOT_FOR_DIAGNOSIS, __version__
from ..domain import StudyImages, StudyResult
from .files import atomic_write_bytes, safe_stem

ENCAPSULATED_PDF = "1.2.840.10008.5.1.4.1.1.104.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
PATIENT_STUDY_TAGS = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyTime",
    "ReferringPhysicianName", "StudyID", "AccessionNumber", "StudyDescription", "SpecificCharacterSet",
)
PDF_SERIES_NUMBER, SC_SERIES_NUMBER, SR_SERIES_NUMBER, KO_SERIES_NUMBER = 9901, 9902, 9903, 9904


def write_dicom_outputs(result: StudyResult, images: StudyImages, pdf_bytes: bytes | None, folder: Path) -> list[Path]:
    """Write SR, KOS, key images and report; returns the files written (SR first)."""
    from .dicom_sr import key_object_selection, structured_report

    source = pydicom.dcmread(result.source_path, stop_before_pixels=True)
    stem = safe_stem(result.study.study_uid)
    name = f"ichbatch {result.model} {result.model_version}"
    paths = [_save(structured_report(result, source, generate_uid(), SR_SERIES_NUMBER, _with_notice(f"{name} SR")),
                   Path(folder) / f"study_{stem}_sr.dcm")]
    kos = key_object_selection(result, source, generate_uid(), KO_SERIES_NUMBER, _with_notice(f"{name} key slices"))
    if kos is not None:
        paths.append(_save(kos, Path(folder) / f"study_{stem}_kos.dcm"))
    if pdf_bytes is not None:
        paths.append(_save(encapsulated_pdf(source, pdf_bytes, result), Path(folder) / f"study_{stem}_report.dcm"))
    series_uid = generate_uid()
    for n, ident in enumerate(result.key_slices, 1):
        key = images.key_image(ident)
        if key is None:
            continue
        if key.gradcam is None:
            comment = f"key slice {ident.label}, brain window (no label flagged: no heat map)"
            picture = np.repeat(key.brain[..., None], 3, axis=2)
        else:
            comment = f"key slice {ident.label}, heat map for {key.heat_label!r} x probability" + (
                f": {result.heatmap}" if result.heatmap else "")
            picture = key.gradcam
        ds = secondary_capture(source, picture, series_uid, n, comment, result)
        _reference_source(ds, source, ident.sop_uid)
        paths.append(_save(ds, Path(folder) / f"study_{stem}_key{n}.dcm"))
    return paths


def _save(ds: Dataset, path: Path) -> Path:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _base(source: Dataset, sop_class: str, modality: str, series_uid: str, series_number: int,
          instance: int, result: StudyResult) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    for tag in PATIENT_STUDY_TAGS:
        ds[tag] = source[tag] if tag in source else pydicom.DataElement(tag, pydicom.datadict.dictionary_VR(tag), "")
    if not ds.SpecificCharacterSet:
        del ds.SpecificCharacterSet
    now = dt.datetime.now()
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = series_uid, series_number, instance
    ds.SeriesDescription = _with_notice(f"ichbatch {result.model} {result.model_version}")
    ds.Manufacturer = "ichbatch"
    ds.ManufacturerModelName = result.model[:64]  # the algorithm; its version is the second SoftwareVersions
    ds.SoftwareVersions = [__version__, result.model_version[:64] or "unknown"]
    ds.ConversionType = "WSD"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.BurnedInAnnotation = "YES"
    return ds


def encapsulated_pdf(source: Dataset, pdf_bytes: bytes, result: StudyResult) -> Dataset:
    ds = _base(source, ENCAPSULATED_PDF, "DOC", generate_uid(), PDF_SERIES_NUMBER, 1, result)
    ds.AcquisitionDateTime = ds.ContentDate + ds.ContentTime
    ds.DocumentTitle = _with_notice(f"ICH screen {result.model} {result.model_version}")
    ds.ConceptNameCodeSequence = []
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    # OB values must have even length; the PDF ends after its %%EOF, so a trailing pad byte is harmless.
    ds.EncapsulatedDocument = pdf_bytes + (b"\x00" if len(pdf_bytes) % 2 else b"")
    ds.EncapsulatedDocumentLength = len(pdf_bytes)
    return ds


def secondary_capture(source: Dataset, rgb: np.ndarray, series_uid: str, instance: int, comment: str,
                      result: StudyResult) -> Dataset:
    ds = _base(source, SECONDARY_CAPTURE, "OT", series_uid, SC_SERIES_NUMBER, instance, result)
    ds.PatientOrientation = ""
    ds.Laterality = ""  # type 2C; the head is not a paired organ
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.DerivationDescription = f"{comment}; {NOT_FOR_DIAGNOSIS}"
    ds.ImageComments = comment
    rgb = burn_in(rgb, [NOT_FOR_DIAGNOSIS, f"{result.model} {result.model_version}"])
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.LossyImageCompression = "00"
    ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
    return ds


NOTICE = "NOT FOR DIAGNOSIS"
MIN_BURN_WIDTH = 256


def _with_notice(text: str) -> str:
    """A 64-character LO value that always keeps the notice whole: the rest is shortened, never it."""
    room = 64 - len(NOTICE) - 3
    return f"{NOTICE} - {text[:room]}"


def burn_in(rgb: np.ndarray, lines: list[str]) -> np.ndarray:
    """The image with a black band below it carrying the lines in white, as big as the width allows.
    BurnedInAnnotation YES is then true: a viewer that drops the headers still shows the notice."""
    import cv2

    if rgb.shape[1] < MIN_BURN_WIDTH:  # enlarged first, so that the notice stays legible
        factor = -(-MIN_BURN_WIDTH // rgb.shape[1])
        rgb = cv2.resize(rgb, (rgb.shape[1] * factor, rgb.shape[0] * factor), interpolation=cv2.INTER_NEAREST)
    width = rgb.shape[1]
    font, thickness = cv2.FONT_HERSHEY_SIMPLEX, 1
    widest = max(cv2.getTextSize(line, font, 1.0, thickness)[0][0] for line in lines)
    scale = min(1.0, 0.94 * width / widest)
    line_h = int(np.ceil(cv2.getTextSize("Hg", font, scale, thickness)[0][1] * 1.8)) + 2
    band = np.zeros((line_h * len(lines) + 4, width, 3), np.uint8)
    for k, line in enumerate(lines):
        cv2.putText(band, line, (int(0.03 * width), (k + 1) * line_h - 2), font, scale, (255, 255, 255), thickness,
                    cv2.LINE_AA)
    return np.concatenate([np.ascontiguousarray(rgb, np.uint8), band])


def _reference_source(ds: Dataset, source: Dataset, sop_uid: str) -> None:
    """Source Image Sequence: the CT slice the key image was made from, so a viewer can find it."""
    if not sop_uid:
        return
    item = Dataset()
    item.ReferencedSOPClassUID = source.get("SOPClassUID", "")
    item.ReferencedSOPInstanceUID = sop_uid
    ds.SourceImageSequence = [item]
