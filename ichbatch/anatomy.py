"""Head CT phantoms built on real brain anatomy: the MNI ICBM152 2009a grey- and white-matter templates.

The ellipse phantoms of ichbatch.synth have no gyri, sulci, cisterns or skull base, so a model trained
on them learns that anything real is a bleed. Here each subject is the template brain (1 mm, shipped
in ichbatch/data with the MNI notice, see NOTICE) under a random affine (head size, position, pitch
as from gantry tilt or positioning, yaw, roll) and a smooth elastic deformation, with random atrophy;
tissue probabilities become CT numbers drawn per subject around literature values, and what a head
CT has around the brain is synthesised from distances to the brain: extra-axial CSF, a skull with
inner and outer tables and diploe whose thickness varies over the head, scalp with its fat layer,
the headrest and the table. Below the brain's floor the head is filled with the soft tissue of the
face and neck and the skull base is built from landmarks: petrous bones, clivus, mastoid and ethmoid
air cells, sphenoid, maxillary and frontal sinuses, nasal cavity and pharynx, orbits (fat, globes,
bony walls), zygomatic arches, mandibular rami and the atlas. Slices average sub-planes across their
thickness (partial volume; from revision 3 the skull's layers are soft steps across each sub-plane's
own profile, so the partial volume of bone is a continuum, as where the vault runs along the slice);
noise is correlated as after a soft reconstruction kernel; the brain is darkened next to the skull
(beam hardening); some slices are motion-blurred.

Lesions are placed by anatomy, with a mask each: epidural (a lens under the inner table, limited in
extent as sutures limit it), subdural (a crescent along the convexity, or a band beside the falx or on
the tentorium; acute, subacute or chronic density), subarachnoid (blood mixed into the CSF of sulci
near one region of the surface, or of the basal cisterns), intraventricular (layering in the dependent
part of the ventricles) and intraparenchymal (lobar or deep, with a low-density oedema rim and mass
effect: the brain around it is pushed aside, filling the sulci and ventricles next to it and shifting
the falx and pineal).

The falx and the tentorium (a tent from the incisura to the torcula, sloping to the transverse sinuses)
show where CSF lies around them. Normal blood that is not a bleed: arteries in the basal cisterns and
sylvian fissures, the superior sagittal and transverse sinuses (40-65 HU), and calcified carotid
siphons (commoner with atrophy). In 8% of subjects, metal (dental work low in the face, or a clip
near the skull base) with its bright and dark streaks. One study in ten is a bone-kernel
reconstruction (sharper edges, finer and stronger noise; its Convolution Kernel says BONE). A quarter
of subjects are scanned with the gantry tilted 10-25 degrees, so their slices cut the head obliquely.

Not modelled (yet): mass effect of extra-axial bleeds (there blood replaces what was there), the inner
ear and fine skull-base foramina (the skull-base shapes are smooth ellipsoids and tubes, the air-cell
septa a regular grid), the lens, extra-ocular muscles, teeth, cortical veins; a tilted gantry is
modelled by what the slices show, not by the sheared slice positions a tilted scanner writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from .synth import Phantom

TEMPLATE = Path(__file__).parent / "data" / "mni152_brain_1mm.npz"
PAD_MM = 24  # room around the brain for extra-axial CSF, skull and scalp in the distance maps
# Approximate landmarks in template voxels (z up, row anterior -> posterior, column patient right ->
# left, as on an axial CT image), from MNI coordinates: pineal gland, atria of the lateral ventricles.
MNI_ORIGIN = (98.0, 134.0, 72.0)  # voxel (x, y, z) of MNI (0, 0, 0) in the 1 mm template as read
PINEAL_MNI = (0.0, -28.0, 2.0)
ATRIA_MNI = ((-27.0, -40.0, 14.0), (27.0, -40.0, 14.0))


@dataclass(frozen=True)
class Template:
    gm: np.ndarray  # (z, row, col) float32 0..1
    wm: np.ndarray
    outside_mm: np.ndarray  # distance outside the brain mask (0 inside)
    inside_mm: np.ndarray  # depth inside the brain mask (0 outside)
    corner: np.ndarray  # template index (z, y, x) of this array's [0, 0, 0], before reorientation

    @property
    def center(self) -> np.ndarray:
        return (np.array(self.gm.shape) - 1) / 2.0

    def voxel(self, mni: tuple[float, float, float]) -> np.ndarray:
        """(z, row, col) of an MNI (x right, y anterior, z up) coordinate in mm."""
        x, y, z = mni
        k, j, i = z + MNI_ORIGIN[2], y + MNI_ORIGIN[1], x + MNI_ORIGIN[0]  # the template's axes (LPS, x and y flipped)
        k, j, i = k - self.corner[0] + PAD_MM, j - self.corner[1] + PAD_MM, i - self.corner[2] + PAD_MM
        return np.array([k, self.gm.shape[1] - 1 - j, self.gm.shape[2] - 1 - i])

    def mni_z(self, k: np.ndarray) -> np.ndarray:
        """MNI z (mm, up) of voxel coordinates along the first axis: `voxel` inverted for z alone."""
        return k + self.corner[0] - PAD_MM - MNI_ORIGIN[2]

    def mni(self, coords: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Voxel (z, row, col) coordinates -> MNI x (right), y (anterior), z (up) in mm; `voxel` inverted."""
        k, row, col = coords
        y = (self.gm.shape[1] - 1 - row) + self.corner[1] - PAD_MM - MNI_ORIGIN[1]
        x = (self.gm.shape[2] - 1 - col) + self.corner[2] - PAD_MM - MNI_ORIGIN[0]
        return x, y, self.mni_z(k)


@lru_cache(maxsize=1)
def load_template() -> Template:
    """The packaged template, padded and with its distance maps (computed once per process, about 2 s)."""
    from scipy import ndimage

    with np.load(TEMPLATE) as data:
        shape = tuple(int(v) for v in data["shape"])
        brain = np.unpackbits(data["brain"])[: int(np.prod(shape))].reshape(shape).astype(bool)
        gm, wm, corner = data["gm"], data["wm"], data["corner_index_zyx"]
    # Stored as read (index y grows anterior, x grows to the right); reoriented to image rows and columns.
    orient = (slice(None), slice(None, None, -1), slice(None, None, -1))
    pad = ((PAD_MM, PAD_MM),) * 3
    brain = np.pad(brain[orient], pad)
    return Template(
        gm=np.pad(gm[orient].astype(np.float32) / 255.0, pad), wm=np.pad(wm[orient].astype(np.float32) / 255.0, pad),
        outside_mm=ndimage.distance_transform_edt(~brain).astype(np.float32),
        inside_mm=ndimage.distance_transform_edt(brain).astype(np.float32), corner=np.asarray(corner),
    )


