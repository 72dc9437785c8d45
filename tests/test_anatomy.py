"""Anatomy phantoms (ichbatch.anatomy): the MNI template brain as head CT, with lesions placed by anatomy.

Each lesion test draws the same subject twice from the same seed, without and with the lesion, so
the lesion's mask can be checked against what was there before (CSF, tissue, the skull next to it).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pydicom
import pytest
from scipy import ndimage

from ichbatch import anatomy
from ichbatch.anatomy import (GANTRY_TILT_DEG, GANTRY_TILT_SHARE, TEMPLATE, anatomy_phantom, draw_subject, load_template,
                              tentorium_height)
from ichbatch.synth import synth_studies, write_series

SIZE, SLICES = 128, 16


def pair(seed: int, kind: str):
    subject = draw_subject(np.random.default_rng(seed + 1000))
    subject = replace(subject, noise_hu=0.5)  # near-noiseless, so the checks read the tissue
    plain = anatomy_phantom(np.random.default_rng(seed), SLICES, SIZE, subject=subject)
    bled = anatomy_phantom(np.random.default_rng(seed), SLICES, SIZE, (kind,), subject=subject)
    return plain, bled


def test_the_template_and_its_notice_are_packaged():
    notice = (TEMPLATE.parent / "NOTICE.mni152").read_text()
    assert "Louis Collins, McConnell Brain Imaging Centre" in notice and "Permission to use, copy" in notice
    t = load_template()
    assert t.gm.max() > 0.9 and t.wm.max() > 0.9 and t.outside_mm.max() > 20


def test_a_normal_head_has_brain_csf_skull_scalp_and_air_in_ct_numbers():
    ph = anatomy_phantom(np.random.default_rng(3), SLICES, SIZE)
    assert ph.hu.shape == (SLICES, SIZE, SIZE) and ph.masks == {} and ph.hu.dtype == np.float32
    mid = ph.hu[SLICES // 2]
    assert np.median(np.concatenate([mid[:6, :6], mid[:6, -6:]])) < -900  # air in the front corners
    bone = mid > 700
    inside = ndimage.binary_fill_holes(bone) & ~ndimage.binary_dilation(bone, iterations=2)
    brain = mid[inside]
    assert 15 < np.median(brain) < 45  # grey and white matter
    # CSF (ventricles, sulci): low CT numbers where the template has neither grey nor white matter; on
    # 10 mm slices partial volume lifts much of it, so the count is of what reads below 18 HU.
    assert (brain < 18).mean() > 0.02
    assert 1000 < mid.max()  # cortical bone of the skull tables
    ring = ndimage.binary_dilation(bone, iterations=4) & ~ndimage.binary_fill_holes(bone)
    assert np.median(mid[ring & (mid > -500)]) < 80  # scalp outside the skull is soft tissue



def test_the_skull_base_has_air_spaces_orbital_fat_and_the_densest_bone():
    """Inferior slices: sinuses, pharynx and mastoid air inside the head, fat around the globes, petrous
    bone denser than the vault's tables; soft tissue, not air, fills the head between the fossae."""
    subject = replace(draw_subject(np.random.default_rng(21)), noise_hu=0.5, angles=np.zeros(3))
    ph = anatomy_phantom(np.random.default_rng(21), SLICES, SIZE, subject=subject)
    base, vault = ph.hu[1:6], ph.hu[-5:]
    head = np.stack([ndimage.binary_fill_holes(ndimage.binary_closing(k > -500, iterations=3)) for k in base])
    inner = head & ~np.stack([ndimage.binary_dilation(~h, iterations=3) for h in head])  # away from the skin
    assert (base[inner] < -500).mean() > 0.01  # air spaces within the head
    assert ((base[inner] > -150) & (base[inner] < -50)).mean() > 0.005  # orbital and facial fat
    assert base.max() > vault.max() + 100  # petrous bone
    soft = (base[inner] > 20) & (base[inner] < 80)
    assert soft.mean() > 0.4  # brain, muscle and other soft tissue fill most of it
    middle = ph.hu[SLICES // 2]
    mid_head = ndimage.binary_fill_holes(middle > 500)
    assert (middle[mid_head] < -500).mean() < 0.001  # no air in the head at the level of the ventricles

def test_heads_differ_between_subjects():
    a = anatomy_phantom(np.random.default_rng(1), SLICES, SIZE)
    b = anatomy_phantom(np.random.default_rng(2), SLICES, SIZE)
    assert abs(float((a.hu > -500).sum()) - float((b.hu > -500).sum())) > 0.01 * (a.hu > -500).sum()


@pytest.mark.parametrize("seed", [5, 6])
def test_intraventricular_blood_lies_in_the_ventricles(seed):
    plain, bled = pair(seed, "intraventricular")
    mask = bled.masks["intraventricular"]
    assert mask.sum() > 10
    # CSF before, blood after: the mask is where at least half the slice thickness holds blood, so the
    # rest of the thickness (CSF, tissue) pulls the slice's number below the blood's own 50-90 HU.
    before, after = np.median(plain.hu[mask]), np.median(bled.hu[mask])
    assert before < 18 and after > 35 and after - before > 18


def test_intraparenchymal_blood_replaces_brain_tissue():
    plain, bled = pair(7, "intraparenchymal")
    mask = bled.masks["intraparenchymal"]
    assert mask.sum() > 10
    assert 15 < np.median(plain.hu[mask]) < 48 and np.median(bled.hu[mask]) > 52


def test_a_haematoma_pushes_tissue_aside_keeping_its_volume_and_less_so_further_away():
    mass = anatomy.Mass(np.zeros(3), np.array([4.0, 8.0, 8.0]), push=0.6)
    points = np.array([[2.0, 0.0, 0.0], [0.0, 16.0, 0.0], [0.0, 80.0, 0.0]]).T  # r = 0.5, 2 and 10
    came_from = mass.displace(points)
    assert np.allclose(came_from[:, 0], points[:, 0])  # inside: blood, nothing moves
    assert np.isclose(mass.radius(came_from[:, 1:2])[0], np.cbrt(2.0**3 - 0.6))  # the shell's volume is kept
    assert 0 < 80.0 - came_from[1, 2] < 0.02 * 8  # far away the push has faded


@pytest.mark.parametrize("seed", [7, 8])
def test_the_brain_around_an_intraparenchymal_haematoma_is_displaced(seed, monkeypatch):
    subject = replace(draw_subject(np.random.default_rng(seed + 1000)), noise_hu=0.5)
    drawn = anatomy._mass
    out = {}
    for push in (0.0, 0.9):  # the same haematoma, replacing tissue or pushing it aside
        monkeypatch.setattr(anatomy, "_mass", lambda rng, t, p=push: replace(drawn(rng, t), push=p))
        out[push] = anatomy_phantom(np.random.default_rng(seed), SLICES, SIZE, ("intraparenchymal",), subject=subject)
    mask = out[0.9].masks["intraparenchymal"]
    assert np.array_equal(mask, out[0.0].masks["intraparenchymal"])
    ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
    far = ~ndimage.binary_dilation(mask, iterations=25)
    replaced, pushed = out[0.0].hu, out[0.9].hu
    brain = (replaced > -5) & (replaced < 60)
    change = np.abs(pushed - replaced)
    assert change[ring & brain].mean() > 3 * change[far & brain].mean()
    assert (pushed[ring & brain] < 15).mean() <= (replaced[ring & brain] < 15).mean()  # CSF next to it is effaced


@pytest.mark.parametrize("kind", ["epidural", "subdural"])
def test_extra_axial_blood_lies_against_the_inner_table(kind):
    plain, bled = pair(8, kind)
    mask = bled.masks[kind]
    assert mask.sum() > 10
    near_bone = ndimage.binary_dilation(plain.hu > 500, iterations=3)
    assert (mask & near_bone).sum() / mask.sum() > 0.3
    # Never in the skull itself. A masked pixel is blood in at least 2 of its 3 sub-planes, so bone in the
    # third can lift its average to about 700 HU where the skull runs across the slice, never above 1000.
    assert not (mask & (plain.hu > 1000)).any()


@pytest.mark.parametrize("site", ["falx", "tentorium"])
def test_subdurals_beside_the_falx_and_on_the_tentorium(site, monkeypatch):
    monkeypatch.setattr(anatomy, "SUBDURAL_SITES", {site: 1.0})
    subject = replace(draw_subject(np.random.default_rng(1021)), noise_hu=0.5, angles=np.zeros(3),
                      shift_mm=np.zeros(3))
    plain = anatomy_phantom(np.random.default_rng(21), 24, SIZE, subject=subject)
    bled = anatomy_phantom(np.random.default_rng(21), 24, SIZE, ("subdural",), subject=subject)
    mask = bled.masks["subdural"]
    assert mask.sum() > 10 and np.median(bled.hu[mask]) > np.median(plain.hu[mask]) + 5
    levels, rows, cols = np.nonzero(mask)
    mm = SIZE / 2 - 0.5, bled.spacing_mm
    if site == "falx":  # a narrow band beside the midline, long from front to back, above the ventricles
        assert np.all(np.abs(cols - mm[0]) * mm[1] < 12) and (rows.max() - rows.min()) * mm[1] > 25
        assert levels.min() >= 24 // 2
    else:  # behind the midbrain and low in the head, sloping: further out to the side, lower down
        assert np.median(rows) > mm[0] and levels.max() < 24 * 0.6
        off = np.abs(cols - mm[0])
        assert np.corrcoef(levels, off)[0, 1] < -0.2


def test_the_tentorium_shows_where_csf_lies_against_it_and_leaves_the_incisura_open():
    t = load_template()
    subject = replace(draw_subject(np.random.default_rng(1)), angles=np.zeros(3))
    points = [(30.0, -70.0, float(tentorium_height(np.float64(30), np.float64(-70)))),  # on the tent
              (30.0, -70.0, float(tentorium_height(np.float64(30), np.float64(-70))) + 5),  # above it
              (8.0, -40.0, float(tentorium_height(np.float64(8), np.float64(-40))))]  # the incisura
    coords = np.stack([t.voxel(p) for p in points], axis=1).astype(np.float64)
    hu = np.zeros(3)
    anatomy._falx_and_calcifications(t, replace(subject, calcified=(False, False, False)), coords, hu, np.ones(3))
    assert hu.tolist() == [subject.hu["falx"], 0.0, 0.0]
    assert tentorium_height(np.float64(0), np.float64(-95)) < tentorium_height(np.float64(0), np.float64(-50))
    assert tentorium_height(np.float64(40), np.float64(-60)) < tentorium_height(np.float64(0), np.float64(-60))


def test_arteries_sinuses_and_calcified_siphons_are_dense_but_not_labelled_blood(monkeypatch):
    subject = replace(draw_subject(np.random.default_rng(1021)), noise_hu=0.5, angles=np.zeros(3), atrophy=0.8)
    with_vessels = anatomy_phantom(np.random.default_rng(21), 24, SIZE, ("subarachnoid",), subject=subject)
    monkeypatch.setattr(anatomy, "_vessels", lambda *args: None)
    monkeypatch.setattr(anatomy, "_siphons", lambda *args: None)
    without = anatomy_phantom(np.random.default_rng(21), 24, SIZE, ("subarachnoid",), subject=subject)
    assert np.array_equal(with_vessels.masks["subarachnoid"], without.masks["subarachnoid"])
    changed = with_vessels.hu != without.hu
    base, top = changed[:12], changed[12:]
    # arteries in the basal cisterns: CSF before, blood-dense after
    arteries = base & (without.hu[:12] < 25) & (with_vessels.hu[:12] > 35) & (with_vessels.hu[:12] < 70)
    assert arteries.sum() > 5
    assert (with_vessels.hu[:12][base] > 150).sum() > 3  # calcified siphon walls
    # the superior sagittal sinus: near the midline of the upper slices
    rows, cols = np.nonzero(top.any(axis=0))
    assert top.sum() > 20 and np.median(np.abs(cols - (SIZE - 1) / 2)) < 10
    assert not (changed & with_vessels.masks["subarachnoid"]).any()  # never where the truth says blood


@pytest.mark.parametrize("seed", [1, 2])
def test_metal_draws_bright_and_dark_streaks_on_its_own_slices_only(seed, monkeypatch):
    monkeypatch.setattr(anatomy, "METAL_SHARE", 1.0)
    metal = anatomy_phantom(np.random.default_rng(seed), SLICES, SIZE)
    monkeypatch.setattr(anatomy, "METAL_SHARE", 0.0)
    plain = anatomy_phantom(np.random.default_rng(seed), SLICES, SIZE)
    touched = np.nonzero((metal.hu != plain.hu).any(axis=(1, 2)))[0]
    assert 1 <= len(touched) <= 2 and touched.max() < SLICES // 2  # low in the head; the rest is unchanged
    k = touched[0]
    diff = metal.hu[k] - plain.hu[k]
    spot = diff >= 0.5 * diff.max()
    assert diff.max() > 800  # the metal itself (3000 HU, blurred by the kernel at this pixel size)
    away = ndimage.binary_dilation(spot, iterations=3) == 0
    assert (diff[away] > 100).sum() > 20 and (diff[away] < -100).sum() > 20  # bright and dark streaks


def test_a_bone_kernel_study_has_sharper_edges_and_stronger_noise_and_says_so(monkeypatch, tmp_path):
    subject = draw_subject(np.random.default_rng(1004))
    monkeypatch.setattr(anatomy, "BONE_KERNEL_SHARE", 1.0)
    bone = anatomy_phantom(np.random.default_rng(4), SLICES, SIZE, subject=subject)
    monkeypatch.setattr(anatomy, "BONE_KERNEL_SHARE", 0.0)
    soft = anatomy_phantom(np.random.default_rng(4), SLICES, SIZE, subject=subject)
    assert (bone.kernel, soft.kernel) == ("BONE", "STANDARD")
    k = SLICES // 2
    brain = ndimage.binary_erosion((soft.hu[k] > 10) & (soft.hu[k] < 50), iterations=2)
    assert np.std(bone.hu[k][brain]) > 2 * np.std(soft.hu[k][brain])  # noise
    edges = [np.abs(np.diff(p.hu[k], axis=1)).max() for p in (bone, soft)]
    assert edges[0] > edges[1]  # the skull's edge overshoots
    (path, *_) = write_series(bone, tmp_path, study_uid="1.2.3", series_uid="1.2.3.4", patient_id="P", patient_name="N",
                              accession="A", rng=np.random.default_rng(0))
    assert pydicom.dcmread(path, stop_before_pixels=True).ConvolutionKernel == "BONE"


def test_a_share_of_subjects_is_scanned_with_the_gantry_tilted_and_other_draws_stay_the_same(monkeypatch):
    def pitches() -> np.ndarray:
        return np.degrees([abs(draw_subject(np.random.default_rng(seed)).angles[0]) for seed in range(400)])

    def draw(seed: int):
        rng = np.random.default_rng(seed)
        return draw_subject(rng), rng.random()

    tilt, steep = pitches(), 15.0
    tilted_seed = int(np.argmax(tilt))
    with_tilt, after = draw(tilted_seed)
    monkeypatch.setattr(anatomy, "GANTRY_TILT_SHARE", 0.0)
    level = pitches()  # positioning alone: pitch SD 8 degrees
    assert (tilt > steep).mean() - (level > steep).mean() > 0.4 * GANTRY_TILT_SHARE and tilt.max() > GANTRY_TILT_DEG[1]
    without, after_without = draw(tilted_seed)
    assert after == after_without and with_tilt.hu == without.hu and with_tilt.skull_mm == without.skull_mm
    assert with_tilt.angles[0] != without.angles[0] and with_tilt.angles[1] == without.angles[1]


def test_subarachnoid_blood_fills_csf_spaces():
    plain, bled = pair(9, "subarachnoid")
    mask = bled.masks["subarachnoid"]
    assert mask.sum() > 10
    assert np.median(plain.hu[mask]) < 25 and np.median(bled.hu[mask]) > np.median(plain.hu[mask]) + 15


def test_synth_writes_anatomy_studies_with_their_truth(tmp_path):
    manifest = synth_studies(tmp_path, 2, seed=4, n_slices=8, size=96, p_positive=1.0, phantoms="anatomy")
    assert manifest["phantoms"] == "anatomy"
    assert all(study["labels"]["any"] == 1 for study in manifest["studies"])
    assert len(list(tmp_path.glob("study_*/**/*.dcm"))) + len(list(tmp_path.glob("study_*/**/[0-9a-f]*"))) >= 16


def revisions(seed: int, pair: tuple[int, int] = (1, 2), **patch):
    """The same head from one seed as two revisions, near-noiseless; patch: anatomy names to replace."""
    subject = replace(draw_subject(np.random.default_rng(seed + 1000)), noise_hu=0.5, angles=np.zeros(3))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in patch.items():
            mp.setattr(anatomy, name, value)
        return [anatomy_phantom(np.random.default_rng(seed), 24, SIZE, ("subdural",), subject=subject, revision=r)
                for r in pair]


def test_revision_2_lifts_the_brain_beside_the_skull_and_among_much_bone_and_keeps_the_head_and_truth():
    one, two = revisions(5, _deep_veins=lambda *args: None)
    assert one.masks.keys() == two.masks.keys() and all(np.array_equal(one.masks[k], two.masks[k]) for k in one.masks)

    def lift(k: int) -> tuple[float, float]:
        """Mean rise of the brain 1-2 px in from the inner table, and of the brain deeper than 12 px."""
        bone = one.hu[k] > 700
        inside = ndimage.binary_fill_holes(bone) & ~bone & (one.hu[k] > 0) & (one.hu[k] < 80)
        depth = ndimage.distance_transform_edt(~bone)
        rise = two.hu[k] - one.hu[k]
        return float(rise[inside & (depth <= 2)].mean()), float(rise[inside & (depth > 12)].mean())

    mid_edge, mid_deep = lift(12)
    top_edge, top_deep = lift(20)
    assert mid_edge > mid_deep + 5  # the blur's tail: a band along the inner table
    assert top_deep > mid_deep + 2  # glare: more bone around the brain near the vertex
    assert 0 < mid_deep < 12


def test_revision_2_draws_the_deep_veins_dense_on_the_posterior_midline_only():
    one, two = revisions(5, _psf_tail=lambda rng, hu, spacing: hu, _bone_glare=lambda rng, hu, spacing, thickness: hu)
    rise = two.hu - one.hu
    veins = rise > 8
    _, rows, cols = np.nonzero(veins)
    assert veins.sum() > 30 and np.abs(cols - (SIZE - 1) / 2).max() < 6  # midline
    assert rows.min() > (SIZE - 1) / 2 - 6  # behind the foramina of Monro (rows grow towards posterior)
    soft = veins & (one.hu < 60)  # away from bone: thin veins in thick slices, partial volume
    assert rise.max() > 15 and 42 < two.hu[soft].max() < 70  # blood-dense at their core, not bone
    assert not (veins & two.masks["subdural"]).any()  # never labelled blood
    assert rise.min() > -60  # a calcified pineal beside them stays (only dura, 50-80 HU, may read lower)


def test_revision_3_spreads_the_skull_over_the_slice_where_the_slice_runs_along_it():
    two, three = revisions(5, (2, 3))
    assert two.masks.keys() == three.masks.keys() and all(np.array_equal(two.masks[k], three.masks[k])
                                                          for k in two.masks)

    def brain(hu: np.ndarray) -> np.ndarray:
        return (hu > 0) & (hu < 45)

    mid = brain(two.hu[12])  # the skull crosses these slices steeply: the brain reads as it did
    assert abs(float((three.hu[12] - two.hu[12])[mid].mean())) < 1
    # The highest slice with brain: the vault runs along it, so its brain holds a few per cent of bone
    # across the slice's thickness and reads brighter than blood, as the real GE head's vertex does
    # (80-120 HU), yet far below bone.
    top = max(k for k in range(24) if brain(two.hu[k]).sum() >= 20)
    patch = brain(two.hu[top])
    assert float((three.hu[top] - two.hu[top])[patch].mean()) > 40
    assert 60 < float(np.median(three.hu[top][patch])) < 300
    assert np.array_equal(two.hu[:, 0, :] < -900, three.hu[:, 0, :] < -900)  # the air in front stays air


def test_an_unknown_revision_is_refused_and_synth_writes_revisions_by_their_names(tmp_path):
    with pytest.raises(ValueError, match="revision must be one of"):
        anatomy_phantom(np.random.default_rng(0), 8, 64, revision=4)
    for kind in ("anatomy-v2", "anatomy-v3"):
        manifest = synth_studies(tmp_path / kind, 1, seed=4, n_slices=8, size=96, phantoms=kind)
        assert manifest["phantoms"] == kind
    with pytest.raises(ValueError, match="ellipse, anatomy, anatomy-v2, anatomy-v3"):
        synth_studies(tmp_path / "x", 1, phantoms="anatomy-v4")
