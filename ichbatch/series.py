"""Stage 2: group instances by UID, choose the axial non-contrast CT series, order its slices.

Every series gets a recorded reason, chosen or not. Slice order comes from ImagePositionPatient
projected on the slice normal, turned to point to the head (+z in DICOM's patient coordinates, whatever
the patient position), never from file names or InstanceNumber.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path
from collections.abc import Iterable

import numpy as np

from .config import CT_SOP_CLASSES, DEFAULT_RULES, SelectionRules
from .domain import InstanceRef, SeriesChoice, SeriesGroup, SliceRef, StudyMeta
from .images import NOT_HU, is_image

POSITION_TOLERANCE_MM = 0.01


def group_studies(instances: Iterable[InstanceRef]) -> dict[str, list[SeriesGroup]]:
    """study_uid -> its series, in a stable order. Folders play no part: only UIDs do."""
    by_series: dict[tuple[str, str], list[InstanceRef]] = defaultdict(list)
    for inst in instances:
        by_series[(inst.study_uid, inst.series_uid)].append(inst)
    studies: dict[str, list[SeriesGroup]] = defaultdict(list)
    for (study_uid, series_uid), insts in sorted(by_series.items()):
        insts.sort(key=lambda i: i.path)
        studies[study_uid].append(SeriesGroup(study_uid, series_uid, tuple(insts)))
    return dict(studies)


def choose_series(series: list[SeriesGroup], rules: SelectionRules = DEFAULT_RULES) -> SeriesChoice:
    """Pick the series to run; rejected ones keep the reason they were passed over."""
    study = _study_of(series)
    if len(series) == 1 and all(is_image(i) for i in series[0].instances):
        return _image_choice(series[0])
    reasons: dict[str, str] = {}
    candidates: list[tuple[tuple, SeriesGroup, tuple[SliceRef, ...], tuple[str, ...]]] = []
    for group in series:
        usable = [i for i in group.instances if _instance_problem(i, rules) is None]
        if not usable:
            reasons[group.series_uid] = "rejected: " + _series_problem(group, rules)
            continue
        slices, warnings = order_slices(usable, rules)
        if len(slices) < rules.min_slices:
            reasons[group.series_uid] = (
                f"rejected: {len(slices)} axial slice(s), fewer than the minimum of {rules.min_slices}"
            )
            continue
        bone = _is_bone(group, rules)
        contrast = bool(usable[0].contrast_agent.strip())
        # Preference: non-contrast, soft-tissue kernel, original (not derived), then the most slices.
        derived = "DERIVED" in usable[0].image_type
        rank = (contrast, bone, derived, -len(slices), group.series_uid)
        candidates.append((rank, group, slices, warnings))
        reasons[group.series_uid] = _describe(len(slices), bone, contrast)
    digest = instances_digest(i.sop_uid for g in series for i in g.instances)
    if not candidates:
        return SeriesChoice(study, None, (), reasons, message=_skip_message(reasons), instances_digest=digest)
    candidates.sort(key=lambda c: c[0])
    _, best, slices, warnings = candidates[0]
    for _, other, _, _ in candidates[1:]:
        reasons[other.series_uid] = "not chosen: " + reasons[other.series_uid] + f" (preferred {best.series_uid})"
    reasons[best.series_uid] = "chosen: " + reasons[best.series_uid]
    # Identifiers come from the series that was run, not from whichever series sorted first.
    return SeriesChoice(best.instances[0].study, best, slices, reasons, warnings=warnings, instances_digest=digest)


def _image_choice(group: SeriesGroup) -> SeriesChoice:
    """A plain image is a study of one slice; nothing to order or choose."""
    image = group.instances[0]
    ref = SliceRef(image.path, None, (0.0, 0.0, 0.0), 0.0, sop_uid=image.sop_uid, instance_number=1)
    try:  # a changed image is a new input for --resume, though its name (and so its UIDs) stay
        st = Path(image.path).stat()
        version = f"{st.st_size}:{st.st_mtime_ns}"
    except OSError:
        version = ""
    return SeriesChoice(image.study, group, (ref,), {group.series_uid: "chosen: a plain image"}, warnings=(NOT_HU,),
                        instances_digest=instances_digest([image.sop_uid, version]))


def instances_digest(sop_uids: Iterable[str]) -> str:
    """The same set of instances gives the same digest, in any order (how --resume knows a study)."""
    digest = hashlib.sha256()
    for uid in sorted(set(sop_uids)):
        digest.update(uid.encode() + b"\n")
    return digest.hexdigest()


def _describe(n: int, bone: bool, contrast: bool) -> str:
    kernel = "bone kernel" if bone else "soft-tissue kernel"
    phase = "with contrast" if contrast else "non-contrast"
    return f"axial CT, {n} slices, {kernel}, {phase}"


def _skip_message(reasons: dict[str, str]) -> str:
    details = "; ".join(f"series {uid}: {why.removeprefix('rejected: ')}" for uid, why in reasons.items())
    return f"no usable axial CT series ({details})"


def _study_of(series: list[SeriesGroup]) -> StudyMeta:
    for group in series:
        if group.instances:
            return group.instances[0].study
    raise ValueError("choose_series needs at least one series with instances")


def _instance_problem(inst: InstanceRef, rules: SelectionRules) -> str | None:
    """Why one instance cannot be a slice of the head series, or None when it can."""
    if inst.modality != rules.modality:
        return f"modality {inst.modality or 'missing'}, not {rules.modality}"
    if inst.sop_class_uid not in CT_SOP_CLASSES:
        return f"SOP class {inst.sop_class_uid} is not a CT image (secondary capture, dose report or other)"
    excluded = set(inst.image_type) & set(rules.excluded_image_types)
    if excluded:
        return f"ImageType {'/'.join(sorted(excluded))} (scout or localizer)"
    if not inst.has_pixels:
        return "no pixel data"
    if inst.samples_per_pixel != 1 or not inst.photometric.startswith("MONOCHROME"):
        return f"{inst.photometric or 'unknown'} colour image, not Hounsfield data"
    normal = _normal(_orientation(inst))
    if normal is None:
        return "no ImageOrientationPatient"
    if abs(normal[2]) < rules.min_axial_cosine:
        return "not axial (sagittal, coronal or oblique orientation)"
    return None


def _series_problem(group: SeriesGroup, rules: SelectionRules) -> str:
    problems: dict[str, int] = defaultdict(int)
    for inst in group.instances:
        problems[_instance_problem(inst, rules) or "ok"] += 1
    return "; ".join(sorted(problems, key=lambda p: -problems[p]))


def _is_bone(group: SeriesGroup, rules: SelectionRules) -> bool:
    inst = group.instances[0]
    text = f"{inst.kernel} {inst.series_description}".upper()
    return any(word in text for word in rules.bone_kernel_words)


def _orientation(inst: InstanceRef) -> tuple[float, ...] | None:
    if inst.orientation:
        return inst.orientation
    if inst.frames and inst.frames[0].orientation:
        return inst.frames[0].orientation
    return None


def _normal(orientation: tuple[float, ...] | None) -> np.ndarray | None:
    """The slice normal, pointing to the head: row x column points to the feet for feet-first scans."""
    if not orientation:
        return None
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    normal = np.cross(row, col)
    norm = np.linalg.norm(normal)
    if norm <= 1e-6:
        return None
    normal = normal / norm
    return -normal if normal[2] < 0 else normal


def order_slices(
    instances: list[InstanceRef], rules: SelectionRules = DEFAULT_RULES
) -> tuple[tuple[SliceRef, ...], tuple[str, ...]]:
    """Slices sorted inferior to superior, duplicates removed; spacing problems become warnings."""
    normal = _normal(_orientation(instances[0]))
    assert normal is not None  # instances passed _instance_problem
    slices: list[SliceRef] = []
    warnings: list[str] = []
    missing = 0
    for inst in instances:
        if inst.frames:
            for k, fr in enumerate(inst.frames):
                if fr.position is None:
                    missing += 1
                    continue
                z = float(np.dot(fr.position, normal))
                slices.append(SliceRef(inst.path, k, fr.position, z, fr.slope, fr.intercept,
                                       inst.sop_uid, inst.instance_number))
        elif inst.position is None:
            missing += 1
        else:
            z = float(np.dot(inst.position, normal))
            slices.append(SliceRef(inst.path, None, inst.position, z, sop_uid=inst.sop_uid,
                                   instance_number=inst.instance_number))
    if missing:
        warnings.append(f"{missing} image(s) without ImagePositionPatient were left out")
    slices.sort(key=lambda s: (s.z, s.path, s.frame or 0))
    unique = _dedupe(slices)
    if len(unique) < len(slices):
        warnings.append(f"{len(slices) - len(unique)} duplicate slice position(s) removed")
    warnings.extend(_spacing_warnings(unique, instances, normal, rules.max_gap_factor))
    return tuple(unique), tuple(warnings)


def _dedupe(slices: list[SliceRef]) -> list[SliceRef]:
    unique: list[SliceRef] = []
    for s in slices:
        if unique and abs(s.z - unique[-1].z) < POSITION_TOLERANCE_MM:
            continue
        unique.append(s)
    return unique


def _spacing_warnings(
    slices: list[SliceRef], instances: list[InstanceRef], normal: np.ndarray, max_gap_factor: float
) -> list[str]:
    warnings: list[str] = []
    if len(slices) < 3:
        return warnings
    gaps = np.diff([s.z for s in slices])
    median = float(np.median(gaps))
    if gaps.max() > max_gap_factor * median:
        warnings.append(f"gap in slices: {gaps.max():.2f} mm where the median spacing is {median:.2f} mm")
    elif gaps.max() - gaps.min() > 0.1 * median:
        warnings.append(f"uneven slice spacing: {gaps.min():.2f} to {gaps.max():.2f} mm")
    tilt = max(abs(i.gantry_tilt) for i in instances)
    # Positions that drift sideways relative to the normal also betray a tilted gantry.
    steps = np.diff(np.array([s.position for s in slices]), axis=0)
    lengths = np.linalg.norm(steps, axis=1)
    cos = np.abs(steps @ normal) / np.maximum(lengths, 1e-9)
    drift = float(np.degrees(np.arccos(np.clip(cos.min(), -1, 1))))
    if tilt > 0.5 or drift > 1.0:
        warnings.append(f"gantry tilt: {max(tilt, drift):.1f} degrees (slices are not resampled)")
    return warnings
