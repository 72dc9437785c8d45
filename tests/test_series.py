"""Series selection with reasons, and slice order from positions (not names or InstanceNumber)."""

from __future__ import annotations

from pydicom.uid import generate_uid

from ichbatch.discover import discover
from ichbatch.pipeline import select
from ichbatch.config import DEFAULT_RULES

from .conftest import realdata, write_series


def _choices(root):
    return {c.study.study_uid: c for c in select(discover([root]), DEFAULT_RULES)}


def test_soft_kernel_preferred_over_bone_and_scout_rejected(tmp_path, phantom_hu):
    study = generate_uid()
    soft, bone, scout = generate_uid(), generate_uid(), generate_uid()
    write_series(tmp_path / "soft", phantom_hu, study_uid=study, series_uid=soft)
    write_series(tmp_path / "bone", phantom_hu, study_uid=study, series_uid=bone, kernel="BONE",
                 series_description="HEAD BONE")
    paths = write_series(tmp_path / "scout", phantom_hu[:2], study_uid=study, series_uid=scout)
    from pydicom import dcmread

    for p in paths:
        ds = dcmread(p)
        ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
        ds.save_as(p)
    choice = _choices(tmp_path)[study]
    assert choice.series.series_uid == soft
    assert choice.reasons[soft].startswith("chosen: axial CT, 12 slices, soft-tissue kernel")
    assert choice.reasons[bone].startswith("not chosen:") and "bone kernel" in choice.reasons[bone]
    assert choice.reasons[scout] == "rejected: ImageType LOCALIZER (scout or localizer)"


def test_slice_order_from_positions_not_names(tmp_path, phantom_hu):
    study, series = generate_uid(), generate_uid()
    # Names sort in the reverse of anatomical order and InstanceNumber runs backwards too.
    names = [f"IMG{99 - k:03d}" for k in range(len(phantom_hu))]
    write_series(tmp_path, phantom_hu, study_uid=study, series_uid=series, names=names)
    choice = _choices(tmp_path)[study]
    zs = [s.z for s in choice.slices]
    assert zs == sorted(zs) and zs[0] == 0.0 and len(zs) == 12
    assert [s.path.rsplit("/", 1)[1] for s in choice.slices] == names


def test_duplicate_and_gap_are_reported(tmp_path, phantom_hu):
    study, series = generate_uid(), generate_uid()
    paths = write_series(tmp_path, phantom_hu, study_uid=study, series_uid=series)
    import shutil

    shutil.copy(paths[0], tmp_path / "copy_of_first")  # the same slice exported twice
    by_z = sorted(paths, key=lambda p: float(__import__("pydicom").dcmread(p).ImagePositionPatient[2]))
    by_z[5].unlink()  # a missing slice leaves a 10 mm gap in 5 mm spacing
    choice = _choices(tmp_path)[study]
    assert len(choice.slices) == 11
    assert any("duplicate" in w for w in choice.warnings)
    assert any(w.startswith("gap in slices: 10.00 mm") for w in choice.warnings)


def test_mr_only_and_too_few_slices_are_skipped_with_reason(tmp_path, phantom_hu):
    mr_study, short_study = generate_uid(), generate_uid()
    write_series(tmp_path / "mr", phantom_hu, study_uid=mr_study, series_uid=generate_uid(), )
    from pydicom import dcmread

    for p in (tmp_path / "mr").iterdir():
        ds = dcmread(p)
        ds.Modality = "MR"
        ds.save_as(p)
    write_series(tmp_path / "short", phantom_hu[:3], study_uid=short_study, series_uid=generate_uid())
    choices = _choices(tmp_path)
    assert choices[mr_study].series is None and "modality MR, not CT" in choices[mr_study].message
    assert choices[short_study].series is None
    assert "3 axial slice(s), fewer than the minimum of 8" in choices[short_study].message


def test_real_gantry_tilt_series_is_ordered_and_warned():
    folder = realdata("dcm_qa_ct", "GE_HiSpeed_human_head_tilt")
    (choice,) = select(discover([folder]), DEFAULT_RULES)
    assert choice.series is not None and len(choice.slices) == 28
    zs = [s.z for s in choice.slices]
    assert zs == sorted(zs)
    assert any(w.startswith("gantry tilt: 18.5") for w in choice.warnings)
    assert any("spacing" in w or "gap" in w for w in choice.warnings)


def test_real_phantom_study_ignores_scouts_and_dirfiles():
    folder = realdata("dcm_qa_ct", "Philips_Ingenuity_head_phantom")
    found = discover([folder])
    (choice,) = select(found, DEFAULT_RULES)
    assert choice.series is not None
    assert choice.series.instances[0].path.split("/")[-2] == "S2010"
    rejected = [why for uid, why in choice.reasons.items() if why.startswith("rejected")]
    assert rejected and all("LOCALIZER" in why or "fewer than" in why or "SOP class" in why for why in rejected)


def test_real_rgb_captures_labelled_ct_are_not_run():
    folder = realdata("deid_data")
    choices = select(discover([folder]), DEFAULT_RULES)
    assert choices and all(c.series is None for c in choices)
    assert all("not Hounsfield data" in c.message or "not a CT image" in c.message for c in choices)
