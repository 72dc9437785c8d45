"""Stage 1: roots -> DICOM instances (header only) and recorded problems with every other file.

Files are recognised by content, not name. Nothing here reads pixel data, so grouping a large archive
costs one small read per file.
"""

from __future__ import annotations

import functools
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from .domain import FileIssue, FrameGeometry, InstanceRef, Status, StudyMeta, Vec3
from .errors import DicomReadError, NotDicomError
from .images import image_instance, is_image_file
from .limits import HEAD_BYTES, as_read, check_inflated_size
from .workers import IN_FLIGHT, IsolatedPool, WorkerLimits

DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
# Files read in the run's own process before header-reading processes start (pooled_examiner), and
# files per message to one of them.
POOL_FROM = 1000
HEADER_CHUNK = 32
# Names that file managers and PACS viewers leave behind: recorded as skipped without reading.
KNOWN_JUNK = frozenset({"thumbs.db", ".ds_store", "desktop.ini"})


@dataclass
class Discovery:
    """What a walk found: usable instances and every file that was not one, with the reason."""

    instances: list[InstanceRef] = field(default_factory=list)
    issues: list[FileIssue] = field(default_factory=list)


class _Shared:
    """One object for each value that files repeat (a study's identifiers, a series' UID, its orientation,
    image type and description...). The index of every header that grouping needs holds one record a
    file: 2.25 kB each as read, 9 GB for an archive of 4 million files; most of a record is its
    neighbours'. Kept for one discovery only."""

    def __init__(self) -> None:
        self._seen: dict[object, object] = {}

    def instance(self, ref: InstanceRef) -> InstanceRef:
        """The record with its repeated values swapped for the shared ones. The record is new (just read or
        unpickled) and nobody else holds it yet, so its frozen fields are set in place: dataclasses.replace
        made the run process's CPU per file half again as large where processes read the headers."""
        for name in SHARED_FIELDS:
            value = getattr(ref, name)
            object.__setattr__(ref, name, self._seen.setdefault(value, value))
        return ref


# InstanceRef fields whose values a study's or series' files repeat.
SHARED_FIELDS = ("study", "series_uid", "sop_class_uid", "modality", "image_type", "orientation", "photometric",
                 "kernel", "series_description", "contrast_agent", "body_part")


def iter_files(roots: Iterable[str | os.PathLike[str]]) -> Iterator[Path]:
    """Every regular file under the roots, each once; follows symlinks but never loops."""
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: set[tuple[int, int]] = set()
    for root in roots:
        root = Path(root)
        if root.is_file():
            yield from _once(root, seen_files)
            continue
        for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen_dirs:
                dirnames[:] = []  # a symlink back into the tree: do not descend again
                continue
            seen_dirs.add((st.st_dev, st.st_ino))
            dirnames.sort()
            for name in sorted(filenames):
                yield from _once(Path(dirpath) / name, seen_files)


def _once(path: Path, seen: set[tuple[int, int]]) -> Iterator[Path]:
    try:
        st = path.stat()
    except OSError:
        return  # dangling symlink
    key = (st.st_dev, st.st_ino)
    if key not in seen:
        seen.add(key)
        yield path


# Who reads the headers: (files, roots) -> what examine() makes of each, in order. By default this
# process, one file after the other; the Ray engine spreads them over its cluster's CPUs.
Examiner = Callable[[Iterable[Path], list[Path]], Iterable["InstanceRef | FileIssue"]]


def discover(
    roots: Iterable[str | os.PathLike[str]],
    progress: Callable[[int], None] | None = None,
    examiner: Examiner | None = None,
) -> Discovery:
    """Header-read every file under the roots."""
    found = Discovery()
    paths = [Path(r) for r in roots]
    files = iter_files(paths)
    seen_all = examiner(files, paths) if examiner else (examine(path, paths) for path in files)
    shared = _Shared()
    for n, seen in enumerate(seen_all, 1):
        if isinstance(seen, FileIssue):
            found.issues.append(seen)
        else:
            found.instances.append(shared.instance(seen))
        if progress:
            progress(n)
    return found


