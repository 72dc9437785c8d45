"""Stage 3a: decode one slice and convert it to Hounsfield units.

pydicom with the pylibjpeg plugins (CharLS for JPEG-LS) decodes first; SimpleITK (GDCM inside) is the
fallback for what they cannot decode. Every decode is checked for plausibility, because a decoder that
silently returns nonsense (all zeros, wrong signedness) is worse than one that fails.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless, JPEGLSNearLossless

from .config import AIR_HU, HU_MAX, HU_MIN
from .domain import SliceRef
from .errors import DecodeError
from .images import is_image_file, load_image_hu
from .limits import MalformedPixelData, as_read, check_dimensions, check_inflated_size

# Share of pixels allowed outside the plausible range before a decode is distrusted. Scanners write
# out-of-field pixels at -2000 to -4000 HU (treated as air by the clip below), and metal can pass
# 3000 HU on a few pixels; a decode with the wrong signedness or bit depth swings to +-30000.
MAX_IMPLAUSIBLE_FRACTION = 0.05
PLAUSIBLE_LOW, PLAUSIBLE_HIGH = -4100.0, 4100.0


@dataclass(frozen=True)
class HUSlice:
    hu: np.ndarray  # float32, (rows, cols), clipped to [HU_MIN, HU_MAX]
    warnings: tuple[str, ...] = ()


def load_hu(ref: SliceRef) -> HUSlice:
    """Decode ref's pixels and convert to HU, trying the fallback decoder when the first fails."""
    if is_image_file(Path(ref.path)):  # no HU to check: the histogram rules are for CT
        return HUSlice(np.clip(load_image_hu(ref.path), HU_MIN, HU_MAX).astype(np.float32))
    try:
        inflated = check_inflated_size(Path(ref.path))
        ds = as_read(pydicom.dcmread(inflated or ref.path), inflated)
    except Exception as exc:
        raise DecodeError(f"{ref.path}: cannot read file ({type(exc).__name__}: {exc})") from exc
    _check_size(ds, ref)  # malformed data is refused here, never handed to the fallback decoder
    try:
        return _checked(_hu_from_pydicom(ds, ref), ref)
    except MemoryError:
        raise  # the data is too big, not the decoder wrong: the other decoder would need as much
    except Exception as first:  # a decoder failure: try the other decoder before giving up
        try:
            hu = _checked(HUSlice(_hu_from_simpleitk(ref)), ref)
        except Exception as second:
            one, two = _short(first, ref.path), _short(second, ref.path)
            both = f"pydicom and SimpleITK: {one}" if one == two else f"pydicom: {one}; SimpleITK: {two}"
            raise DecodeError(f"{ref.path}: pixel data could not be decoded as CT ({both})") from first
        return HUSlice(hu.hu, hu.warnings + (f"decoded with SimpleITK after pydicom failed: {_short(first, ref.path)}",))


def _check_size(ds: Dataset, ref: SliceRef) -> None:
    """The header's dimensions within the limits, and (uncompressed) backed by enough bytes."""
    def number(name: str, default: int) -> int:
        try:
            return int(ds.get(name, default) or default)
        except (TypeError, ValueError):
            raise MalformedPixelData(f"{ref.path}: ({name}) is not a number") from None

    compressed = ds.file_meta.get("TransferSyntaxUID") is not None and ds.file_meta.TransferSyntaxUID.is_compressed
    data = ds.get("PixelData")
    check_dimensions(ref.path, number("Rows", 0), number("Columns", 0), number("NumberOfFrames", 1),
                     number("SamplesPerPixel", 1), number("BitsAllocated", 16),
                     None if compressed or data is None else len(data))


def _short(exc: BaseException, path: str) -> str:
    text = str(exc).split("\n")[0].removeprefix(f"{path}: ")
    return text if len(text) < 300 else text[:297] + "..."