@dataclass(frozen=True)
class Subject:
    """One head's random draw: geometry and CT numbers."""

    scale: np.ndarray  # (z, row, col) factors
    angles: np.ndarray  # pitch, yaw, roll in radians
    shift_mm: np.ndarray
    atrophy: float  # 0 young .. 1 marked
    extra_axial_mm: float  # CSF between brain and skull
    skull_mm: float
    scalp_mm: float
    hu: dict[str, float]
    noise_hu: float
    kernel_px: float
    beam_hardening_hu: float
    calcified: tuple[bool, bool, bool]  # pineal, left and right choroid plexus


GANTRY_TILT_SHARE = 0.25  # of subjects scanned with the gantry tilted (the GE head in realdata: 18.5 degrees)
GANTRY_TILT_DEG = (10.0, 25.0)


def draw_subject(rng: np.random.Generator) -> Subject:
    hu = {
        "gm": rng.uniform(35, 45), "wm": rng.uniform(20, 30), "csf": rng.uniform(0, 15),
        "table": rng.uniform(1300, 2000), "diploe": rng.uniform(500, 900), "scalp": rng.uniform(25, 50),
        "fat": rng.uniform(-110, -80), "falx": rng.uniform(50, 80), "calcification": rng.uniform(150, 500),
        "headrest": rng.uniform(-150, 150), "couch": rng.uniform(150, 400),
    }
    atrophy = float(rng.beta(1.3, 3.0))
    return Subject(
        scale=rng.uniform(0.9, 1.1) * rng.uniform(0.96, 1.04, 3), angles=np.radians(rng.normal(0, [8, 4, 3]))
        + _gantry_tilt(rng),
        shift_mm=rng.normal(0, [4, 8, 6]), atrophy=atrophy, extra_axial_mm=rng.uniform(0.8, 2.0) + 3.0 * atrophy,
        skull_mm=rng.uniform(4.5, 8.5), scalp_mm=rng.uniform(4.0, 8.0), hu=hu, noise_hu=rng.uniform(2.5, 6.0),
        kernel_px=rng.uniform(0.6, 1.2), beam_hardening_hu=rng.uniform(3.0, 12.0),
        calcified=(bool(rng.random() < 0.6), bool(rng.random() < 0.5), bool(rng.random() < 0.5)),
    )


def _own_stream(rng: np.random.Generator) -> np.random.Generator:
    """A child stream for a feature added later: spawning draws nothing from rng, so every other draw
    of a seed stays as it was before the feature existed."""
    return rng.spawn(1)[0]


def _gantry_tilt(rng: np.random.Generator) -> np.ndarray:
    """Extra pitch (radians) for the subjects scanned with a tilted gantry: slices cut the head obliquely,
    from the orbits to the occiput."""
    child = _own_stream(rng)
    if child.random() >= GANTRY_TILT_SHARE:
        return np.zeros(3)
    return np.radians([child.choice([-1, 1]) * child.uniform(*GANTRY_TILT_DEG), 0.0, 0.0])


# Revision 2 adds what models trained on revision 1 read as blood on the real GE head in realdata: the
# scanner's wide blur tail and bone glare beside the skull, and the deep veins. Revision 3 adds the
# slice's partial volume of the skull as a continuum (see _soft_layers). A seed draws the same head in
# every revision (the new terms draw from child streams), so the revisions differ by those terms alone.
REVISIONS = (1, 2, 3)


def anatomy_phantom(rng: np.random.Generator, n_slices: int = 24, size: int = 256, subtypes: tuple[str, ...] = (),
                    fov_mm: float | None = None, subject: Subject | None = None, sub_planes: int = 3,
                    revision: int = 1) -> Phantom:
    """One head, skull base to vertex, as HU slices (slice 0 inferior), with the given kinds of bleed."""
    if revision not in REVISIONS:
        raise ValueError(f"revision must be one of {REVISIONS}. Received: {revision!r}")
    t = load_template()
    s = subject or draw_subject(rng)
    fov = fov_mm or float(rng.uniform(210, 250))
    spacing = fov / size
    z_lo, z_hi = -0.42 * t.gm.shape[0] + PAD_MM * 0.5, 0.5 * t.gm.shape[0] - PAD_MM * 0.6  # base .. vertex, mm
    thickness = (z_hi - z_lo) / n_slices
    coords = _template_coords(rng, t, s, n_slices, size, spacing, z_lo, thickness, sub_planes)
    planes = Planes((n_slices * sub_planes, size, size), thickness / sub_planes) if revision >= 3 else None
    samples, lesions = _ct_numbers(rng, t, s, coords, subtypes, deep_veins=revision >= 2, planes=planes)
    hu = samples.reshape(n_slices, sub_planes, size, size).mean(axis=1)
    # A slice shows a bleed where at least half of its thickness holds blood (partial volume).
    masks = {kind: m.reshape(n_slices, sub_planes, size, size).mean(axis=1) >= 0.5 for kind, m in lesions.items()}
    _surroundings(rng, hu, s, size, spacing)
    _metal(_own_stream(rng), hu, spacing)
    bone_kernel = _own_stream(rng)
    sharpen = bone_kernel.uniform(0.6, 1.2) if bone_kernel.random() < BONE_KERNEL_SHARE else 0.0
    if revision >= 2:
        scanner = _own_stream(bone_kernel)  # a child of the last stream: revision 1's draws stay as they were
        hu = _bone_glare(scanner, _psf_tail(scanner, hu, spacing), spacing, thickness)
    hu = _noise(rng, hu, s, sharpen, bone_kernel.uniform(3.0, 5.0))
    _motion(rng, hu)
    return Phantom(hu=hu.astype(np.float32), masks={k: m for k, m in masks.items() if m.any()}, spacing_mm=spacing,
                   thickness_mm=thickness, kernel="BONE" if sharpen else "STANDARD")