def pooled_examiner(workers: int, limits: WorkerLimits | None = None, pool_from: int = POOL_FROM) -> Examiner:
    """Headers read in `workers` processes (isolated as the decoders are), for a run with many files:
    on the run's own process an archive of 4 million files took over an hour before its first study
    (1.1-1.5 ms a file), which a GPU would then finish in less. The first `pool_from` files are read
    here, so a small run never waits for processes to start. Results come in the walk's order; a file that
    kills its worker, or runs past the time limit, is recorded as failed alone."""

    def examine_all(files: Iterable[Path], roots: list[Path]) -> Iterator[InstanceRef | FileIssue]:
        files = iter(files)
        for path in itertools.islice(files, pool_from):
            yield examine(path, roots)
        if workers < 2:
            yield from (examine(path, roots) for path in files)
            return
        with IsolatedPool(functools.partial(_examine_under, tuple(roots)), _unread, workers, limits,
                          chunk=HEADER_CHUNK, shared_memory=False, role=("header reader", "file")) as pool:
            yield from pool.map(files, 2 * IN_FLIGHT * HEADER_CHUNK * workers)

    return examine_all


def _examine_under(roots: tuple[Path, ...], path: Path) -> InstanceRef | FileIssue:
    return examine(path, roots)


def _unread(path: Path, reason: str) -> FileIssue:
    return FileIssue(str(path), Status.FAILED, f"{path}: its header could not be read: {reason}")


def examine(path: Path, roots: Iterable[Path] = ()) -> InstanceRef | FileIssue:
    """One file, as `run` and `watch` both judge it: an instance, or an issue (skipped: not DICOM;
    failed: DICOM that cannot be read). A PNG, JPEG or TIFF is a plain image (images.py), named by its
    path relative to the root it was found under."""
    try:
        if is_image_file(path):
            return _image(path, roots)
        return read_instance(path)
    except NotDicomError as exc:
        return FileIssue(str(path), Status.SKIPPED, str(exc))
    except DicomReadError as exc:
        return FileIssue(str(path), Status.FAILED, str(exc))


def _image(path: Path, roots: Iterable[Path]) -> InstanceRef:
    try:
        if not stat.S_ISREG(path.stat().st_mode) or path.stat().st_size == 0:
            raise NotDicomError(f"{path}: not a regular, non-empty image file")
    except OSError as exc:
        raise DicomReadError(f"{path}: cannot read file ({exc.strerror})") from exc
    return image_instance(path, relative_source(path, roots))


def relative_source(path: Path, roots: Iterable[Path]) -> str:
    """path relative to the first root it lies under (a root that is the file itself: its name)."""
    for root in roots:
        try:
            rel = path.resolve().relative_to(Path(root).resolve())
        except ValueError:
            continue
        return str(rel) if str(rel) != "." else path.name
    return path.name


