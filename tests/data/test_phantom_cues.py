"""Phantom version 0.5's learnable single-slice cues (issue 31, item 2; lightning_distill/data/phantom.py, cues
5-7): each is *in* the students' single slices, with the sign and size the docstring gives, measured on
generated subjects; 0.5 draws the same subjects as 0.3; rendering is deterministic per (seed, subject id).

The statistics are means over subjects of the students' population (experiments/student.yaml: non-contrast,
20-35 HU noise, kidney level). Each is compared with the same statistic of version 0.3 (no cue: the control
that the statistic measures the cue) and with its expected size, within the standard error of the mean over
the subjects (a z bound: the numbers are sample means of noisy slices, not one computation run twice).
"""

import dataclasses

import numpy as np
import pytest
from scipy.ndimage import binary_dilation, binary_erosion, gaussian_filter, uniform_filter

from lightning_distill.config import ConfigError, load_config
from lightning_distill.data import phantom as ph
from lightning_distill.data.phantom import CLASS_NAMES, PhantomSpec, render_slice, render_volume, sample_subject

C = {n: i for i, n in enumerate(CLASS_NAMES)}
STUDENTS = PhantomSpec(seed=2, phases=("noncontrast",), noise_hu=(20, 35), slice_z=(-0.6, 0.0), version="0.5")
SHAPE = (64, 64)
N = 200  # subjects per statistic


def _grid(z: float):
    xs = [np.linspace(-1, 1, n, dtype=np.float64) for n in SHAPE]
    x, y = np.meshgrid(*xs, indexing="ij")
    return x, y, np.full_like(x, z)


def _slice(spec: PhantomSpec, i: int, z=None):
    """Subject ``i``'s slice (at its own level or ``z``): the noisy image, the same without noise (blurred
    like it), the label map, the subject and the level."""
    s = sample_subject(spec, i)
    zz = s.slice_z if z is None else z
    r = render_slice(spec, i, SHAPE, z=zz)
    clean, label = ph.render(s, *_grid(zz))
    assert np.array_equal(label, r["label"])
    return r["image"].astype(np.float64), gaussian_filter(clean.astype(np.float64), spec.blur), label, s, zz


def _neighbour_mask(s: ph.Subject, organ: str, label: np.ndarray, z: float) -> np.ndarray:
    """Pixels of the slice at ``z`` where ``organ``'s neighbour is what is drawn (not covered by the stomach,
    gas or an organ): inside it, background, and at its level in a render without the grain (within the soft
    texture's 6 HU)."""
    x, y, zz = _grid(z)
    wx, wy, wz = ph._warp(s, x, y, zz)
    hu, _ = ph.render(dataclasses.replace(s, grain=None), x, y, zz)  # without the grain: at the level exactly
    level = ph.HU_LEVELS[ph._ORGAN_LEVEL[organ]][s.phase] + s.intensity_jitter[ph._ORGAN_LEVEL[organ]]
    out = np.zeros(label.shape, bool)
    for o, m, offset in s.neighbours:
        if o == organ:
            out |= m.inside(wx, wy, wz) & (np.abs(hu - (level - offset)) <= 6.5)
    return out & (label == 0)


def _fine_var(img: np.ndarray, mask: np.ndarray):
    """Mean squared deviation from the 3x3 local mean over ``mask`` eroded by a pixel (``None`` if < 6 pixels):
    white noise and the grain add to it; a smooth region's is the noise's alone (and the blur of its edge)."""
    m = binary_erosion(mask)
    if m.sum() < 6:
        return None
    r = img - uniform_filter(img, 3)
    return float((r[m] ** 2).mean())


def _paired(spec: PhantomSpec, organ: str, other, z=None):
    """Per subject, on the noisy and on the noise-free slice: fine variance in ``organ`` minus in the ``other``
    region, where both are present (two arrays)."""
    noisy, clean = [], []
    for i in range(N):
        img, ref, label, s, zz = _slice(spec, i, z)
        region = other(s, label, zz)
        a, b = _fine_var(img, label == C[organ]), _fine_var(img, region)
        if a is not None and b is not None:
            noisy.append(a - b)
            clean.append(_fine_var(ref, label == C[organ]) - _fine_var(ref, region))
    return np.array(noisy), np.array(clean)


def _z(d: np.ndarray, expected: float) -> float:
    return abs(d.mean() - expected) / (d.std(ddof=1) / np.sqrt(len(d)))


def test_0_5_draws_the_same_subjects_as_0_3():
    old = dataclasses.replace(STUDENTS, version="0.3")
    for i in range(5):
        a, b = sample_subject(old, i), sample_subject(STUDENTS, i)
        assert (a.phase, a.noise_hu, a.slice_z, a.body) == (b.phase, b.noise_hu, b.slice_z, b.body)
        for name in a.organs:  # the same draws of the same stream: equal bit for bit
            assert np.array_equal(a.organs[name].axes, b.organs[name].axes)
            moved = b.organs[name].center - a.organs[name].center  # cue 7: only the solid organs, only in-plane
            assert moved[2] == 0 and (np.any(moved != 0) == (name in ph.DISPLACED)), name
        assert len(a.mimics) == len(b.mimics)
        assert a.grain is None and a.neighbours == [] and b.grain is not None


