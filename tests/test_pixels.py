"""Decoding and HU: rescale, padding, signedness, the 12-bit wrap fault, codecs, implausible decodes."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.uid import RLELossless

from ichbatch.discover import discover
from ichbatch.domain import SliceRef
from ichbatch.errors import DecodeError
from ichbatch.pixels import load_hu
from ichbatch.synth import ct_slice_dataset

from .conftest import realdata


def _hu_grid() -> np.ndarray:
    hu = np.full((32, 32), -1000.0, np.float32)
    hu[8:24, 8:24] = 40.0
    hu[12:14, 12:14] = 1500.0
    hu[20, 20] = 75.0
    return hu


def _ref(path) -> SliceRef:
    return SliceRef(str(path), None, (0.0, 0.0, 0.0), 0.0)


def test_rescale_gives_known_hu(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0, intercept=-1024)
    ds.save_as(tmp_path / "a.dcm", enforce_file_format=True)
    hu = load_hu(_ref(tmp_path / "a.dcm")).hu
    assert hu[0, 0] == -1000 and hu[10, 10] == 40 and hu[12, 12] == 1500 and hu[20, 20] == 75


def test_missing_rescale_defaults_to_identity_and_signed_storage(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0)
    ds.PixelRepresentation = 1
    ds.PixelData = np.rint(_hu_grid()).astype(np.int16).tobytes()
    del ds.RescaleIntercept, ds.RescaleSlope
    ds.save_as(tmp_path / "s.dcm", enforce_file_format=True)
    hu = load_hu(_ref(tmp_path / "s.dcm")).hu
    assert hu[0, 0] == -1000 and hu[20, 20] == 75


def test_padding_value_and_range_become_air(tmp_path):
    grid = _hu_grid()
    ds = ct_slice_dataset(grid, z=0, intercept=-1024)
    stored = np.frombuffer(ds.PixelData, np.uint16).reshape(32, 32).copy()
    stored[:2, :] = 63536  # padding written far outside the body
    stored[2, :2] = 63500
    ds.PixelData = stored.tobytes()
    ds.PixelPaddingValue = 63536
    ds.PixelPaddingRangeLimit = 63000
    ds.save_as(tmp_path / "p.dcm", enforce_file_format=True)
    hu = load_hu(_ref(tmp_path / "p.dcm")).hu
    assert (hu[:2] == -1024).all() and (hu[2, :2] == -1024).all() and hu[10, 10] == 40


def test_monochrome1_keeps_hu(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0)
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm", enforce_file_format=True)
    hu = load_hu(_ref(tmp_path / "m1.dcm")).hu
    assert hu[10, 10] == 40 and hu[0, 0] == -1000


def test_12bit_unsigned_wraparound_is_corrected(tmp_path):
    """The RSNA 2019 fault: negative HU stored modulo 4096 in 12-bit unsigned words with intercept 0."""
    truth = _hu_grid()
    truth[4, 4] = -500
    ds = ct_slice_dataset(truth, z=0)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.RescaleIntercept = 0
    ds.PixelData = np.mod(np.rint(truth), 4096).astype(np.uint16).tobytes()
    ds.save_as(tmp_path / "w.dcm", enforce_file_format=True)
    result = load_hu(_ref(tmp_path / "w.dcm"))
    assert result.hu[0, 0] == -1000 and result.hu[4, 4] == -500 and result.hu[10, 10] == 40
    assert result.hu[12, 12] == 1500
    assert any("wrap-around" in w for w in result.warnings)


def test_rle_roundtrip_matches_uncompressed(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0)
    ds.compress(RLELossless)
    ds.save_as(tmp_path / "rle.dcm", enforce_file_format=True)
    assert pydicom.dcmread(tmp_path / "rle.dcm").file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(load_hu(_ref(tmp_path / "rle.dcm")).hu, np.clip(_hu_grid(), -1024, 3071))


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"])
def test_jpegls_and_j2k_lossless_roundtrip(tmp_path, syntax):
    ds = ct_slice_dataset(_hu_grid(), z=0)
    try:
        ds.compress(syntax)
    except (RuntimeError, NotImplementedError) as exc:  # encoder plugin not installed
        pytest.skip(f"no encoder for {syntax}: {exc}")
    ds.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    assert np.array_equal(load_hu(_ref(tmp_path / "c.dcm")).hu, np.clip(_hu_grid(), -1024, 3071))


def test_jpeg_ls_is_decoded_by_charls_and_by_pydicoms_other_plugin_when_charls_fails(tmp_path, monkeypatch):
    import jpeg_ls

    ds = ct_slice_dataset(_hu_grid(), z=0)
    ds.compress("1.2.840.10008.1.2.4.80")
    ds.save_as(tmp_path / "ls.dcm", enforce_file_format=True)
    calls = []
    real = jpeg_ls.decode_pixel_data
    monkeypatch.setattr(jpeg_ls, "decode_pixel_data", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert np.array_equal(load_hu(_ref(tmp_path / "ls.dcm")).hu, np.clip(_hu_grid(), -1024, 3071)) and calls

    def broken(*args, **kwargs):
        raise RuntimeError("CharLS cannot decode this")

    monkeypatch.setattr(jpeg_ls, "decode_pixel_data", broken)
    result = load_hu(_ref(tmp_path / "ls.dcm"))
    assert np.array_equal(result.hu, np.clip(_hu_grid(), -1024, 3071))
    assert not result.warnings  # libjpeg decoded it; SimpleITK was not needed


def test_truncated_pixel_data_is_a_clear_decode_error(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0)
    ds.save_as(tmp_path / "t.dcm", enforce_file_format=True)
    data = (tmp_path / "t.dcm").read_bytes()
    (tmp_path / "t.dcm").write_bytes(data[: len(data) - 500])
    assert len(discover([tmp_path]).instances) == 1  # the header is fine
    with pytest.raises(DecodeError, match="t.dcm: pixel data could not be decoded"):
        load_hu(_ref(tmp_path / "t.dcm"))


def test_constant_decode_is_rejected(tmp_path):
    ds = ct_slice_dataset(np.zeros((16, 16), np.float32), z=0)
    ds.save_as(tmp_path / "z.dcm", enforce_file_format=True)
    with pytest.raises(DecodeError, match="constant"):
        load_hu(_ref(tmp_path / "z.dcm"))


# One real CT slice in many transfer syntaxes (cornerstone test images): lossless ones must match the
# explicit-little-endian reference exactly, lossy ones within a small mean error.
LOSSY = {"1.2.840.10008.1.2.4.91": 2, "1.2.840.10008.1.2.4.81": 2, "1.2.840.10008.1.2.4.50": 20,
         "1.2.840.10008.1.2.4.51": 6, "1.2.840.10008.1.2.4.53": 6, "1.2.840.10008.1.2.4.55": 6}
SYNTAXES = ["1.2.840.10008.1.2", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55",
            "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
            "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"]


def _cornerstone(uid: str):
    folder = realdata("cornerstone")
    (path,) = [p for p in folder.glob("CTImage.dcm_*") if p.name.endswith(f"_{uid}.dcm") or p.name.endswith(f"_{uid}")]
    return path


@pytest.mark.parametrize("uid", SYNTAXES)
def test_real_ct_in_every_transfer_syntax_matches_reference(uid):
    ref = load_hu(_ref(_cornerstone("1.2.840.10008.1.2.1"))).hu
    path = _cornerstone(uid)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == uid
    result = load_hu(_ref(path))
    assert result.hu.shape == ref.shape
    assert np.mean(np.abs(result.hu - ref)) <= LOSSY.get(uid, 0)
    if uid in ("1.2.840.10008.1.2.4.53", "1.2.840.10008.1.2.4.55"):  # pydicom has no decoder for these
        assert any("SimpleITK" in w for w in result.warnings)


def test_a_real_deflated_file_is_inflated_once_and_read_as_pydicom_reads_it(monkeypatch):
    import zlib

    from ichbatch.limits import as_read, check_inflated_size

    path = _cornerstone("1.2.840.10008.1.2.1.99")
    own = pydicom.dcmread(path)  # pydicom inflates the whole dataset itself (zlib.decompress)
    inflated = check_inflated_size(path)
    assert inflated is not None and check_inflated_size(_cornerstone("1.2.840.10008.1.2.1")) is None
    ours = as_read(pydicom.dcmread(inflated), inflated)
    assert ours.file_meta == own.file_meta and ours.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1.99"
    assert [(e.tag, e.VR, e.value) for e in ours if e.tag != 0x7FE00010] == \
        [(e.tag, e.VR, e.value) for e in own if e.tag != 0x7FE00010]
    assert np.array_equal(ours.pixel_array, own.pixel_array)

    def second_inflation(*args, **kwargs):
        raise AssertionError("the deflated file was inflated a second time")

    monkeypatch.setattr(zlib, "decompress", second_inflation)  # pydicom's way; the check streams
    reference = load_hu(_ref(_cornerstone("1.2.840.10008.1.2.1"))).hu
    assert np.array_equal(load_hu(_ref(path)).hu, reference)
    (instance,) = discover([path]).instances
    assert instance.sop_uid == own.SOPInstanceUID


@pytest.mark.skipif(shutil.which("dcmcjpeg") is None, reason="dcmtk (dcmcjpeg) not installed")
def test_dcmtk_jpeg_lossless_sv1_roundtrip(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0)
    ds.save_as(tmp_path / "in.dcm", enforce_file_format=True)
    subprocess.run(["dcmcjpeg", "--encode-lossless-sv1", str(tmp_path / "in.dcm"), str(tmp_path / "out.dcm")], check=True)
    assert pydicom.dcmread(tmp_path / "out.dcm").file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    assert np.array_equal(load_hu(_ref(tmp_path / "out.dcm")).hu, np.clip(_hu_grid(), -1024, 3071))


def test_real_j2k_pixelrep_mismatch_decodes_to_plausible_ct():
    hu = load_hu(_ref(realdata("pylibjpeg_data", "JPEG2000Lossless", "J2K_pixelrep_mismatch.dcm"))).hu
    assert hu.shape == (512, 512)
    assert -1100 < np.percentile(hu, 5) < -500 and 0 < np.median(hu[200:300, 200:300]) < 100


def test_real_implausible_decode_is_caught():
    path = realdata("pylibjpeg_data", "JPEGLossless", "JPEGLossless_1s_1f_i_16_16_bad.dcm")
    with pytest.raises(DecodeError, match="implausible|could not be decoded"):
        load_hu(_ref(path))


def test_real_enhanced_ct_gives_one_slice_per_frame():
    path = realdata("pydicom_data", "eCT_Supplemental.dcm")
    (inst,) = discover([path]).instances
    assert len(inst.frames) == pydicom.dcmread(path, stop_before_pixels=True).NumberOfFrames
    from ichbatch.series import order_slices

    slices, _ = order_slices([inst])
    assert [s.frame for s in slices] != [] and all(s.intercept is not None for s in slices)
    hu = load_hu(slices[0]).hu
    assert hu.ndim == 2 and hu.min() < -500  # air around the object: rescale from functional groups


def test_12bit_image_with_normal_intercept_is_left_alone(tmp_path):
    ds = ct_slice_dataset(_hu_grid(), z=0, intercept=-1024)
    ds.BitsStored, ds.HighBit = 12, 11
    ds.save_as(tmp_path / "n.dcm", enforce_file_format=True)
    result = load_hu(_ref(tmp_path / "n.dcm"))
    assert result.hu[0, 0] == -1000 and result.hu[12, 12] == 1500 and not result.warnings


@pytest.mark.parametrize("name", ["CT_small.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_pydicom_bundled_real_ct(name):
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} is not in this pydicom installation")
    hu = load_hu(_ref(path)).hu
    head = pydicom.dcmread(path, stop_before_pixels=True)
    assert hu.shape == (head.Rows, head.Columns)
    assert hu.min() < -500 and 0 < np.median(hu[hu > -200]) < 200  # air around soft tissue