def read_instance(path: Path) -> InstanceRef:
    """Parse one file's header into an InstanceRef, or raise NotDicomError / DicomReadError."""
    ds = read_header(path)
    if ds.file_meta.get("MediaStorageSOPClassUID", "") == DICOMDIR_CLASS or "DirectoryRecordSequence" in ds:
        raise NotDicomError(f"{path}: DICOMDIR index, not an image (ignored)")
    study_uid = str(ds.get("StudyInstanceUID", "")).strip()
    series_uid = str(ds.get("SeriesInstanceUID", "")).strip()
    if not study_uid or not series_uid:
        raise DicomReadError(
            f"{path}: truncated or corrupt DICOM header (no StudyInstanceUID or SeriesInstanceUID)"
        )
    return InstanceRef(
        path=str(path),
        study=_study_meta(ds, study_uid),
        series_uid=series_uid,
        sop_uid=str(ds.get("SOPInstanceUID", "")),
        sop_class_uid=str(ds.get("SOPClassUID", ds.file_meta.get("MediaStorageSOPClassUID", ""))),
        modality=str(ds.get("Modality", "")).upper(),
        image_type=tuple(str(v).upper() for v in _multi(ds.get("ImageType", ()))),
        orientation=_floats(ds.get("ImageOrientationPatient"), 6),
        position=_vec3(ds.get("ImagePositionPatient")),
        instance_number=_int(ds.get("InstanceNumber")),
        rows=int(ds.get("Rows", 0) or 0),
        columns=int(ds.get("Columns", 0) or 0),
        samples_per_pixel=int(ds.get("SamplesPerPixel", 1) or 1),
        photometric=str(ds.get("PhotometricInterpretation", "")).upper(),
        has_pixels=any(t in ds for t in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")),
        kernel=" ".join(str(v) for v in _multi(ds.get("ConvolutionKernel", ""))).upper(),
        series_description=str(ds.get("SeriesDescription", "")),
        series_number=_int(ds.get("SeriesNumber")),
        contrast_agent=str(ds.get("ContrastBolusAgent", "")),
        gantry_tilt=float(ds.get("GantryDetectorTilt", 0) or 0),
        frames=_enhanced_frames(ds),
        body_part=str(ds.get("BodyPartExamined", "") or "").strip().upper(),
        slice_thickness=_float(ds.get("SliceThickness")),
        pixel_spacing=max(_floats(ds.get("PixelSpacing"), 2) or (None,)),  # type: ignore[type-var]
        kvp=_float(ds.get("KVP")),
    )


def read_header(path: Path) -> Dataset:
    """Read everything but the pixel values (deferred), recognising DICOM by content."""
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            # Opening a FIFO blocks until someone writes to it; a device can be endless. Never open them.
            raise NotDicomError(f"{path}: not a regular file (FIFO, socket or device); skipped without reading")
        size = st.st_size
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    except OSError as exc:
        raise DicomReadError(f"{path}: cannot read file ({exc.strerror})") from exc
    if size == 0:
        raise NotDicomError(f"{path}: empty file (0 bytes)")
    if path.name.lower() in KNOWN_JUNK:
        raise NotDicomError(f"{path}: {path.name} is not DICOM (ignored)")
    has_preamble = len(head) >= 132 and head[128:132] == b"DICM"
    inflated = check_inflated_size(path, head) if has_preamble else None
    try:
        ds = as_read(pydicom.dcmread(inflated or path, defer_size=4096, force=not has_preamble), inflated)
        ds.get("StudyInstanceUID")  # force parsing of the elements we rely on
        ds.get("SeriesInstanceUID")
    except InvalidDicomError as exc:
        raise NotDicomError(f"{path}: not a DICOM file") from exc
    except Exception as exc:  # pydicom raises many kinds on corrupt input
        if not has_preamble:
            raise NotDicomError(f"{path}: not a DICOM file") from exc
        raise DicomReadError(f"{path}: truncated or corrupt DICOM header ({type(exc).__name__}: {exc})") from exc
    if not has_preamble and "SOPInstanceUID" not in ds and "StudyInstanceUID" not in ds:
        raise NotDicomError(f"{path}: not a DICOM file (no preamble and no DICOM identifiers)")
    return ds


def _study_meta(ds: Dataset, study_uid: str) -> StudyMeta:
    return StudyMeta(
        study_uid=study_uid,
        accession=str(ds.get("AccessionNumber", "") or ""),
        patient_id=str(ds.get("PatientID", "") or ""),
        patient_name=str(ds.get("PatientName", "") or ""),
        study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""),
    )


def _enhanced_frames(ds: Dataset) -> tuple[FrameGeometry, ...]:
    """Per-frame geometry and rescale of an Enhanced CT object, from its functional groups."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return ()
    shared = ds.get("SharedFunctionalGroupsSequence")
    shared_item = shared[0] if shared else Dataset()
    frames = []
    for item in per_frame:
        pos = _from_groups(item, shared_item, "PlanePositionSequence", "ImagePositionPatient")
        ori = _from_groups(item, shared_item, "PlaneOrientationSequence", "ImageOrientationPatient")
        slope = _from_groups(item, shared_item, "PixelValueTransformationSequence", "RescaleSlope")
        icpt = _from_groups(item, shared_item, "PixelValueTransformationSequence", "RescaleIntercept")
        frames.append(
            FrameGeometry(
                position=_vec3(pos),
                orientation=_floats(ori, 6),
                slope=float(slope) if slope is not None else None,
                intercept=float(icpt) if icpt is not None else None,
            )
        )
    return tuple(frames)


def _from_groups(item: Dataset, shared: Dataset, seq: str, attr: str):  # type: ignore[no-untyped-def]
    for source in (item, shared):
        inner = source.get(seq)
        if inner and attr in inner[0]:
            return inner[0].get(attr)
    return None


def _multi(value) -> list:  # type: ignore[no-untyped-def]
    if value is None or value == "":
        return []
    if isinstance(value, (str, bytes)):
        return [value]
    try:
        return list(value)
    except TypeError:
        return [value]


def _floats(value, n: int) -> tuple[float, ...] | None:  # type: ignore[no-untyped-def]
    try:
        vals = tuple(float(v) for v in _multi(value))
    except (TypeError, ValueError):
        return None
    return vals if len(vals) == n else None


def _vec3(value) -> Vec3 | None:  # type: ignore[no-untyped-def]
    vals = _floats(value, 3)
    return (vals[0], vals[1], vals[2]) if vals else None


def _float(value) -> float | None:  # type: ignore[no-untyped-def]
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _int(value) -> int | None:  # type: ignore[no-untyped-def]
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
