"""The phantom generator: anatomy, mimics that are not blood, masks on the blood, and how series are stored."""

from __future__ import annotations

import numpy as np
import pytest

from ichbatch.config import DEFAULT_RULES, SUBTYPES
from ichbatch.discover import discover
from ichbatch.pipeline import select
from ichbatch.pixels import load_hu
from ichbatch.synth import (
    INTERCEPTS,
    TRANSFER_SYNTAXES,
    Encoding,
    can_encode,
    draw_subtypes,
    make_phantom,
    synth_studies,
    write_series,
)


def _head_core(shape: tuple[int, int], fraction: float) -> np.ndarray:
    """A central disc covering `fraction` of the field: inside the head on every slice but the lowest."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < (fraction * shape[0] / 2) ** 2


@pytest.mark.parametrize("subtype", SUBTYPES)
def test_each_subtype_mask_lies_on_blood(subtype):
    """After blur, noise, rotation and shift the mask still covers blood-dense pixels, and only there."""
    ph = make_phantom(np.random.default_rng(5), n_slices=24, size=256, subtypes=(subtype,))
    mask = ph.masks[subtype]
    assert ph.labels() == {"any": 1, **{s: int(s == subtype) for s in SUBTYPES}}
    assert 1 <= mask.any(axis=(1, 2)).sum() < 24  # on some slices, not all
    inside = ph.hu[mask]
    assert 50 < np.median(inside) < 90, np.median(inside)  # acute blood, not brain (~30) or bone


def test_negative_head_has_anatomy_and_mimics_but_no_mask():
    """Skull base with bone and air inside the head, and dense non-blood structures: all without a label."""
    rng = np.random.default_rng(11)
    heads = [make_phantom(rng, n_slices=24, size=128) for _ in range(4)]
    for ph in heads:
        assert ph.masks == {} and ph.labels()["any"] == 0
        core = _head_core(ph.hu.shape[1:], 0.5)
        base = ph.hu[3][core]  # skull base: petrous bone and sinus air within the head
        assert (base > 800).any() and (base < -500).any()
        mid = ph.hu[12][core]  # ventricles (CSF) and brain
        assert (mid < 15).mean() > 0.02 and ((mid > 20) & (mid < 45)).mean() > 0.5
    # Calcified pineal, choroid plexus or falx: dense spots in the supratentorial brain of most heads.
    dense = [bool((ph.hu[10:16][:, _head_core(ph.hu.shape[1:], 0.6)] > 90).any()) for ph in heads]
    assert sum(dense) >= 2


def test_rotation_and_geometry_vary_between_heads():
    rng = np.random.default_rng(3)
    heads = [make_phantom(rng, n_slices=8, size=128) for _ in range(5)]
    thicknesses = {ph.thickness_mm for ph in heads}
    spacings = {round(ph.spacing_mm, 3) for ph in heads}
    assert len(spacings) == 5 and len(thicknesses) >= 2
    # Head outlines differ (size, rotation, shift): the skull masks of two heads are far from equal.
    skulls = [ph.hu[4] > 500 for ph in heads]
    overlap = (skulls[0] & skulls[1]).sum() / max((skulls[0] | skulls[1]).sum(), 1)
    assert overlap < 0.8


def test_several_subtypes_in_one_study_happen():
    rng = np.random.default_rng(0)
    drawn = [draw_subtypes(rng) for _ in range(400)]
    counts = np.bincount([len(d) for d in drawn], minlength=4)
    assert counts[0] > 150 and counts[1] > counts[2] > counts[3] > 0
    assert all(len(set(d)) == len(d) and set(d) <= set(SUBTYPES) for d in drawn)


@pytest.mark.parametrize("transfer_syntax", TRANSFER_SYNTAXES, ids=lambda ts: ts.name)
@pytest.mark.parametrize("intercept", sorted(set(INTERCEPTS)))
def test_every_encoding_reads_back_to_the_same_hu(tmp_path, transfer_syntax, intercept):
    if not can_encode(transfer_syntax):
        pytest.skip(f"no encoder installed for {transfer_syntax.name}")
    ph = make_phantom(np.random.default_rng(1), n_slices=8, size=64, subtypes=("subdural",))
    write_series(ph, tmp_path, study_uid="1.2.3.4", series_uid="1.2.3.4.1", patient_id="P", patient_name="P^Q",
                 accession="A", rng=np.random.default_rng(2), encoding=Encoding(intercept, transfer_syntax))
    (choice,) = select(discover([tmp_path]), DEFAULT_RULES)
    assert len(choice.slices) == 8
    for k, ref in enumerate(choice.slices):  # sorted by position: k is the phantom's slice index
        stored = np.clip(np.rint(ph.hu[k] - intercept), 0 if intercept < 0 else -32768, None)
        expected = stored + intercept
        assert np.array_equal(load_hu(ref).hu, expected), (transfer_syntax.name, intercept, k)


def test_manifest_records_how_each_study_was_stored(tmp_path):
    manifest = synth_studies(tmp_path, 8, seed=4, n_slices=8, size=64)
    studies = manifest["studies"]
    assert {s["n_slices"] for s in studies} == {8}
    assert len({s["transfer_syntax"] for s in studies}) >= 3
    assert {s["rescale_intercept"] for s in studies} <= set(INTERCEPTS)
    assert all(s["slice_thickness_mm"] > 0 and s["pixel_spacing_mm"] > 0 for s in studies)
    choices = select(discover([tmp_path]), DEFAULT_RULES)
    assert sorted(c.study.study_uid for c in choices) == sorted(s["study_uid"] for s in studies)
