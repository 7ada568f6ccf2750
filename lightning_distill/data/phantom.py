"""Synthetic abdominal CT phantom at kidney level (the built-in default data).

Every subject is an analytic anatomy: deformed ellipsoids and cylinders in normalised patient
coordinates ``p = (x, y, z) in [-1, 1]^3`` (x: patient right -> left, y: posterior -> anterior,
z: inferior -> superior). Because the anatomy is a function of continuous coordinates, the same
subject can be rendered as a 3D volume at any grid size (the teacher's data) or as a single axial
slice at any in-plane size (the student's data).

What makes it a task in which 3D context matters and 2D is not at ceiling:

* liver and spleen have overlapping intensities in every phase (equal within noise in the venous
  and non-contrast phases), as do muscle, aorta (non-contrast) and the kidneys (non-contrast);
* background contains distractors that look like organs in a single slice: bowel loops and a
  fluid-filled stomach with soft-tissue intensities, gas pockets;
* every organ's cross-section changes along z (ellipsoid poles are small, ambiguous blobs),
  positions, sizes and orientations vary per subject, and a smooth random displacement field
  deforms each subject;
* contrast phase (non-contrast / arterial / venous) changes organ intensities per subject, and the
  single-slice population is non-contrast and noisier by default.

Confusions that one axial slice cannot resolve but the volume can (the test bed of 3D->2D
distillation; the 2D student sees slices at ``slice_z`` in [-0.6, 0.0], where these poles lie):

1. **Spleen lower pole vs descending colon.** The colon (``colon_l``, background) is a tube along z
   beside the spleen, with organ-like intensity; the spleen's lower pole (spleen spans z >= -0.27
   or so) is a small blob next to it. In one slice both are blobs of the same size and intensity;
   in the volume the spleen blob grows into the spleen above and the colon runs on below.
2. **Liver tip vs a liver-intensity nodule below it** (a hepatic-flexure-like pole mimic, and the
   ascending colon ``colon_r``): below the liver's inferior tip (z about -0.45) a short blob with
   the liver's intensity sits where the tip would be. A slice through it is indistinguishable from
   a slice through the tip; in the volume it is separated from the liver by a gap of fat.
3. **Kidney poles vs kidney-intensity nodules beyond them** (adrenal-like above the upper pole,
   bowel-like below the lower pole, for each kidney): same intensity and cross-section as the pole,
   at the kidney's position; the kidneys' z positions vary per subject (and the right one sits
   lower), so the slice level does not tell whether the kidney has ended. In the volume the blob is
   a separate object (a gap of 1.4-2.8 slices of 48) instead of the end of the kidney.
4. **Spleen lower pole vs a spleen-intensity nodule below it** (a splenule-like pole mimic), as 2.

The mimics (:data:`POLE_MIMICS`) are background, present with probability
:data:`MIMIC_PROBABILITY` each per subject, and drawn from their own random stream; their intensity
is the organ's in every phase and modality. The 2D optimum for a small organ-intensity blob at an
organ's position is a guess from priors, whereas a 3D model can follow the blob along z.

Versions (``PhantomSpec.version``, ``data.phantom.version``): ``"0.3"`` is the generator described
above, rendering exactly as it has since lightning_distill 0.3.0 (tests/data/test_phantom_pinned.py).
``"0.5"`` renders the same subjects (the same draws of anatomy, phase, noise and pole mimics: the
same random streams) and adds cues that one axial slice *contains* but that a 2D network learns only
from many examples (issue 31: they make the part of a 3D teacher's knowledge that a 2D model can
reach large enough to measure). Each comes from a random stream of its own, so 0.3 is unchanged:

5. **Parenchymal grain** (stream 8). Liver and kidney parenchyma carry a band-limited grain: a sum of
   :data:`GRAIN_WAVES` plane waves of wavelength :data:`GRAIN_WAVELENGTH` (3.8 pixels of a 64-pixel
   slice) and random direction and phase per subject, SD :data:`GRAIN_SD` before the blur; the
   spleen's parenchyma is smooth. In a slice: the grain is a function of the warped anatomical
   coordinates, so every plane through the organ shows it. Why it takes many examples: per pixel it
   is below the students' noise (20-35 HU), and the organs' mean intensities are equal within noise;
   only over tens of pixels does it show, as a spectral signature against white noise that a network
   has to learn to filter for. The pole mimics carry their organ's grain, so the 3D-only confusions
   above stay 3D-only.
6. **Neighbours** (stream 9). In each slot of :data:`NEIGHBOUR_SLOTS` (two beside the liver, one
   beside the spleen and each kidney), with probability :data:`NEIGHBOUR_PROBABILITY`, a background
   tube along z (bowel-like, centre at the students' slice levels :data:`NEIGHBOUR_Z`) touches the
   organ in the axial plane, on a side where bowel lies next to it, with the organ's level minus
   :data:`NEIGHBOUR_OFFSET` and the *other* texture: smooth next to the liver and the kidneys,
   grained next to the spleen. In a slice it is a blob that continues the organ's outline with
   nearly its intensity; what tells them apart in the plane is the offset (about half the noise SD
   per pixel, clear over the blob's area) and the texture, both in one slice but learnt only from
   many: a 2D model of few subjects merges the blob into the organ or cuts the organ's edge. A 3D
   model sees the same cues (and that the blob is a tube).
7. **Organ displacement** (stream 10). Each solid organ (liver, spleen, kidneys) is moved in the plane
   by N(0, :data:`DISPLACEMENT_SD`) per axis (about 2 pixels of a 64-pixel slice), before the mimics
   and neighbours are placed beside it. In a slice: where an organ lies is what the slice shows. Why
   it takes many examples: a model of few subjects leans on where each organ usually is; the wider the
   spread, the more often that prior fails and the appearance cues (5, 6) have to decide.

Intensities are HU-like; :func:`hu_window` maps them to [0, 1] with an abdominal window.
Everything is deterministic given ``(population seed, subject id)``.

``PhantomSpec(modality="MR")`` renders the same anatomy and label map (same subject draw) as an
MRI-like, T2-weighted-like image in arbitrary units, so CT and MR populations of different seeds
are unpaired people. What differs from CT: another intensity table with another organ ordering and
no contrast phases (the subject's phase is still drawn and reported, but ignored): fluid (stomach,
spinal canal) brightest, spleen clearly brighter than liver, kidney medulla brighter than cortex,
fat bright-intermediate, muscle and psoas dark, the aorta a flow void, cortical bone and gas near
zero, bowel and colon intermediate with per-subject and per-loop spread; a smooth multiplicative
bias field per subject (roughly +-20-35 % over the field of view), and Rician noise (magnitude of
signal plus complex Gaussian noise, the subject's ``noise_hu`` draw times :data:`MR_NOISE_PER_HU`).
MR images have no fixed scale: sources normalise them per image (0.5 and 99.5 percentiles to 0
and 1) instead of a window.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

from lightning_distill.data.phantom_tables import (HU_LEVELS, MODALITIES, MR_BOWEL_LOOP_SD, MR_LEVELS, MR_NOISE_PER_HU,
                                                   MR_TEXTURE, VERSIONS)

CLASS_NAMES: Tuple[str, ...] = (
    "background",
    "body_wall",
    "muscle",
    "liver",
    "spleen",
    "right_kidney",
    "left_kidney",
    "aorta",
    "vertebra",
)
PHASES: Tuple[str, ...] = ("noncontrast", "arterial", "venous")



@dataclass
class PhantomSpec:
    """Population-level settings of the phantom (one population = one set of subjects).

    Args:
        seed: population seed; subjects of different seeds are different people (unpaired).
        phases: contrast phases drawn uniformly per subject.
        noise_hu: (min, max) of the per-subject Gaussian noise standard deviation in HU.
        blur: Gaussian point-spread sigma in voxels applied before the noise.
        slice_z: (min, max) of the axial position (normalised z) of a single slice; the default is
            kidney level, like the L1-level single-slice cohorts the method targets.
        modality: ``CT`` (HU) or ``MR`` (MRI-like, T2-weighted-like, arbitrary units; see the
            module docstring). The anatomy and labels of a subject do not depend on it.
        version: the generator (:data:`VERSIONS`): ``"0.3"`` renders exactly as it did since
            lightning_distill 0.3.0 (pinned by tests/data/test_phantom_pinned.py); ``"0.5"`` adds the
            learnable single-slice cues of the module docstring.
    """

    seed: int = 0
    phases: Tuple[str, ...] = PHASES
    noise_hu: Tuple[float, float] = (10.0, 25.0)
    blur: float = 0.6
    slice_z: Tuple[float, float] = (-0.6, 0.0)
    modality: str = "CT"
    version: str = "0.3"

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise ValueError(f"phantom modality must be one of {', '.join(MODALITIES)}, got {self.modality!r}")
        if self.version not in VERSIONS:
            raise ValueError(f"phantom version must be one of {', '.join(VERSIONS)}, got {self.version!r}")


@dataclass
class _Ellipsoid:
    center: np.ndarray  # (3,)
    axes: np.ndarray  # (3,) semi-axes
    angle: float  # in-plane rotation (radians)
    tilt: np.ndarray = field(default_factory=lambda: np.zeros(2))  # centre drift dx/dz, dy/dz

    def axis_at(self, z):
        """``(cx, cy)``: the in-plane centre at height ``z`` (the centre drifts with ``tilt``)."""
        return self.center[0] + self.tilt[0] * (z - self.center[2]), self.center[1] + self.tilt[1] * (z - self.center[2])

    def inside(self, x: np.ndarray, y: np.ndarray, z: np.ndarray, scale: float = 1.0) -> np.ndarray:
        cx, cy = self.axis_at(z)
        dx, dy, dz = x - cx, y - cy, z - self.center[2]
        c, s = np.cos(self.angle), np.sin(self.angle)
        u, v = c * dx + s * dy, -s * dx + c * dy
        a = self.axes * scale
        return (u / a[0]) ** 2 + (v / a[1]) ** 2 + (dz / a[2]) ** 2 <= 1.0


@dataclass
class Subject:
    """All random parameters of one phantom subject."""

    subject_id: int
    phase: str
    noise_hu: float
    slice_z: float
    body: Tuple[float, float]
    fat: float
    muscle: float
    organs: Dict[str, _Ellipsoid]
    bowel: List[_Ellipsoid]
    gas: List[_Ellipsoid]
    warp: np.ndarray  # (M, 3 + 3 + 1 + 1): direction(3), amplitude per axis(3), frequency, phase
    texture: np.ndarray  # (T, 5): direction(3), frequency, phase
    intensity_jitter: Dict[str, float]
    mimics: List[Tuple[str, _Ellipsoid]] = field(default_factory=list)  # (organ whose intensity it has, shape)
    # version 0.5 only (None / empty in 0.3): the parenchymal grain field and the organs' neighbours
    grain: Optional[np.ndarray] = None  # (GRAIN_WAVES, 4): direction(3), phase
    neighbours: List[Tuple[str, _Ellipsoid, float]] = field(default_factory=list)  # (organ, shape, level offset)


def _rng(spec: PhantomSpec, subject_id: int, stream: int = 0) -> np.random.Generator:
    return np.random.default_rng([int(spec.seed), int(subject_id), int(stream)])


def sample_subject(spec: PhantomSpec, subject_id: int) -> Subject:
    """Draw the anatomy, contrast phase and noise level of one subject (deterministic)."""
    r = _rng(spec, subject_id)
    u = r.uniform

    def ell(center, axes, angle_sd=0.2, jitter=0.05, size_sd=0.12, tilt_sd=0.1) -> _Ellipsoid:
        c = np.asarray(center, float) + r.normal(0, jitter, 3)
        a = np.asarray(axes, float) * np.exp(r.normal(0, size_sd, 3))
        return _Ellipsoid(c, a, float(r.normal(0, angle_sd)), r.normal(0, tilt_sd, 2))

    bx, by = 0.86 * np.exp(r.normal(0, 0.05)), 0.66 * np.exp(r.normal(0, 0.06))
    kidney_z = u(-0.42, -0.22)
    organs = {
        "liver": ell([-0.38, 0.08, 0.35], [0.42, 0.42, 0.8], jitter=0.04),
        "spleen": ell([0.50, -0.12, 0.15], [0.16, 0.24, 0.42], jitter=0.05),
        # the right kidney sits lower than the left (as in most people)
        "right_kidney": ell([-0.33, -0.30, kidney_z - u(0.02, 0.12)], [0.11, 0.14, 0.22], jitter=0.03),
        "left_kidney": ell([0.33, -0.30, kidney_z + u(0.0, 0.06)], [0.11, 0.14, 0.22], jitter=0.03),
        "aorta": ell([0.08, -0.25, 0.0], [0.065, 0.065, 5.0], angle_sd=0.0, jitter=0.02, size_sd=0.1),
        "vertebra": ell([0.0, -0.47, 0.0], [0.13, 0.11, 5.0], angle_sd=0.0, jitter=0.015, size_sd=0.06,
                        tilt_sd=0.02),
        "stomach": ell([0.25, 0.30, 0.45], [0.22, 0.16, 0.3], jitter=0.08),
        # ascending / descending colon: tubes along z beside the liver tip and the spleen, with
        # organ-like (stool) intensity; in one slice a colon cross-section looks like an organ tip
        "colon_r": ell([-0.58, 0.02, 0.0], [0.11, 0.10, 5.0], angle_sd=0.5, jitter=0.06, size_sd=0.15, tilt_sd=0.25),
        "colon_l": ell([0.60, 0.0, 0.0], [0.10, 0.10, 5.0], angle_sd=0.5, jitter=0.06, size_sd=0.15, tilt_sd=0.25),
        "psoas_r": ell([-0.16, -0.40, -1.1], [0.07, 0.07, 1.0], jitter=0.02),
        "psoas_l": ell([0.16, -0.40, -1.1], [0.07, 0.07, 1.0], jitter=0.02),
    }
    n_bowel = int(r.integers(5, 10))
    bowel = [
        ell([u(-0.35, 0.45), u(-0.05, 0.45), u(-1.0, 0.1)], [0.09, 0.07, u(0.1, 0.5)], angle_sd=1.0,
            jitter=0.0, size_sd=0.25, tilt_sd=0.4)
        for _ in range(n_bowel)
    ]
    gas = [
        ell([u(-0.3, 0.4), u(0.0, 0.4), u(-1.0, 0.3)], [0.04, 0.03, 0.05], angle_sd=1.0, jitter=0.0,
            size_sd=0.3)
        for _ in range(int(r.integers(2, 6)))
    ]
    m = 4
    dirs = r.normal(size=(m, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    warp = np.concatenate(
        [dirs, r.normal(0, 0.035, (m, 3)), u(1.5, 4.0, (m, 1)), u(0, 2 * np.pi, (m, 1))], axis=1
    )
    tdirs = r.normal(size=(3, 3))
    tdirs /= np.linalg.norm(tdirs, axis=1, keepdims=True)
    texture = np.concatenate([tdirs, u(4, 9, (3, 1)), u(0, 2 * np.pi, (3, 1))], axis=1)
    if spec.version != "0.3":
        _displace(spec, subject_id, organs)
    lo, hi = spec.slice_z
    return Subject(
        subject_id=int(subject_id),
        phase=str(spec.phases[int(r.integers(len(spec.phases)))]),
        noise_hu=float(u(*spec.noise_hu)),
        slice_z=float(u(lo, hi)),
        body=(float(bx), float(by)),
        fat=float(u(0.07, 0.17)),
        muscle=float(u(0.05, 0.08)),
        organs=organs,
        bowel=bowel,
        gas=gas,
        warp=warp,
        texture=texture,
        intensity_jitter={k: float(r.normal(0, 8)) for k in HU_LEVELS},
        mimics=_pole_mimics(spec, subject_id, organs),
        grain=_grain(spec, subject_id) if spec.version != "0.3" else None,
        neighbours=_neighbours(spec, subject_id, organs) if spec.version != "0.3" else [],
    )


# Pole mimics (see the module docstring): (organ, end) with end -1 beyond the inferior pole, +1 beyond
# the superior pole; each is present with probability MIMIC_PROBABILITY per subject.
POLE_MIMICS: Tuple[Tuple[str, int], ...] = (
    ("liver", -1), ("spleen", -1),
    ("right_kidney", 1), ("right_kidney", -1), ("left_kidney", 1), ("left_kidney", -1),
)
MIMIC_PROBABILITY = 0.6
MIMIC_GAP = (0.06, 0.12)  # normalised z between the organ's pole and the mimic (1.4-2.8 slices of 48)
MIMIC_HALF_LENGTH = (0.06, 0.12)  # the mimic's semi-axis along z
MIMIC_WIDTH = (0.35, 0.65)  # the mimic's in-plane semi-axes relative to the organ's
# the intensity key of each organ (its pole mimics and, in 0.5, its neighbours take that level)
_ORGAN_LEVEL = {"liver": "liver", "spleen": "spleen", "right_kidney": "kidney_cortex", "left_kidney": "kidney_cortex"}


def _pole_mimics(spec: PhantomSpec, subject_id: int, organs: Dict[str, "_Ellipsoid"]) -> List[Tuple[str, "_Ellipsoid"]]:
    """Draw the subject's pole mimics (random stream 7, so the rest of the anatomy does not depend on them)."""
    r = _rng(spec, subject_id, 7)
    out = []
    for organ, end in POLE_MIMICS:
        present = r.uniform() < MIMIC_PROBABILITY
        gap, half, width = r.uniform(*MIMIC_GAP), r.uniform(*MIMIC_HALF_LENGTH), r.uniform(*MIMIC_WIDTH, 2)
        jitter, angle = r.normal(0, 0.015, 2), r.normal(0, 0.2)
        if not present:
            continue
        o = organs[organ]
        pole = o.center[2] + end * o.axes[2]
        cx, cy = np.add(o.axis_at(pole), jitter)
        shape = _Ellipsoid(np.array([cx, cy, pole + end * (gap + half)]),
                           np.array([o.axes[0] * width[0], o.axes[1] * width[1], half]), o.angle + float(angle))
        out.append((organ, shape))
    return out