def test_rendering_is_deterministic_per_seed_and_subject():
    a, b = render_slice(STUDENTS, 3, SHAPE), render_slice(STUDENTS, 3, SHAPE)
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])  # one computation twice
    v1, v2 = render_volume(STUDENTS, 3, (24, 24, 12)), render_volume(STUDENTS, 3, (24, 24, 12))
    assert np.array_equal(v1["image"], v2["image"]) and np.array_equal(v1["label"], v2["label"])
    assert not np.array_equal(a["image"], render_slice(STUDENTS, 4, SHAPE)["image"])
    other_seed = dataclasses.replace(STUDENTS, seed=3)
    assert not np.array_equal(sample_subject(other_seed, 3).grain, sample_subject(STUDENTS, 3).grain)


def test_unknown_version_is_refused_with_the_valid_ones():
    with pytest.raises(ValueError, match=r"0\.3, 0\.5.*'0\.4'"):
        PhantomSpec(version="0.4")
    with pytest.raises(ConfigError, match="data.phantom.version"):
        load_config("experiments/student.yaml", ["data.phantom.version=0.4"])
    assert load_config("experiments/student.yaml", ["data.phantom.version=0.5"]).data.phantom.version == "0.5"


def test_grain_separates_liver_from_its_smooth_neighbour_in_single_slices():
    """Cue 5: the liver's fine variance exceeds its (smooth) neighbour's on the same noisy slice, by what the
    noise-free slices give (the noise adds equally to both regions), and the grain is below the noise."""
    noisy, clean = _paired(STUDENTS, "liver", lambda s, label, z: _neighbour_mask(s, "liver", label, z))
    assert len(noisy) >= 25, len(noisy)
    assert clean.mean() > 50.0, clean.mean()  # the grain's fine variance (HU^2) after the blur
    assert noisy.mean() > 0 and _z(noisy, 0.0) > 3, (noisy.mean(), _z(noisy, 0.0))
    assert _z(noisy, clean.mean()) < 3, (noisy.mean(), clean.mean())
    assert np.sqrt(clean.mean()) < STUDENTS.noise_hu[0]  # subtle per pixel: below the students' noise SD


def test_grain_separates_liver_from_spleen_in_single_slices():
    """Cue 5: liver and spleen at a level where both are cut (z = 0.0, the top of the students' range): liver grained, spleen smooth; in 0.3
    (the control) no difference."""
    def spleen(s, label, z):
        return label == C["spleen"]
    noisy, clean = _paired(STUDENTS, "liver", spleen, z=0.0)
    control, _ = _paired(dataclasses.replace(STUDENTS, version="0.3"), "liver", spleen, z=0.0)
    assert len(noisy) >= 25 and len(control) >= 25, (len(noisy), len(control))
    assert noisy.mean() > 0 and _z(noisy, 0.0) > 3, (noisy.mean(), _z(noisy, 0.0))
    assert _z(noisy, clean.mean()) < 3, (noisy.mean(), clean.mean())
    assert _z(control, 0.0) < 3, control.mean()


@pytest.mark.parametrize("organ", ["liver", "spleen"])
def test_neighbours_touch_their_organ_a_little_darker_in_single_slices(organ):
    """Cue 6: in at least 30 % of the students' slices that cut the organ a neighbour touches it, NEIGHBOUR_OFFSET darker (mean over the
    subjects where both are cut; the spleen at z = 0.0, the top of the students' range, where it is cut more often)."""
    z = 0.0 if organ == "spleen" else None
    diffs, touching, cut = [], 0, 0
    for i in range(N):
        img, _, label, s, zz = _slice(STUDENTS, i, z)
        inside, nb = label == C[organ], _neighbour_mask(s, organ, label, zz)
        if inside.sum() < 6:
            continue
        cut += 1
        touching += bool((binary_dilation(inside) & nb).any())
        if nb.sum() >= 6:  # the interiors, away from the blurred edges
            a, b = binary_erosion(inside), binary_erosion(nb)
            if a.any() and b.any():
                diffs.append(float(img[a].mean() - img[b].mean()))
    diffs = np.array(diffs)
    assert touching / cut >= 0.3, (touching, cut)  # measured: liver 89 of 159 cut slices, spleen (z = 0) 104 of 199
    expected = float(np.mean(ph.NEIGHBOUR_OFFSET))
    assert len(diffs) >= 20 and diffs.mean() > 0 and _z(diffs, expected) < 3, (diffs.mean(), expected, len(diffs))


@pytest.mark.parametrize("organ", ph.DISPLACED)
def test_displacement_widens_where_organs_lie_in_single_slices(organ):
    """Cue 7: the same subjects' slices in 0.3 and 0.5: the organ's centroid moves, per axis, with an SD
    near DISPLACEMENT_SD (a cut's centroid also shifts where the organ's outline meets another warp phase, and
    small cuts move less) and a mean near 0 (the displacement is unbiased)."""
    z = 0.0 if organ == "spleen" else None
    old = dataclasses.replace(STUDENTS, version="0.3")
    moved = []
    for i in range(N):
        a, b = [render_slice(v, i, SHAPE, z=z)["label"] == C[organ] for v in (old, STUDENTS)]
        if a.sum() >= 6 and b.sum() >= 6:
            ca, cb = [np.argwhere(m).mean(axis=0) * 2.0 / (SHAPE[0] - 1) for m in (a, b)]  # pixels -> normalised
            moved.append(cb - ca)
    moved = np.array(moved)
    assert len(moved) >= 40, len(moved)
    per_axis_sd = moved.std(axis=0, ddof=1)
    assert np.all(per_axis_sd > 0.6 * ph.DISPLACEMENT_SD) and np.all(per_axis_sd < 1.5 * ph.DISPLACEMENT_SD), per_axis_sd
    assert np.all(np.abs(moved.mean(axis=0)) < 3 * per_axis_sd / np.sqrt(len(moved))), moved.mean(axis=0)