def _checked(hs: HUSlice, ref: SliceRef) -> HUSlice:
    """hs.hu is this decode's own array: it is clipped in place, not copied (a copy is 1 MB a slice)."""
    hu = hs.hu
    if hu.ndim != 2:
        raise DecodeError(f"{ref.path}: expected one 2-D frame, decoded shape {hu.shape}")
    low, high = float(hu.min()), float(hu.max())
    if high == low:
        raise DecodeError(f"{ref.path}: decoded image is constant ({low:.0f} HU)")
    outside = 0.0 if PLAUSIBLE_LOW <= low and high <= PLAUSIBLE_HIGH else float(
        np.mean((hu < PLAUSIBLE_LOW) | (hu > PLAUSIBLE_HIGH)))
    if outside > MAX_IMPLAUSIBLE_FRACTION:
        raise DecodeError(
            f"{ref.path}: decoded values are implausible for CT ({outside:.0%} of pixels outside "
            f"{PLAUSIBLE_LOW:.0f}..{PLAUSIBLE_HIGH:.0f} HU)"
        )
    problem = histogram_problem(hu)
    if problem:
        raise DecodeError(f"{ref.path}: decoded image does not look like CT in HU: {problem}")
    hu = hu.astype(np.float32, copy=False)
    return HUSlice(np.clip(hu, HU_MIN, HU_MAX, out=hu), hs.warnings)


def histogram_problem(hu: np.ndarray) -> str:
    """What no CT slice in HU looks like, whichever decoder produced it; '' when nothing is wrong.

    A slice through a head in its field of view has air around the head, soft tissue (fat, muscle,
    brain: -200..200 HU) inside it and bone as a thin ring. Measured on the real series in
    ../shared/realdata: tissue 3-62% of pixels, soft tissue 26-95% of the tissue, at most 17% above
    300 HU. A wrong bit depth, a missing or wrong rescale, or a decode of noise breaks one of these.
    """
    n = hu.size
    tissue = np.count_nonzero(hu > -500) / n
    if tissue < MIN_TISSUE_FRACTION:
        return f"all air ({tissue:.1%} of pixels above -500 HU)"
    soft = np.count_nonzero((hu > -200) & (hu < 200)) / n
    if soft / tissue < MIN_SOFT_TISSUE_SHARE:
        return f"no soft tissue ({soft:.1%} of pixels within -200..200 HU)"
    dense = np.count_nonzero(hu > 300) / n
    if dense > MAX_DENSE_FRACTION:
        return f"{dense:.0%} of pixels denser than 300 HU (bone is a thin ring); wrong rescale or bit depth?"
    very_dense = np.count_nonzero(hu > 700) / n if 1 - tissue < MIN_AIR_FRACTION else 0.0
    if very_dense > MAX_DENSE_WITHOUT_AIR:
        return (f"no air, and {very_dense:.0%} of pixels above 700 HU: the rescale intercept looks wrong "
                "(air shows as about 0 HU and brain as about 1000 HU)")
    return ""


MIN_TISSUE_FRACTION = 0.005
MIN_SOFT_TISSUE_SHARE = 0.05
MAX_DENSE_FRACTION = 0.5
MIN_AIR_FRACTION = 0.01
MAX_DENSE_WITHOUT_AIR = 0.3


def _hu_from_pydicom(ds: Dataset, ref: SliceRef) -> HUSlice:
    plugin = _preferred_plugin(ds)
    try:
        ds.pixel_array_options(index=ref.frame, decoding_plugin=plugin)
        stored = np.asarray(ds.pixel_array)
    except MemoryError:
        raise
    except Exception:
        if not plugin:
            raise
        ds.pixel_array_options(index=ref.frame)  # pydicom's own choice before the fallback decoder
        stored = np.asarray(ds.pixel_array)
    if stored.ndim == 3 and ref.frame is None and stored.shape[0] > 1:
        raise DecodeError(f"{ref.path}: {stored.shape[0]} frames but no per-frame positions")
    stored = stored.reshape(stored.shape[-2:]) if stored.ndim == 3 else stored
    return stored_to_hu(stored, ds, ref.slope, ref.intercept)


