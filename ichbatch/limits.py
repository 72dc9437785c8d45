"""Ceilings checked before anything is allocated from a size that a file or a card claims.

A header can claim 65535 x 65535 pixels over 32 KiB of data; a deflated file of 3 MB can inflate to
3 GiB. Each limit can be raised with an environment variable for the rare real data that needs it.
"""

from __future__ import annotations

import copy
import io
import os
import zlib
from pathlib import Path

from pydicom.filebase import DicomBytesIO
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from .errors import DecodeError, DicomReadError


def max_pixels_per_frame() -> int:
    """Rows x Columns of one frame (CT is 512 x 512, rarely 1024 x 1024)."""
    return int(os.environ.get("ICHBATCH_MAX_PIXELS_PER_FRAME", 4096 * 4096))


def max_frames() -> int:
    return int(os.environ.get("ICHBATCH_MAX_FRAMES", 5000))


def max_inflated_bytes() -> int:
    return int(os.environ.get("ICHBATCH_MAX_INFLATED_MB", 512)) * (1 << 20)


MAX_INPUT_SIZE = 1024  # a model card's input_size: a 1024 x 1024 x 3 float32 batch of 16 is 200 MB


class MalformedPixelData(DecodeError):
    """The header and the pixel data disagree; no other decoder is tried (it would trust the header)."""


def check_dimensions(path: str, rows: int, columns: int, frames: int, samples: int, bits: int,
                     native_bytes: int | None) -> None:
    """Before decoding: dimensions within the ceilings, and for uncompressed data, bytes that fit them."""
    problem = _dimension_problem(rows, columns, frames, samples, bits, native_bytes)
    if problem:
        raise MalformedPixelData(f"{path}: pixel data could not be decoded: {problem}")


def _dimension_problem(rows: int, columns: int, frames: int, samples: int, bits: int,
                       native_bytes: int | None) -> str:
    if rows <= 0 or columns <= 0:
        return f"image dimensions {rows} x {columns} are not an image"
    if rows * columns > max_pixels_per_frame():
        return (f"image dimensions {rows} x {columns} exceed the limit of {max_pixels_per_frame():,} pixels "
                "(ICHBATCH_MAX_PIXELS_PER_FRAME)")
    if frames > max_frames():
        return f"{frames} frames exceed the limit of {max_frames()} (ICHBATCH_MAX_FRAMES)"
    if native_bytes is None:
        return ""
    needed = rows * columns * frames * samples * max(bits, 8) // 8
    if native_bytes < needed:
        return f"it has {native_bytes:,} bytes, the header's {rows} x {columns} x {frames} image needs {needed:,}"
    if native_bytes >= 2 * needed:
        # 16-bit data labelled 8-bit, or dimensions understated: decoding it would read garbage.
        return (f"it has {native_bytes:,} bytes, twice or more what the header's {rows} x {columns} x {frames} "
                f"image at {bits} bits needs ({needed:,}); the header does not describe this data")
    return ""


HEAD_BYTES = 4096  # the preamble and file meta of any ordinary file fit in these


class Inflated(io.BytesIO):
    """A deflated file inflated, as pydicom reads it; `meta` is the file's own file meta."""

    def __init__(self, data: bytes, meta: FileMetaDataset) -> None:
        super().__init__(data)
        self.meta = meta


def check_inflated_size(path: Path, head: bytes | None = None) -> Inflated | None:
    """A deflated file is inflated in a stream and refused once it passes the ceiling, before pydicom
    would inflate it whole. Within the ceiling it comes back inflated, as a file pydicom reads without
    inflating it again (the same file meta, the transfer syntax explicit VR little endian; as_read puts
    the file's own back): one inflation instead of two, which made a deflated slice cost twice an
    uncompressed one. None for any other file. `head`: the file's first bytes when the caller has them;
    a file whose first HEAD_BYTES do not name the deflated transfer syntax costs nothing more."""
    if head is None:
        with open(path, "rb") as fh:
            head = fh.read(HEAD_BYTES)
    if DeflatedExplicitVRLittleEndian.encode() not in head:
        return None
    try:
        meta = read_file_meta_info(path)
        start = 132 + 12 + int(meta.FileMetaInformationGroupLength)  # preamble, DICM, group length element
    except Exception:
        return None  # no Part 10 file meta: pydicom's own errors will say what is wrong
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return None
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    parts, total, limit = [], 0, max_inflated_bytes()
    with open(path, "rb") as fh:
        preamble = fh.read(128)
        fh.seek(start)
        while chunk := fh.read(1 << 20):
            data = inflater.decompress(chunk, min(1 << 24, limit + 1 - total))
            parts.append(data)
            total += len(data)
            while inflater.unconsumed_tail and total <= limit:
                data = inflater.decompress(inflater.unconsumed_tail, min(1 << 24, limit + 1 - total))
                parts.append(data)
                total += len(data)
            if total > limit:
                raise DicomReadError(f"{path}: deflated data inflates to more than {limit >> 20} MiB "
                                     "(ICHBATCH_MAX_INFLATED_MB); not read")
    plain = copy.deepcopy(meta)
    plain.TransferSyntaxUID = ExplicitVRLittleEndian
    written = DicomBytesIO()
    write_file_meta_info(written, plain, enforce_standard=False)  # its group length recomputed
    return Inflated(b"".join([preamble, b"DICM", written.getvalue(), *parts]), meta)


def as_read(ds: Dataset, inflated: Inflated | None) -> Dataset:
    """ds read from check_inflated_size's stream gets its file's own file meta back."""
    if inflated is not None:
        ds.file_meta = inflated.meta
    return ds