# Version 0.5's learnable single-slice cues (see the module docstring), each from its own random stream
# (8: grain, 9: neighbours), so the anatomy, noise and mimics of a subject are those of version 0.3.
GRAIN_WAVELENGTH = 0.12  # normalised units: 3.8 pixels of a 64-pixel slice, 2.8 slices of a 48-slice volume
GRAIN_WAVES = 16  # plane waves of random direction and phase summed into the grain field
GRAIN_SD = 40.0  # standard deviation of the grain field before blur (HU; MR: a.u., whose noise is 1 a.u./HU)
GRAINED = ("liver", "right_kidney", "left_kidney")  # organs whose parenchyma has the grain; the spleen's is smooth
NEIGHBOUR_PROBABILITY = 0.8  # per organ and subject
NEIGHBOUR_OFFSET = (12.0, 20.0)  # a neighbour's level is its organ's minus this (HU; MR: a.u.)
NEIGHBOUR_Z = (-0.5, -0.1)  # centre (normalised z) of the neighbour's tube: the students' slice levels
NEIGHBOUR_HALF_LENGTH = (0.25, 0.5)
# Neighbour slots: (organ, in-plane direction range in radians from +x (patient left; +y anterior) in which
# the neighbour touches the organ, its in-plane semi-axes relative to the organ's (the liver's: absolute,
# normalised units)). The liver has two: medial and anterior.
NEIGHBOUR_SLOTS: Tuple[Tuple[str, Tuple[float, float], Tuple[float, float]], ...] = (
    ("liver", (0.0, 0.9), (0.08, 0.14)), ("liver", (1.3, 2.1), (0.08, 0.14)), ("spleen", (1.6, 3.2), (0.6, 1.0)),
    ("right_kidney", (1.0, 2.6), (0.55, 0.9)), ("left_kidney", (0.5, 2.1), (0.55, 0.9)),
)


