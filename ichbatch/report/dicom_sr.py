"""Structured results for the PACS, built with highdicom: a TID 1500 Comprehensive 3D SR and a Key
Object Selection document, as IHE AI Results (AIR) describes.

The SR has one measurement group per label the model gives: the finding (private code, scheme
99ICHBATCH, declared in the object), present or absent by the card's threshold, the calibrated
probability and the threshold as measurements, the model's name and version as the algorithm
identification, and the key slices (else the series' first slice) as source images by SOP Instance
UID. A study that was not assessed gets, per label, "not assessed" and the reason instead of numbers.
Both documents say RESEARCH in Content Qualification and carry the notice in their series description.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from .. import NOT_FOR_DIAGNOSIS, __version__
from ..domain import SliceId, Status, StudyResult
from .dicom_out import PATIENT_STUDY_TAGS

T = TypeVar("T", bound=Dataset)
SCHEME = "99ICHBATCH"
FINDINGS = {  # label -> (code value, at most 16 characters; meaning)
    "any": ("ICH-ANY", "Intracranial hemorrhage, any type"),
    "epidural": ("ICH-EDH", "Epidural hemorrhage"),
    "intraparenchymal": ("ICH-IPH", "Intraparenchymal hemorrhage"),
    "intraventricular": ("ICH-IVH", "Intraventricular hemorrhage"),
    "subarachnoid": ("ICH-SAH", "Subarachnoid hemorrhage"),
    "subdural": ("ICH-SDH", "Subdural hemorrhage"),
}
CT_HEAD = Code("24725-4", "LN", "CT Head")
PRESENCE = Code("PRESENCE", SCHEME, "Presence at the model's threshold")
PRESENT, ABSENT = Code("52101004", "SCT", "Present"), Code("2667000", "SCT", "Absent")
NOT_ASSESSED = Code("NOT-ASSESSED", SCHEME, "Not assessed")
REASON = Code("REASON", SCHEME, "Reason not assessed")
PROBABILITY = Code("PROBABILITY", SCHEME, "Calibrated probability")
THRESHOLD = Code("THRESHOLD", SCHEME, "Decision threshold")
NO_UNITS = Code("1", "UCUM", "no units")
OF_INTEREST = Code("113000", "DCM", "Of Interest")


def structured_report(result: StudyResult, source: Dataset, series_uid: str, series_number: int,
                      description: str) -> hd.sr.Comprehensive3DSR:
    refs = _references(result, source)
    groups = [_finding(result, label, refs) for label in result.outputs if label in FINDINGS]
    evidence = [ds for ds, _ in refs]
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(result)),
        procedure_reported=CT_HEAD, imaging_measurements=groups,
        title=Code("126000", "DCM", "Imaging Measurement Report"))
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence, content=report[0], series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, **_common(result, description))
    return _versions(sr, result)


def key_object_selection(result: StudyResult, source: Dataset, series_uid: str, series_number: int,
                         description: str) -> hd.ko.KeyObjectSelectionDocument | None:
    """The key slices as a KOS (none when the study has no key slices)."""
    if not result.key_slices:
        return None
    refs = [ds for ds, _ in _references(result, source)]
    flagged = ", ".join(label for label in result.outputs if result.flags.get(label)) or "none"
    content = hd.ko.KeyObjectSelection(
        document_title=OF_INTEREST, referenced_objects=refs, observer_device_context=_device(result),
        description=f"{NOT_FOR_DIAGNOSIS}. Key slices of {result.model} {result.model_version}; flagged: {flagged}"[:1024])
    kos = hd.ko.KeyObjectSelectionDocument(
        evidence=refs, content=content, series_instance_uid=series_uid, series_number=series_number,
        sop_instance_uid=generate_uid(), instance_number=1, **_common(result, description, coding_schemes=False))
    return _versions(kos, result)


def _versions(ds: T, result: StudyResult) -> T:
    """ichbatch's version, then the model's (a multi-valued LO, as the other DICOM outputs have it)."""
    ds.SoftwareVersions = [__version__, result.model_version[:64] or "unknown"]
    return ds


def _common(result: StudyResult, description: str, coding_schemes: bool = True) -> dict[str, Any]:
    common: dict[str, Any] = dict(manufacturer="ichbatch", series_description=description,
                  manufacturer_model_name=result.model[:64])
    if coding_schemes:
        common.update(content_qualification=hd.ContentQualificationValues.RESEARCH, coding_schemes=[
            hd.coding_schemes.CodingSchemeIdentificationItem(designator=SCHEME, name="ichbatch findings and results",
                                                 responsible_organization="ichbatch")])
    return common


def _device(result: StudyResult) -> hd.sr.ObserverContext:
    uid = generate_uid(entropy_srcs=["ichbatch", result.model, result.model_version])  # the same for a model
    return hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device"),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=uid, name="ichbatch", manufacturer_name="ichbatch", model_name=f"{result.model} {result.model_version}"[:64]))


def _finding(result: StudyResult, label: str,
             refs: Sequence[tuple[Dataset, int | None]]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    prob = result.study_probs.get(label)
    if result.status != Status.OK or prob is None:
        group = _group(result, label, refs, NOT_ASSESSED, [])
        reason = result.message if result.status != Status.OK else f"the model gives no {label} output"
        group[0].ContentSequence.append(hd.sr.TextContentItem(
            name=REASON, value=(reason or "not assessed")[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS))
        return group
    threshold = float(result.thresholds.get(label, 0.5))
    return _group(result, label, refs, PRESENT if result.flags.get(label) else ABSENT,
                  [hd.sr.Measurement(name=PROBABILITY, value=round(float(prob), 6), unit=NO_UNITS),
                   hd.sr.Measurement(name=THRESHOLD, value=threshold, unit=NO_UNITS)])


def _group(result: StudyResult, label: str, refs: Sequence[tuple[Dataset, int | None]], presence: Code,
           measurements: list[hd.sr.Measurement]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    value, meaning = FINDINGS[label]
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier=f"ichbatch {label}"),
        finding_type=Code(value, SCHEME, meaning),
        algorithm_id=hd.sr.AlgorithmIdentification(name=result.model[:64] or "unknown",
                                                   version=result.model_version[:64] or "unknown"),
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PRESENCE, presence)],
        measurements=measurements or None,
        source_images=[hd.sr.SourceImageForMeasurementGroup(
            referenced_sop_class_uid=ds.SOPClassUID, referenced_sop_instance_uid=ds.SOPInstanceUID,
            referenced_frame_numbers=None if frame is None else [frame + 1]) for ds, frame in refs])


def _references(result: StudyResult, source: Dataset) -> list[tuple[Dataset, int | None]]:
    """Header-only stand-ins for the key slices (else the source slice), each with its 0-based frame in a
    multi-frame object: what SR and KOS reference, and the evidence they list, with the patient and
    study of the source."""
    slices: Sequence[SliceId | None] = result.key_slices or (None,)
    refs = []
    for ident in slices:
        ds = Dataset()
        for keyword in PATIENT_STUDY_TAGS:  # as the other DICOM outputs copy them; type 2: present, maybe empty
            if keyword in source or keyword != "SpecificCharacterSet":
                setattr(ds, keyword, source[keyword].value if keyword in source else "")
        for keyword in ("SeriesInstanceUID", "SOPClassUID", "Rows", "Columns"):
            if keyword in source:
                setattr(ds, keyword, source[keyword].value)
        ds.SOPInstanceUID = ident.sop_uid if ident is not None and ident.sop_uid else source.SOPInstanceUID
        refs.append((ds, None if ident is None else ident.frame))
    return refs