def _rotation(angles: np.ndarray) -> np.ndarray:
    pitch, yaw, roll = angles  # about the left-right, up-down and front-back axes
    cx, sx, cy, sy, cz, sz = np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw), np.cos(roll), np.sin(roll)
    about_col = np.array([[cx, -sx, 0], [sx, cx, 0], [0, 0, 1]])  # (z, row) plane
    about_z = np.array([[1, 0, 0], [0, cy, -sy], [0, sy, cy]])  # (row, col) plane
    about_row = np.array([[cz, 0, -sz], [0, 1, 0], [sz, 0, cz]])  # (z, col) plane
    return about_col @ about_z @ about_row


def _template_coords(rng: np.random.Generator, t: Template, s: Subject, n: int, size: int, spacing: float,
                     z_lo: float, thickness: float, sub: int) -> np.ndarray:
    """(3, n*sub*size*size) template voxel coordinates of every output sample."""
    from scipy import ndimage

    offsets = (np.arange(sub) + 0.5) / sub - 0.5
    z = (z_lo + (np.arange(n)[:, None] + 0.5 + offsets[None, :]) * thickness).ravel()
    r = (np.arange(size) - (size - 1) / 2) * spacing
    grid = np.stack(np.meshgrid(z, r, r, indexing="ij")).reshape(3, -1)
    inverse = np.linalg.inv(_rotation(s.angles) * s.scale[None, :])
    coords = inverse @ (grid - s.shift_mm[:, None]) + t.center[:, None]
    # Smooth elastic deformation: a 5x5x5 field of displacements (mm) made smooth by cubic splines on a
    # 33x33x33 grid once, then read linearly at every sample (a cubic read per sample costs 4x more).
    field = ndimage.zoom(rng.normal(0, 2.0, (3, 5, 5, 5)), (1, 33 / 5, 33 / 5, 33 / 5), order=3, mode="nearest")
    unit = coords / (np.array(t.gm.shape)[:, None] - 1) * 32
    for axis in range(3):
        coords[axis] += ndimage.map_coordinates(field[axis], unit, order=1, mode="nearest")
    return coords


@dataclass(frozen=True)
class Planes:
    """How the samples lie: (planes, rows, cols), the planes `step_mm` apart along the slice axis."""

    shape: tuple[int, int, int]
    step_mm: float