DISPLACEMENT_SD = 0.06  # extra in-plane displacement of each solid organ per subject (normalised units)
DISPLACED = ("liver", "spleen", "right_kidney", "left_kidney")


def _displace(spec: PhantomSpec, subject_id: int, organs: Dict[str, "_Ellipsoid"]) -> None:
    """Version 0.5: move each solid organ in the plane by N(0, DISPLACEMENT_SD) per axis (stream 10), before the
    mimics and neighbours are placed beside it."""
    r = _rng(spec, subject_id, 10)
    for name in DISPLACED:
        organs[name].center = organs[name].center + np.array([*r.normal(0, DISPLACEMENT_SD, 2), 0.0])


def _grain(spec: PhantomSpec, subject_id: int) -> np.ndarray:
    """The subject's grain field: GRAIN_WAVES plane waves of wavelength GRAIN_WAVELENGTH (stream 8)."""
    r = _rng(spec, subject_id, 8)
    d = r.normal(size=(GRAIN_WAVES, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return np.concatenate([d, r.uniform(0, 2 * np.pi, (GRAIN_WAVES, 1))], axis=1)


def _in_plane_radius(o: "_Ellipsoid", theta: float) -> float:
    """Distance from the organ's axis to its widest in-plane contour in direction ``theta``."""
    t = theta - o.angle
    return float(1.0 / np.sqrt((np.cos(t) / o.axes[0]) ** 2 + (np.sin(t) / o.axes[1]) ** 2))


def _neighbours(spec: PhantomSpec, subject_id: int, organs: Dict[str, "_Ellipsoid"]) -> List[Tuple[str, "_Ellipsoid", float]]:
    """Draw the organs' neighbours (stream 9): background tubes along z that touch an organ in the plane and
    carry its level minus a small offset and the other texture (grain where the organ is smooth and vice
    versa)."""
    r = _rng(spec, subject_id, 9)
    out = []
    for organ, arc, sizes in NEIGHBOUR_SLOTS:
        present = r.uniform() < NEIGHBOUR_PROBABILITY
        theta, zc, half = r.uniform(*arc), r.uniform(*NEIGHBOUR_Z), r.uniform(*NEIGHBOUR_HALF_LENGTH)
        size, offset, angle = r.uniform(*sizes, 2), r.uniform(*NEIGHBOUR_OFFSET), r.uniform(0, np.pi)
        if not present:
            continue
        o = organs[organ]
        axes = size if organ == "liver" else o.axes[:2] * size
        cx, cy = o.axis_at(zc)
        shape = _Ellipsoid(np.zeros(3), np.array([axes[0], axes[1], half]), float(angle))
        # overlapping the organ's widest outline by 30 % of both radii, so that it still touches the organ's
        # smaller cross-sections away from its middle (the organ, drawn later, covers the overlap)
        d = 0.7 * (_in_plane_radius(o, theta) + _in_plane_radius(shape, theta + np.pi))
        shape.center = np.array([cx + d * np.cos(theta), cy + d * np.sin(theta), zc])
        out.append((organ, shape, float(offset)))
    return out


def _warp(s: Subject, x, y, z):
    p = np.stack([x, y, z], axis=-1)
    out = [x.copy(), y.copy(), z.copy()]
    for row in s.warp:
        d, amp, f, ph = row[:3], row[3:6], row[6], row[7]
        w = np.sin(f * (p @ d) + ph)
        for i in range(3):
            out[i] += amp[i] * w
    return out


def render(s: Subject, x: np.ndarray, y: np.ndarray, z: np.ndarray, levels: Optional[Dict[str, float]] = None,
           texture: float = 2.0) -> Tuple[np.ndarray, np.ndarray]:
    """Evaluate a subject's anatomy at the coordinates ``x, y, z`` (same shape).

    Args:
        levels: intensity per structure (keys of ``HU_LEVELS``; optional ``bowel_<i>`` per bowel loop);
            default: the subject's CT HU in its contrast phase (MR: :func:`mr_levels`).
        texture: amplitude of each of the 3 soft-texture sinusoids inside the body.

    Returns:
        ``(hu, label)``: noise-free intensities (float32; HU by default) and labels (uint8, indices
        of :data:`CLASS_NAMES`), both of the coordinates' shape.
    """
    x, y, z = _warp(s, x, y, z)
    hu_of = levels if levels is not None else {k: v[s.phase] + s.intensity_jitter[k] for k, v in HU_LEVELS.items()}
    label = np.zeros(x.shape, np.uint8)
    hu = np.full(x.shape, hu_of["air"], np.float32)
    bx, by = s.body
    rb = (x / bx) ** 2 + (y / by) ** 2
    body = rb <= 1.0
    inner_fat = rb <= (1.0 - s.fat) ** 2
    inner_muscle = rb <= (1.0 - s.fat - s.muscle) ** 2

    grained = np.zeros(x.shape, bool)  # version 0.5: where the grain field is added

    def put(mask, name_or_hu, cls, grain=False):
        hu[mask] = hu_of[name_or_hu] if isinstance(name_or_hu, str) else name_or_hu
        label[mask] = cls
        grained[mask] = grain

    c = {n: i for i, n in enumerate(CLASS_NAMES)}
    put(body, "fat", c["body_wall"])
    put(inner_fat & ~inner_muscle, "muscle", c["muscle"])
    put(inner_muscle, "visceral", c["background"])
    o = s.organs
    for i, b in enumerate(s.bowel):
        put(b.inside(x, y, z) & inner_muscle, hu_of.get(f"bowel_{i}", hu_of["bowel"]), 0)
    for side in ("colon_r", "colon_l"):
        put(o[side].inside(x, y, z) & inner_muscle, "colon", 0)
    for organ, m in s.mimics:  # background with the organ's intensity (0.5: and texture), beyond the organ's pole
        put(m.inside(x, y, z) & inner_muscle, _ORGAN_LEVEL[organ], 0, _grained(s, organ))
    for organ, m, offset in s.neighbours:  # 0.5: background touching the organ, its level - offset, other texture
        put(m.inside(x, y, z) & inner_muscle, hu_of[_ORGAN_LEVEL[organ]] - offset, 0, not _grained(s, organ))
    st = o["stomach"]
    put(st.inside(x, y, z) & inner_muscle, "stomach", 0)
    put(st.inside(x, y, z) & ~st.inside(x, y, z, 0.85) & inner_muscle, "muscle", 0)
    for g in s.gas:
        put(g.inside(x, y, z) & inner_muscle, "gas", 0)
    for side in ("psoas_r", "psoas_l"):
        put(o[side].inside(x, y, z) & inner_muscle, "muscle", c["muscle"])
    put(o["liver"].inside(x, y, z) & inner_muscle, "liver", c["liver"], _grained(s, "liver"))
    put(o["spleen"].inside(x, y, z) & inner_muscle, "spleen", c["spleen"], _grained(s, "spleen"))
    for side in ("right_kidney", "left_kidney"):
        k = o[side]
        put(k.inside(x, y, z) & inner_muscle, "kidney_cortex", c[side], _grained(s, side))
        put(k.inside(x, y, z, 0.6) & inner_muscle, "kidney_medulla", c[side], _grained(s, side))
    put(o["aorta"].inside(x, y, z) & inner_muscle, "aorta", c["aorta"])
    v = o["vertebra"]
    put(v.inside(x, y, z) & body, "cortical", c["vertebra"])
    put(v.inside(x, y, z, 0.8) & body, "bone", c["vertebra"])
    # spinal canal behind the body: background
    canal = _Ellipsoid(v.center + np.array([0.0, -0.17, 0.0]), np.array([0.06, 0.05, 5.0]), 0.0, v.tilt)
    put(canal.inside(x, y, z) & body, "canal", 0)
    # soft texture inside the body (CT: +-6 HU)
    p = np.stack([x, y, z], axis=-1)
    tex = sum(np.sin(t[3] * (p @ t[:3]) + t[4]) for t in s.texture) * texture
    hu = np.where(body, hu + tex, hu).astype(np.float32)
    if s.grain is not None:  # version 0.5: the parenchymal grain (0.3 has none and is unchanged)
        k = 2 * np.pi / GRAIN_WAVELENGTH
        amp = GRAIN_SD * np.sqrt(2.0 / len(s.grain))
        g = sum(np.cos(k * (p @ w[:3]) + w[3]) for w in s.grain) * amp
        hu = np.where(grained, hu + g, hu).astype(np.float32)
    return hu, label


def _grained(s: Subject, organ: str) -> bool:
    """Whether an organ's parenchyma carries the grain (version 0.5; never in 0.3)."""
    return s.grain is not None and organ in GRAINED


def _finish(s: Subject, spec: PhantomSpec, hu: np.ndarray, stream: int, blur_axes: Sequence[float]) -> np.ndarray:
    if spec.blur > 0:
        hu = gaussian_filter(hu, sigma=[spec.blur * b for b in blur_axes])
    noise = _rng(spec, s.subject_id, stream).normal(0, s.noise_hu, hu.shape)
    return (hu + noise).astype(np.float32)


# Random streams of ``_rng(spec, subject_id, stream)``: 0 anatomy (sample_subject), 1/2 CT noise
# (volume/slice), 3 MR levels, 4 MR bias field, 5/6 MR noise (volume/slice).
def mr_levels(spec: PhantomSpec, s: Subject) -> Dict[str, float]:
    """The subject's MR signal per structure (``MR_LEVELS`` with per-subject jitter, and one value per
    bowel loop as ``bowel_<i>``), in arbitrary units; for :func:`render`'s ``levels``."""
    r = _rng(spec, s.subject_id, 3)
    levels = {k: float(m * np.exp(r.normal(0, sd))) for k, (m, sd) in MR_LEVELS.items()}
    for i, f in enumerate(r.normal(0, MR_BOWEL_LOOP_SD, len(s.bowel))):
        levels[f"bowel_{i}"] = levels["bowel"] * float(np.exp(f))
    return levels


def bias_field(spec: PhantomSpec, s: Subject, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
    """The subject's smooth multiplicative MR bias field at scanner coordinates ``x, y, z``.

    ``exp`` of a random linear gradient (slope 0.12-0.2 per normalised unit) plus two
    long-wavelength sinusoids (wavelength 4-8 normalised units, amplitude 0.04-0.1), so the field
    varies by roughly +-20-35 % over the field of view. It is a function of the unwarped
    coordinates (a property of the coil, not of the anatomy), shared by volumes and slices.
    """
    r = _rng(spec, s.subject_id, 4)
    g = r.normal(size=3)
    g *= r.uniform(0.12, 0.2) / np.linalg.norm(g)
    d = r.normal(size=(2, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    amp, freq, ph = r.uniform(0.04, 0.1, 2), r.uniform(2 * np.pi / 8, 2 * np.pi / 4, 2), r.uniform(0, 2 * np.pi, 2)
    p = np.stack([x, y, z], axis=-1)
    log_b = p @ g + sum(amp[j] * np.sin(freq[j] * (p @ d[j]) + ph[j]) for j in range(2))
    return np.exp(log_b)


def _finish_mr(s: Subject, spec: PhantomSpec, img: np.ndarray, stream: int, blur_axes: Sequence[float],
               bias: np.ndarray) -> np.ndarray:
    """Blur, bias field, then Rician noise: ``|signal + n1 + i n2|`` with ``n1, n2 ~ N(0, sigma)``."""
    if spec.blur > 0:
        img = gaussian_filter(img, sigma=[spec.blur * b for b in blur_axes])
    img = img * bias
    n = _rng(spec, s.subject_id, stream).normal(0, s.noise_hu * MR_NOISE_PER_HU, (2,) + img.shape)
    return np.sqrt((img + n[0]) ** 2 + n[1] ** 2).astype(np.float32)


def _acquire(spec: PhantomSpec, s: Subject, x, y, z, blur_axes: Sequence[float], ct_stream: int, mr_stream: int):
    """Render and acquire one image in ``spec.modality``: ``(image float32, label uint8)``."""
    if spec.modality == "CT":
        hu, label = render(s, x, y, z)
        return _finish(s, spec, hu, ct_stream, blur_axes), label
    if spec.modality == "MR":
        sig, label = render(s, x, y, z, levels=mr_levels(spec, s), texture=MR_TEXTURE)
        return _finish_mr(s, spec, sig, mr_stream, blur_axes, bias_field(spec, s, x, y, z)), label
    raise ValueError(f"phantom modality must be one of {', '.join(MODALITIES)}, got {spec.modality!r}")


def volume_z(n: int, through: Optional[float] = None) -> Tuple[np.ndarray, Optional[int]]:
    """The axial coordinates of an ``n``-slice volume: ``linspace(-1, 1, n)``, or, with ``through``,
    that grid shifted by less than half a slice so that one plane lies exactly at ``z = through``.

    Returns:
        ``(z, index)``: the coordinates and the index of the plane at ``through`` (``None`` without).
    """
    z = np.linspace(-1, 1, n, dtype=np.float64)
    if through is None:
        return z, None
    k = int(np.argmin(np.abs(z - through)))
    z = z + (float(through) - z[k])
    z[k] = float(through)  # exactly: the plane's labels are those of render_slice(z=through)
    return z, k


def render_volume(spec: PhantomSpec, subject_id: int, shape: Sequence[int] = (64, 64, 48), through: Optional[float] = None):
    """Render one subject as a 3D volume.

    Args:
        spec: population settings.
        subject_id: subject index within the population.
        shape: ``(X, Y, Z)`` grid; axial slices lie along the last axis.
        through: a normalised z that one axial plane passes through exactly (:func:`volume_z`); e.g.
            the subject's ``slice_z``, so that plane ``z_index`` has the label map of the subject's
            single slice (:func:`render_slice` of the same in-plane shape): a 3D model is scored on
            the very slice a 2D model is scored on.

    Returns:
        dict with ``image`` (float32 HU, ``shape``; MR: arbitrary units >= 0), ``label`` (uint8,
        ``shape``), ``phase`` (drawn but ignored for MR), ``subject_id``, ``z_index`` (``None``
        without ``through``).
    """
    s = sample_subject(spec, subject_id)
    zs, k = volume_z(shape[2], through)
    axes = [np.linspace(-1, 1, n, dtype=np.float64) for n in shape[:2]] + [zs]
    x, y, z = np.meshgrid(*axes, indexing="ij")
    image, label = _acquire(spec, s, x, y, z, (1, 1, 1), 1, 5)
    return {"image": image, "label": label, "phase": s.phase, "subject_id": s.subject_id, "z_index": k}


def render_slice(spec: PhantomSpec, subject_id: int, shape: Sequence[int] = (128, 128), z: float | None = None):
    """Render one axial slice of a subject (at its own ``slice_z`` unless ``z`` is given).

    Returns:
        dict with ``image`` (float32 HU, ``shape``; MR: arbitrary units >= 0), ``label`` (uint8),
        ``phase`` (drawn but ignored for MR), ``z``, ``subject_id``.
    """
    s = sample_subject(spec, subject_id)
    zz = s.slice_z if z is None else float(z)
    axes = [np.linspace(-1, 1, n, dtype=np.float64) for n in shape]
    x, y = np.meshgrid(*axes, indexing="ij")
    image, label = _acquire(spec, s, x, y, np.full_like(x, zz), (1, 1), 2, 6)
    return {"image": image, "label": label, "phase": s.phase, "z": zz, "subject_id": s.subject_id}


def hu_window(hu: np.ndarray, lo: float = -175.0, hi: float = 250.0) -> np.ndarray:
    """Clip HU to ``[lo, hi]`` and scale to ``[0, 1]`` (abdominal soft-tissue window)."""
    return ((np.clip(hu, lo, hi) - lo) / (hi - lo)).astype(np.float32)