# The fastest well-kept decoder for a codec where pydicom's default order takes a slower one. JPEG-LS:
# CharLS (pyjpegls) decodes a 512 x 512 16-bit slice in 5 ms, libjpeg (pylibjpeg) in 17 ms.
PREFERRED_PLUGINS: dict[str, str] = {JPEGLSLossless: "pyjpegls", JPEGLSNearLossless: "pyjpegls"}


def _preferred_plugin(ds: Dataset) -> str:
    """The plugin to decode ds with, or '' for pydicom's own order."""
    ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return _installed_preference(str(ts)) if ts in PREFERRED_PLUGINS else ""


@lru_cache(maxsize=None)
def _installed_preference(ts: str) -> str:
    """PREFERRED_PLUGINS' choice when it is installed; looked up once per transfer syntax, not per slice."""
    plugin = PREFERRED_PLUGINS[ts]
    return plugin if plugin in get_decoder(ts).available_plugins else ""


def stored_to_hu(
    stored: np.ndarray, ds: Dataset, slope: float | None = None, intercept: float | None = None
) -> HUSlice:
    """(0028,1053) Rescale Slope and (0028,1052) Rescale Intercept, padding to air, known faults fixed.

    MONOCHROME1 needs no inversion here: the photometric interpretation applies after the modality
    LUT, so HU are the same for MONOCHROME1 and MONOCHROME2.
    """
    warnings: list[str] = []
    slope = float(ds.get("RescaleSlope", 1) or 1) if slope is None else slope
    intercept = float(ds.get("RescaleIntercept", 0) or 0) if intercept is None else intercept
    values = stored.astype(np.float32)
    padding = _padding_mask(stored, ds)
    if _has_12bit_wraparound(ds, intercept):
        # RSNA 2019 data set fault: 12-bit unsigned images labelled with intercept 0 whose negative
        # values wrapped modulo 4096. Undo the wrap and use the intended intercept of -1000.
        values = np.mod(values + 1000.0, 4096.0)
        intercept, slope = -1000.0, 1.0
        warnings.append("12-bit unsigned wrap-around corrected (intercept taken as -1000)")
    hu = values * slope + intercept
    if padding is not None:
        hu[padding] = AIR_HU
    return HUSlice(hu, tuple(warnings))


def _has_12bit_wraparound(ds: Dataset, intercept: float) -> bool:
    return (
        int(ds.get("BitsStored", 16)) == 12
        and int(ds.get("PixelRepresentation", 0)) == 0
        and intercept > -100
    )


def _padding_mask(stored: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """(0028,0120) Pixel Padding Value, with (0028,0121) Pixel Padding Range Limit when present."""
    value = _as_int(ds.get("PixelPaddingValue"), ds)
    if value is None:
        return None
    limit = _as_int(ds.get("PixelPaddingRangeLimit"), ds)
    lo, hi = (value, value) if limit is None else (min(value, limit), max(value, limit))
    return (stored >= lo) & (stored <= hi)


def _as_int(value, ds: Dataset) -> int | None:  # type: ignore[no-untyped-def]
    """US/SS values can arrive as raw bytes when the VR was ambiguous."""
    if value is None:
        return None
    if isinstance(value, bytes):
        fmt = "<h" if int(ds.get("PixelRepresentation", 0)) else "<H"
        return int(struct.unpack(fmt, value[:2])[0])
    return int(value)


def _hu_from_simpleitk(ref: SliceRef) -> np.ndarray:
    """GDCM (through SimpleITK) applies the rescale itself and returns HU."""
    import SimpleITK as sitk

    image = sitk.ReadImage(ref.path)
    arr = sitk.GetArrayFromImage(image).astype(np.float32)
    if arr.ndim == 3:
        arr = arr[ref.frame or 0]
    return arr