def _ct_numbers(rng: np.random.Generator, t: Template, s: Subject, coords: np.ndarray,
                subtypes: tuple[str, ...], deep_veins: bool = False,
                planes: Planes | None = None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    from scipy import ndimage

    def sample(volume: np.ndarray, fill: float, at: np.ndarray = coords) -> np.ndarray:
        return ndimage.map_coordinates(volume, at, order=1, mode="constant", cval=fill)

    # A haematoma pushes the brain around it aside: tissue is read where it was before it moved. The
    # skull and what lies outside it stay, so pushed tissue fills the sulci and CSF next to it.
    mass = _mass(rng, t) if "intraparenchymal" in subtypes else None
    moved = coords if mass is None else mass.displace(coords)
    gm, wm = sample(t.gm, 0.0, moved), sample(t.wm, 0.0, moved)
    outside, inside = sample(t.outside_mm, float(PAD_MM)), sample(t.inside_mm, 0.0)
    # Atrophy: tissue thins at its edges, so sulci and ventricles widen.
    shrink = 0.35 * s.atrophy
    tissue = np.clip((gm + wm - shrink) / (1 - shrink), 0, 1)
    share = np.divide(gm, gm + wm, out=np.full_like(gm, 0.5), where=gm + wm > 1e-3)
    gm, wm = tissue * share, tissue * (1 - share)
    h = s.hu
    intracranial = outside <= s.extra_axial_mm
    csf = np.where(intracranial, 1 - gm - wm, 0.0)
    # With soft layers the skull's edge mixes with what lies under it: CSF, not air.
    hu = np.where(intracranial, gm * h["gm"] + wm * h["wm"] + csf * h["csf"], -1000.0 if planes is None else h["csf"])
    # Beam hardening: the brain next to the skull reads a little low.
    hu -= np.where(intracranial, s.beam_hardening_hu * np.exp(-(inside + s.extra_axial_mm - outside) / 6.0), 0.0)
    _falx_and_calcifications(t, s, moved, hu, csf)  # moved: a midline shift takes the falx and pineal along
    depth = inside + s.extra_axial_mm - outside  # mm in from the inner table of the skull
    vessels = _own_stream(rng)
    _vessels(vessels, t, s, coords, moved, hu, csf, depth, intracranial)
    if deep_veins:
        _deep_veins(_own_stream(vessels), t, coords, moved, hu, intracranial)
    region = Region(coords, gm, wm, csf, inside, depth, intracranial, mass)
    lesions = {kind: LESIONS[kind](rng, t, region) for kind in subtypes}
    for kind in subtypes:  # densities drawn per lesion; blood replaces what was there
        mask, value, rim = lesions[kind]
        hu = np.where(rim, hu - rng.uniform(6, 12), hu)
        hu = np.where(mask, value, hu)
    # Skull: its thickness varies smoothly over the head; tables 1.5-2 mm of cortical bone, diploe between.
    d = outside - s.extra_axial_mm
    skull = s.skull_mm * (1 + 0.25 * np.sin(coords[0] / 23.0 + rng.uniform(0, 6)) * np.cos(coords[2] / 31.0))
    table = np.minimum(1.8, skull / 3)
    bone = (d > 0) & (d <= skull)
    scalp = (d > skull) & (d <= skull + s.scalp_mm)
    if planes is None:
        hu = np.where(bone, np.where((d <= table) | (d > skull - table), h["table"], h["diploe"]), hu)
        hu = np.where(scalp, h["scalp"], hu)
    else:  # the profile's stream comes after the veins' one, so theirs stays as it was
        hu = _soft_layers(d, skull, table, s, hu, _profile_width(_own_stream(vessels), d, planes))
        hu[d > skull + s.scalp_mm] = -1000.0  # the soft step to scalp reached out here too
    fat = scalp & (np.abs(d - skull - 0.4 * s.scalp_mm) < 0.12 * s.scalp_mm)  # subcutaneous fat, thin
    hu = np.where(fat, h["fat"], hu)
    hu = _skull_base(rng, s, coords, hu, bone, d > skull, intracranial)
    _siphons(vessels, t, s, coords, hu)
    return hu, {k: v[0] for k, v in lesions.items()}


# The slice sensitivity profile: each sub-plane stands for a Gaussian of this many times the sub-planes'
# spacing along the slice axis, so together they make a slab with soft edges, as a real slice is.
PROFILE_SD = (0.4, 0.9)


def _profile_width(rng: np.random.Generator, d: np.ndarray, planes: Planes) -> np.ndarray:
    """Per sample, the SD (mm of d) over which the slice's profile spreads a boundary of d: the profile's
    SD times how fast d changes along the slice axis. Where the skull runs nearly parallel to the slice
    (the vertex, the orbital roofs, the skull base under a tilted gantry) that is wide, and the brain there
    holds a few per cent of bone, reading 50-100 HU as on the real GE head in realdata."""
    along = np.gradient(d.reshape(planes.shape), planes.step_mm, axis=0).ravel()
    return np.maximum(np.abs(along) * rng.uniform(*PROFILE_SD) * planes.step_mm, 0.05)


def _soft_layers(d: np.ndarray, skull: np.ndarray, table: np.ndarray, s: Subject, hu: np.ndarray,
                 width: np.ndarray) -> np.ndarray:
    """Inner table, diploe, outer table and scalp outwards along d (mm out from the cranial cavity), each
    boundary a soft step (normal CDF of SD `width`) instead of a cut. The scalp's fat layer and the air
    beyond stay cut, by the caller (soft tissue against soft tissue or air: no mimic of blood, and a soft
    step to air where the distance map ends would leave a faint halo that moves the headrest)."""
    from scipy.special import ndtr

    h = s.hu
    out = hu.copy()
    below: np.ndarray | float = hu  # what lies under the next edge
    for edge, value in ((0.0, h["table"]), (table, h["diploe"]), (skull - table, h["table"]), (skull, h["scalp"])):
        out += (value - below) * ndtr((d - edge) / width)
        below = value
    return out


@dataclass(frozen=True)
class Mass:
    """An intraparenchymal haematoma: an ellipsoid, and how much of its volume pushed tissue aside."""

    centre: np.ndarray  # template voxel (z, row, col)
    axes: np.ndarray  # semi-axes, mm
    push: float  # 0: the blood replaced the tissue; 1: all of the tissue it took up was pushed outwards

    def radius(self, coords: np.ndarray) -> np.ndarray:
        """Radius in units of the ellipsoid: 1 on its surface."""
        return np.sqrt(np.sum(((coords - self.centre[:, None]) / self.axes[:, None]) ** 2, axis=0))

    def displace(self, coords: np.ndarray) -> np.ndarray:
        """Where the tissue now at coords was before: a shell at radius r came from radius (r^3 - push)^(1/3),
        so the volume the blood pushed aside is kept, and the push fades as 1/r^2 with distance."""
        r = np.maximum(self.radius(coords), 1e-6)
        factor = np.where(r > 1, np.cbrt(np.maximum(r**3 - self.push, 0.0)) / r, 1.0)
        return self.centre[:, None] + (coords - self.centre[:, None]) * factor


def _mass(rng: np.random.Generator, t: Template) -> Mass:
    if rng.random() < 0.5:  # deep: basal ganglia and thalamus
        centre = t.voxel((rng.choice([-1, 1]) * rng.uniform(15, 28), rng.uniform(-25, 10), rng.uniform(-2, 12)))
    else:  # lobar: under the cortex
        surface = _pick(rng, _surface_points())
        centre = surface + (t.center - surface) * rng.uniform(0.12, 0.25)
    return Mass(centre, rng.uniform(3, 16) * rng.uniform(0.6, 1.4, 3), float(rng.uniform(0.3, 0.9)))


@dataclass(frozen=True)
class Region:
    """What lesions are placed by, per output sample."""

    coords: np.ndarray  # (3, n) template mm
    gm: np.ndarray
    wm: np.ndarray
    csf: np.ndarray
    inside: np.ndarray  # depth inside the brain mask
    depth: np.ndarray  # depth from the inner table
    intracranial: np.ndarray
    mass: Mass | None = None  # the intraparenchymal haematoma, drawn before the tissue was read

    def distance(self, centre: np.ndarray) -> np.ndarray:
        return np.sqrt(np.sum((self.coords - centre[:, None]) ** 2, axis=0))


Lesion = tuple[np.ndarray, np.ndarray, np.ndarray]  # mask, CT number per sample, oedema rim


@lru_cache(maxsize=1)
def _surface_points() -> np.ndarray:
    """Template voxels just inside the brain's outer surface, above the skull base: where extra-axial and
    subarachnoid bleeds are centred."""
    t = load_template()
    zmin = t.voxel((0.0, 0.0, -20.0))[0]
    pts = np.argwhere((t.inside_mm > 0.5) & (t.inside_mm < 2.0))
    return pts[pts[:, 0] > zmin].astype(np.float32)


def _pick(rng: np.random.Generator, points: np.ndarray) -> np.ndarray:
    return points[rng.integers(len(points))]


def _convexity(rng: np.random.Generator, r: Region, thickest: tuple[float, float], extent: tuple[float, float],
               lens: bool) -> np.ndarray:
    """Blood under the inner table around a surface point: a crescent (thin, wide) or a lens (thick, short)."""
    centre = _pick(rng, _surface_points())
    far = r.distance(centre) / rng.uniform(*extent)
    profile = np.sqrt(np.clip(1 - far**2, 0, 1)) if lens else np.clip(1 - far**4, 0, 1)
    return r.intracranial & (r.depth >= 0) & (r.depth <= rng.uniform(*thickest) * profile)


def _epidural(rng: np.random.Generator, t: Template, r: Region) -> Lesion:
    mask = _convexity(rng, r, (8, 22), (18, 35), lens=True)
    return mask, np.full(mask.shape, rng.uniform(55, 90)), np.zeros_like(mask)


SUBDURAL_SITES = {"convexity": 0.7, "falx": 0.15, "tentorium": 0.15}


def _subdural(rng: np.random.Generator, t: Template, r: Region) -> Lesion:
    site = str(rng.choice(list(SUBDURAL_SITES), p=list(SUBDURAL_SITES.values())))
    if site == "falx":
        mask = _along_falx(rng, t, r)
    elif site == "tentorium":
        mask = _along_tentorium(rng, t, r)
    else:
        mask = _convexity(rng, r, (3, 12), (45, 80), lens=False)
    age = rng.choice(["acute", "subacute", "chronic"], p=[0.7, 0.15, 0.15])
    value = {"acute": (50, 80), "subacute": (30, 45), "chronic": (5, 25)}[str(age)]
    return mask, np.full(mask.shape, rng.uniform(*value)), np.zeros_like(mask)


def _along_falx(rng: np.random.Generator, t: Template, r: Region) -> np.ndarray:
    """A band of blood beside the falx, in the interhemispheric fissure, over part of its length."""
    x, y, z = t.mni(r.coords)
    side = rng.choice([-1, 1])
    width = rng.uniform(2.0, 5.0)
    centre, half = rng.uniform(-60, 30), rng.uniform(20, 45)
    beside = (side * x > FALX_HALF_MM) & (side * x <= FALX_HALF_MM + width)
    return r.intracranial & beside & (np.abs(y - centre) < half) & (z > rng.uniform(5, 25))


def _along_tentorium(rng: np.random.Generator, t: Template, r: Region) -> np.ndarray:
    """A layer of blood on the upper or lower surface of the tentorium, on one side."""
    x, y, z = t.mni(r.coords)
    above = tentorium_height(x, y)
    side, width = rng.choice([-1, 1]), rng.uniform(2.0, 5.0)
    layer = (z - above >= 0) & (z - above <= width) if rng.random() < 0.6 else (above - z >= 0) & (above - z <= width)
    return r.intracranial & layer & (side * x > 3) & _under_tentorium(x, y)


def _subarachnoid(rng: np.random.Generator, t: Template, r: Region) -> Lesion:
    if rng.random() < 0.4:  # basal cisterns, around the midbrain
        centre, radius = t.voxel((0.0, -10.0, -8.0)) + rng.normal(0, 4, 3), rng.uniform(15, 30)
        near = (r.distance(centre) < radius) & (r.csf > 0.35)
    else:  # sulci near one part of the convexity
        centre, radius = _pick(rng, _surface_points()), rng.uniform(20, 45)
        near = (r.distance(centre) < radius) & (r.csf > 0.35) & (r.inside < 12)
    blood = rng.uniform(50, 75)
    # Blood mixes into the CSF it fills: the denser the CSF share, the more blood shows.
    return near & r.intracranial, blood * np.clip(r.csf, 0.5, 1) + 30 * (1 - np.clip(r.csf, 0.5, 1)),         np.zeros_like(near)


def _intraventricular(rng: np.random.Generator, t: Template, r: Region) -> Lesion:
    ventricle = (r.csf > 0.6) & (r.inside > 10) & r.intracranial
    rows = r.coords[1][ventricle]
    if not len(rows):
        return ventricle, np.zeros(ventricle.shape), ventricle
    # Supine: blood settles in the dependent (posterior) part; a level across the ventricle.
    level = np.quantile(rows, rng.uniform(0.55, 0.85))
    side = rng.choice([-1, 0, 1])  # one lateral ventricle or both
    mid = t.voxel((0.0, 0.0, 0.0))[2]
    sided = np.ones_like(ventricle) if side == 0 else (np.sign(r.coords[2] - mid) == side)
    mask = ventricle & (r.coords[1] >= level) & sided
    return mask, np.full(mask.shape, rng.uniform(45, 75)), np.zeros_like(mask)


def _intraparenchymal(rng: np.random.Generator, t: Template, r: Region) -> Lesion:
    assert r.mass is not None, "the haematoma is drawn before the tissue is read"
    shape = r.mass.radius(r.coords)
    mask = (shape <= 1) & r.intracranial & (r.inside > 1)
    rim = (shape > 1) & (shape <= 1 + rng.uniform(0.15, 0.5)) & r.intracranial & (r.inside > 1)
    return mask, np.full(mask.shape, rng.uniform(55, 85)), rim


LESIONS = {"epidural": _epidural, "subdural": _subdural, "subarachnoid": _subarachnoid,
           "intraventricular": _intraventricular, "intraparenchymal": _intraparenchymal}


FALX_HALF_MM = 0.8


def tentorium_height(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """MNI z (mm) of the tentorium over MNI (x, y): a tent whose ridge (the straight sinus) falls from the
    incisura (y -45, z 8) to the torcula (y -95, z -17), sloping down to each side towards the
    transverse sinuses and petrous ridges."""
    return 8.0 + 0.5 * np.minimum(y + 45.0, 0.0) - 0.45 * np.abs(x)


def _under_tentorium(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Where the tentorium spans: behind the petrous ridges, with the incisura left open around the midbrain."""
    return (y < -30) & (y > -105) & (np.abs(x) < 60) & ((y < -50) | (np.abs(x) > 14))


def _falx_and_calcifications(t: Template, s: Subject, coords: np.ndarray, hu: np.ndarray, csf: np.ndarray) -> None:
    """The dura that shows on CT (falx and tentorium, where CSF lies around them) and calcified spots."""
    h = s.hu
    x, y, z = t.mni(coords)
    falx = (np.abs(x) < FALX_HALF_MM) & (csf > 0.5) & (z > 5.0)
    tentorium = (np.abs(z - tentorium_height(x, y)) < FALX_HALF_MM) & (csf > 0.5) & _under_tentorium(x, y)
    hu[falx | tentorium] = h["falx"]
    spots = [(PINEAL_MNI, 2.5)] + [(a, 3.0) for a in ATRIA_MNI]
    for (mni, radius), present in zip(spots, s.calcified):
        if present:
            centre = t.voxel(mni)
            near = np.sum((coords - centre[:, None]) ** 2, axis=0) < radius**2
            hu[near] = h["calcification"]


# Arteries in the basal cisterns and fissures (MNI mm, approximate): basilar, internal carotid termini
# to the middle cerebral arteries in the sylvian fissures, anterior cerebral arteries, posterior
# cerebral arteries around the midbrain. Drawn only where CSF lies, as arteries run through it.
ARTERIES = [((0.0, -18.0, -40.0), (0.0, -12.0, -12.0))] + [
    segment for sx in (-1.0, 1.0) for segment in (
        ((sx * 14, 0.0, -14.0), (sx * 42, 4.0, -6.0)),
        ((sx * 12, 2.0, -12.0), (0.0, 14.0, -8.0)),
        ((0.0, -12.0, -12.0), (sx * 24, -38.0, -4.0)))] + [((0.0, 14.0, -8.0), (0.0, 38.0, 12.0))]


def _vessels(rng: np.random.Generator, t: Template, s: Subject, coords: np.ndarray, moved: np.ndarray,
             hu: np.ndarray, csf: np.ndarray, depth: np.ndarray, intracranial: np.ndarray) -> None:
    """Normal blood that is not a bleed: arteries in the cisterns and the dural venous sinuses (superior
    sagittal and transverse), which read 40-65 HU on a plain CT and are classic mimics of a bleed."""
    radius = rng.uniform(1.0, 1.8)
    # Distances only for the CSF at the arteries' levels: over every sample they took 2 s a study.
    z_of = t.mni_z(moved[0])
    (index,) = np.nonzero((csf > 0.3) & intracranial & (z_of > -45) & (z_of < 15))
    x, y, z = t.mni(moved[:, index])
    near = np.min([_segment(x, y, z, a, b) for a, b in ARTERIES], axis=0) < radius
    hu[index[near]] = rng.uniform(40, 55)
    x, y, z = t.mni(coords)  # the sinuses lie in the dura against the skull: they do not move with the brain
    sagittal = (np.abs(x) < rng.uniform(2.5, 4.0)) & (z > -5) & (y > -100) & (depth < rng.uniform(3, 5))
    transverse = (y < -70) & (np.abs(x) > 12) & (np.abs(z - tentorium_height(x, y)) < 3.5) & (depth < 5)
    hu[(sagittal | transverse) & intracranial & (depth >= 0)] = rng.uniform(45, 65)


# Deep veins (MNI mm, approximate; radius range): the paired internal cerebral veins over the third
# ventricle and the vein of Galen under the splenium move with the brain; the straight sinus runs in the
# tentorium's ridge from the incisura to the torcula (tentorium_height at x = 0) and does not.
DEEP_VEINS = [((sx * 2.5, -6.0, 12.0), (sx * 2.0, -36.0, 10.0), (1.0, 1.5)) for sx in (-1.0, 1.0)] + [
    ((0.0, -36.0, 9.0), (0.0, -47.0, 8.0), (2.5, 3.5))]
STRAIGHT_SINUS = ((0.0, -47.0, 7.5), (0.0, -95.0, -17.0), (2.0, 3.0))


def _deep_veins(rng: np.random.Generator, t: Template, coords: np.ndarray, moved: np.ndarray, hu: np.ndarray,
                intracranial: np.ndarray) -> None:
    """Dense (42-62 HU) normal veins on the posterior midline, where a model that never saw them reads
    intraventricular blood (the GE head in realdata: the vein of Galen)."""
    value = rng.uniform(42, 62)
    for at, segments in ((moved, DEEP_VEINS), (coords, [STRAIGHT_SINUS])):
        # Distances only inside a box around the midline veins: over every sample they would cost seconds.
        z_of = t.mni_z(at[0])
        (index,) = np.nonzero((z_of > -22) & (z_of < 20) & intracranial)
        x, y, z = t.mni(at[:, index])
        box = (np.abs(x) < 8) & (y < 0) & (y > -100)
        index, x, y, z = index[box], x[box], y[box], z[box]
        near = np.zeros(len(index), bool)
        for a, b, radius in segments:
            near |= _segment(x, y, z, a, b) < rng.uniform(*radius)
        near &= hu[index] < 100  # a calcified pineal beside them stays
        hu[index[near]] = value


def _siphons(rng: np.random.Generator, t: Template, s: Subject, coords: np.ndarray, hu: np.ndarray) -> None:
    """Calcified walls of the carotid siphons beside the sella, commoner with age (atrophy stands for it)."""
    if rng.random() > 0.15 + 0.6 * s.atrophy:
        return
    z_of = t.mni_z(coords[0])
    (index,) = np.nonzero((z_of > -40) & (z_of < -10))
    x, y, z = t.mni(coords[:, index])
    value, wall = rng.uniform(150, 600), rng.uniform(1.5, 2.5)
    for sx in (-1.0, 1.0):
        if rng.random() < 0.8:
            d = _segment(x, y, z, (sx * 16, -2.0, -32.0), (sx * 15, 6.0, -20.0))
            patchy = np.sin(z * rng.uniform(0.6, 1.2) + rng.uniform(0, 6)) > 0.2  # plaques, not a full ring
            hu[index[(d < wall) & (d > wall - 0.9) & patchy]] = value


def _surroundings(rng: np.random.Generator, hu: np.ndarray, s: Subject, size: int, spacing: float) -> None:
    """The headrest under the back of the head and the couch below it (rows grow towards posterior)."""
    air = hu < -900
    head = ~air
    rows = np.where(head.any(axis=(0, 2)))[0]
    if not len(rows):
        return
    back = rows.max()
    yy, xx = np.mgrid[0:size, 0:size]
    cx = (size - 1) / 2
    cradle_r = (back - rows.min()) / 2 + rng.uniform(3, 8) / spacing
    cy = back - (back - rows.min()) / 2
    ring = np.abs(np.hypot(yy - cy, xx - cx) - cradle_r) < rng.uniform(3, 6) / spacing
    cradle = ring & (yy > cy + 0.35 * cradle_r) & (np.abs(xx - cx) < 0.8 * cradle_r)
    couch_top = min(size - 2, back + int(rng.uniform(12, 30) / spacing))
    couch = (yy >= couch_top) & (yy < couch_top + max(2, int(rng.uniform(5, 10) / spacing)))
    for k in range(hu.shape[0]):
        sl = hu[k]
        sl[cradle & air[k]] = s.hu["headrest"]
        sl[couch] = s.hu["couch"]


METAL_SHARE = 0.08  # of subjects with metal in the head: dental fillings or an aneurysm clip


def _metal(rng: np.random.Generator, hu: np.ndarray, spacing: float) -> None:
    """Metal and its streaks: bright and dark lines through the metal that fade with distance, as
    filtered back-projection draws them. Dental work low in the face (our lowest slices reach the maxilla,
    not the teeth), or a clip near the skull base."""
    if rng.random() >= METAL_SHARE:
        return
    n, size = hu.shape[0], hu.shape[1]
    dental = rng.random() < 0.5
    levels = [0, 1] if dental else [int(rng.integers(n // 5, n // 2))]
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for k in levels:
        rows, cols = np.nonzero(hu[k] > -500)
        if not len(rows):
            continue
        top, height, mid = rows.min(), np.ptp(rows), cols.mean()
        place = (0.12, 0.2) if dental else (0.3, 0.5)  # rows grow towards posterior: dental work in front
        for _ in range(int(rng.integers(1, 4)) if dental else 1):
            r0 = top + rng.uniform(*place) * height
            c0 = mid + rng.uniform(-0.25, 0.25) * height
            d = np.hypot(yy - r0, xx - c0)
            angle = np.arctan2(yy - r0, xx - c0)
            streaks = np.zeros_like(d)
            for theta in rng.uniform(0, np.pi, int(rng.integers(6, 14))):
                off = np.abs((angle - theta + np.pi / 2) % np.pi - np.pi / 2) * d  # distance from the line, px
                sign = rng.choice([-1.0, 1.0], p=[0.6, 0.4])
                streaks += sign * rng.uniform(150, 600) * np.exp(-((off / rng.uniform(0.7, 1.6)) ** 2))
            fade = np.exp(-d * spacing / rng.uniform(40, 100))
            hu[k] += streaks * fade * (d * spacing > 2)
            hu[k][d * spacing <= rng.uniform(1.5, 3.0)] = 3000.0


# The scanner's point-spread has a faint wide tail beside its sharp core (weight, SD in mm): next to the
# skull the brain reads brighter for a few mm. Measured on the GE head in realdata along the frontal
# midline: 99, 72, 58, 49 HU within 2 mm of the inner table, 38 further in.
PSF_TAIL_WEIGHT, PSF_TAIL_MM = (0.05, 0.25), (1.5, 3.0)
# Glare: scatter spreads a share of the bone's excess over soft tissue far into the head, so brain
# among much bone reads brighter (the GE head's deep brain: 25 HU at the ventricles, 44 HU just below
# the vertex; revision 1's phantoms read 28-32 HU at both).
BONE_GLARE_WEIGHT, BONE_GLARE_MM = (0.04, 0.14), (8.0, 14.0)


def _psf_tail(rng: np.random.Generator, hu: np.ndarray, spacing: float) -> np.ndarray:
    from scipy import ndimage

    weight, sd = rng.uniform(*PSF_TAIL_WEIGHT), rng.uniform(*PSF_TAIL_MM) / spacing
    return (1 - weight) * hu + weight * ndimage.gaussian_filter(hu, sigma=(0, sd, sd))


def _bone_glare(rng: np.random.Generator, hu: np.ndarray, spacing: float, thickness: float) -> np.ndarray:
    """A wide 3-D blur of the bone's excess over 100 HU, added. The blur is smooth, so it is made on a
    grid 4 times coarser in plane and read back linearly, at a sixteenth of the cost."""
    import cv2
    from scipy import ndimage

    weight, mm = rng.uniform(*BONE_GLARE_WEIGHT), rng.uniform(*BONE_GLARE_MM)
    size = hu.shape[1]
    small = max(8, size // 4)
    excess = np.stack([cv2.resize(np.clip(sl - 100.0, 0, None).astype(np.float32), (small, small),
                                  interpolation=cv2.INTER_AREA) for sl in hu])
    step = spacing * size / small
    glare = ndimage.gaussian_filter(excess, sigma=(mm / thickness, mm / step, mm / step), mode="constant")
    return hu + weight * np.stack([cv2.resize(g, (size, size), interpolation=cv2.INTER_LINEAR) for g in glare])


BONE_KERNEL_SHARE = 0.1  # of studies whose only series is a bone-kernel reconstruction


def _noise(rng: np.random.Generator, hu: np.ndarray, s: Subject, sharpen: float = 0.0,
           louder: float = 1.0) -> np.ndarray:
    """Noise with the texture of a soft reconstruction kernel: white noise smoothed, then scaled. A bone
    kernel (sharpen > 0) enhances edges and gives finer, `louder` times stronger noise."""
    from scipy import ndimage

    white = rng.normal(0, 1, hu.shape).astype(np.float32)
    grain = s.kernel_px * (0.5 if sharpen else 1.0)
    textured = ndimage.gaussian_filter(white, sigma=(0, grain, grain))
    textured *= s.noise_hu * (louder if sharpen else 1.0) / max(float(textured.std()), 1e-6)
    smooth = ndimage.gaussian_filter(hu, sigma=(0, 0.5, 0.5))  # the kernel also blurs edges a little
    if sharpen:  # unsharp masking: what a bone kernel does to edges
        smooth = smooth + sharpen * (smooth - ndimage.gaussian_filter(hu, sigma=(0, 1.5, 1.5)))
    return smooth + textured


def _motion(rng: np.random.Generator, hu: np.ndarray) -> None:
    """One study in ten has a few slices blurred along a random direction, as when the head moved."""
    import cv2

    if rng.random() >= 0.1:
        return
    length = int(rng.integers(3, 8))
    line = np.zeros((length, length), np.float32)
    line[length // 2, :] = 1 / length
    rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), float(rng.uniform(0, 180)), 1.0)
    kernel = np.asarray(cv2.warpAffine(line, rotation, (length, length)), np.float32)
    kernel /= max(float(kernel.sum()), 1e-6)
    for k in rng.choice(hu.shape[0], size=min(hu.shape[0], int(rng.integers(1, 4))), replace=False):
        hu[k] = cv2.filter2D(hu[k], -1, kernel, borderType=cv2.BORDER_REPLICATE)


def _ellipsoid(x: np.ndarray, y: np.ndarray, z: np.ndarray, centre: tuple[float, float, float],
               semi: tuple[float, float, float]) -> np.ndarray:
    """Normalised radius: < 1 inside the ellipsoid."""
    return np.sqrt(((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2
                   + ((z - centre[2]) / semi[2]) ** 2)


def _segment(x: np.ndarray, y: np.ndarray, z: np.ndarray, a: tuple[float, float, float],
             b: tuple[float, float, float]) -> np.ndarray:
    """Distance (mm) from each point to the segment a-b."""
    pa = np.stack([x - a[0], y - a[1], z - a[2]])
    ab = np.subtract(b, a, dtype=np.float64)
    along = np.clip(np.tensordot(ab, pa, axes=1) / float(ab @ ab), 0, 1)
    return np.sqrt(np.sum((pa - ab[:, None] * along[None, :]) ** 2, axis=0))


def _septa(x: np.ndarray, y: np.ndarray, z: np.ndarray, cell: float, offset: float) -> np.ndarray:
    """Thin bony walls on a jittered grid: the honeycomb of ethmoid and mastoid air cells."""
    w = 0.22
    return ((np.abs(np.sin(np.pi * (x + offset) / cell)) < w) | (np.abs(np.sin(np.pi * (y - offset) / cell)) < w)
            | (np.abs(np.sin(np.pi * (z + 0.5 * offset) / cell)) < w))


def _skull_base(rng: np.random.Generator, s: Subject, coords: np.ndarray, hu: np.ndarray, bone: np.ndarray,
                beyond: np.ndarray, intracranial: np.ndarray) -> np.ndarray:
    """Below the brain's floor: soft tissue of the face and neck instead of air between the fossae, the
    petrous bones and clivus, mastoid and ethmoid air cells, the sphenoid, maxillary and frontal sinuses,
    the nasal cavity and pharynx, the orbits with their globes and fat, zygomatic arches, mandibular rami
    and the atlas with the dens. Positions are MNI coordinates (approximate, read off the template) under
    the subject's own deformation; sizes and pneumatisation are drawn per subject."""
    h = s.hu
    floor = -8.0 + rng.uniform(-4, 4)  # above this the head is the brain's skull and scalp
    size = rng.uniform(0.93, 1.07)
    # Only samples below the floor and outside the cranial cavity can change: work on those alone.
    t = load_template()
    (index,) = np.nonzero((t.mni_z(coords[0]) < floor + 10) & ~intracranial & (beyond | bone))
    x, y, z = t.mni(coords[:, index])
    below, beyond, bone = z < floor, beyond[index], bone[index]
    part = hu[index]
    radius = _ellipsoid(x, y, z, (0.0, -8.0, -22.0), (72 * size, 98 * size, 68 * size))
    lower = below & (radius < 1) & beyond
    muscle, bone_hu, petrous_hu = rng.uniform(38, 58), h["table"], min(h["table"] + rng.uniform(150, 450), 2600)
    part[lower] = muscle
    part[lower & (radius > 0.935) & (radius < 0.97)] = h["fat"]
    part[lower & (radius >= 0.97)] = h["scalp"]
    solid = lower | bone  # where skull-base structures may replace what is there
    sides = (-1.0, 1.0)

    def put(where: np.ndarray, value: float) -> None:
        part[where & solid] = value

    for sx in sides:  # zygomatic arches and mandibular rami, cortical bone
        put(_segment(x, y, z, (sx * 60, 18, -44), (sx * 62, -18, -46)) < rng.uniform(2.5, 4), bone_hu)
        put(_segment(x, y, z, (sx * 50, -12, -52), (sx * 45, 2, -95)) < rng.uniform(4, 6), bone_hu * 0.8)
    # Orbits: fat cone, bony wall, globe with a denser rim.
    for sx in sides:
        orbit = _ellipsoid(x, y, z, (sx * 30, 42, -36), (16, 18, 15))
        put((orbit >= 1) & (orbit < 1.13) & (y < 54), bone_hu * 0.7)
        put(orbit < 1, h["fat"])
        globe = _ellipsoid(x, y, z, (sx * 31, 54, -36), (11.5, 11.5, 11.5))
        put(globe < 1, 45.0)
        put(globe < 0.88, rng.uniform(5, 15))
    # Air spaces with bony walls: sinuses (pneumatisation varies a lot between people), nasal cavity.
    pneum = rng.uniform(0.7, 1.25, 5)
    sinuses = [((0.0, 15.0, -38.0), (13.0, 10.0, 9.0), pneum[0])]
    sinuses += [((sx * 28, 46.0, -58.0), (13.0, 15.0, 14.0), pneum[1]) for sx in sides]
    for centre, semi, p in sinuses:
        r = _ellipsoid(x, y, z, centre, tuple(v * p for v in semi))
        put((r >= 1) & (r < 1.18), bone_hu * 0.75)
        put(r < 1, -1000.0)
    if rng.random() < 0.85:  # frontal sinus, inside the frontal bone; absent in some people
        r = _ellipsoid(x, y, z, (0.0, 70.0, 8.0), (16 * pneum[2], 6.0, 12 * pneum[2]))
        part[(r < 1) & bone] = -1000.0
    nasal = (np.abs(x) < 14 - 0.1 * np.maximum(-z - 42, 0)) & (y > 30) & (radius < 0.95) & (z > -72) & (z < -40)
    put(nasal, -1000.0)
    put(nasal & (np.abs(x) < 1.2), bone_hu * 0.5)  # septum
    for sx in sides:  # inferior turbinates
        put(_ellipsoid(x, y, z, (sx * 9, 58, -62), (4.0, 24.0, 5.0)) < 1, muscle)
    ethmoid = (np.abs(x) < 11) & (y > 22) & (y < 58) & (z > -48) & (z < -22)
    offset = rng.uniform(0, 5)
    put(ethmoid, -1000.0)
    put(ethmoid & _septa(x, y, z, 6.0, offset), bone_hu * 0.6)
    put(_ellipsoid(x, y, z, (0.0, 14.0, -54.0), (10.0, 9.0, 7.0)) < 1, -1000.0)  # nasopharynx
    put((np.hypot(x / 8.0, (y - 6.0) / 6.0) < 1) & (z < -61), -1000.0)  # oropharynx
    # Petrous bones (the densest of the skull), mastoid air cells behind them, the clivus between.
    for sx in sides:
        mastoid = _ellipsoid(x, y, z, (sx * 51, -36, -46), (10 * pneum[3], 13 * pneum[3], 12 * pneum[3])) < 1
        put(mastoid, -1000.0)
        put(mastoid & _septa(x, y, z, 4.0, offset), bone_hu * 0.6)
        put(_segment(x, y, z, (sx * 16, -9, -40), (sx * 54, -33, -36)) < rng.uniform(6, 8.5), petrous_hu)
    put(_segment(x, y, z, (0, -6, -32), (0, -28, -64)) < rng.uniform(5, 7), bone_hu * 0.8)
    # The atlas around the spinal canal and the dens in front of it, below the foramen magnum.
    ring = np.hypot(x, (y + 42.0) * 0.9)
    put((z < -63) & (z > -74) & (np.abs(ring - 17) < 3), bone_hu * 0.8)
    put((np.hypot(x, y + 25.0) < 5) & (z < -63), bone_hu * 0.8)
    out = hu.copy()
    out[index] = part
    return out
