"""The 3D-necessary confusions of the phantom (lightning_distill/data/phantom.py): a volume through a student's slice,
and the organs' pole mimics."""

import numpy as np
import pytest

from lightning_distill.data.phantom import (HU_LEVELS, _ORGAN_LEVEL, PhantomSpec, render, render_slice, render_volume, sample_subject,
                                            volume_z)


STUDENT_SPEC = PhantomSpec(seed=2, phases=("noncontrast",), noise_hu=(20, 35))


@pytest.mark.parametrize("modality", ["CT", "MR"])
def test_a_volume_through_a_slice_has_the_slice_labels(modality):
    spec = PhantomSpec(seed=2, phases=("noncontrast",), modality=modality)
    for sid in range(4):
        z = sample_subject(spec, sid).slice_z
        vol = render_volume(spec, sid, (32, 32, 16), through=z)
        assert np.array_equal(vol["label"][..., vol["z_index"]], render_slice(spec, sid, (32, 32))["label"])
    zs, k = volume_z(16, 0.1234)
    assert zs[k] == 0.1234 and np.allclose(np.diff(zs), 2 / 15)  # a shifted grid, spacing unchanged
    assert volume_z(16)[1] is None


def _unwarped(spec, sid):
    s = sample_subject(spec, sid)
    s.warp[:, 3:6] = 0.0  # no deformation: the construction can be checked at analytic coordinates
    return s


def _at(s, x, y, z):
    hu, label = render(s, np.array([x]), np.array([y]), np.array([z]), texture=0.0)
    return float(hu[0]), int(label[0])


def test_pole_mimics_look_like_the_pole_in_a_slice_but_are_separate_in_3d():
    from lightning_distill.data.phantom import CLASS_NAMES

    checked = set()
    for sid in range(40):
        s = _unwarped(STUDENT_SPEC, sid)
        levels = {k: v["noncontrast"] + s.intensity_jitter[k] for k, v in HU_LEVELS.items()}
        for organ, m in s.mimics:
            o = s.organs[organ]
            end = 1 if m.center[2] > o.center[2] else -1
            pole = o.center[2] + end * o.axes[2]
            cx, cy, cz = m.center
            hu, lab = _at(s, cx, cy, cz)  # the mimic's centre: background with the organ's intensity
            if lab != 0:
                continue  # another structure drawn over it (e.g. the other organ): nothing to check here
            assert hu == pytest.approx(levels[_ORGAN_LEVEL[organ]])
            # between the pole and the mimic (half the gap): neither the organ nor its intensity
            gap = abs(cz - pole) - m.axes[2]
            _, lab_gap = _at(s, cx, cy, pole + end * gap / 2)
            assert lab_gap != CLASS_NAMES.index(organ)
            # just inside the pole, on the organ's axis: the organ
            ox = o.center[0] + o.tilt[0] * (pole - o.center[2])
            oy = o.center[1] + o.tilt[1] * (pole - o.center[2])
            _, lab_o = _at(s, ox, oy, pole - end * 0.02)
            if lab_o == CLASS_NAMES.index(organ):
                checked.add(organ)
    assert checked == set(_ORGAN_LEVEL), checked  # every kind of mimic was seen and checked


def test_mimics_appear_on_student_slices():
    """The default student population meets the 3D-necessary confusions often (at least one mimic
    cut by a fifth of the slices; each organ's mimic on some slice)."""
    hit, organs = 0, set()
    for sid in range(100):
        s = sample_subject(STUDENT_SPEC, sid)
        cut = [organ for organ, m in s.mimics if abs(s.slice_z - m.center[2]) < m.axes[2]]
        hit += bool(cut)
        organs |= set(cut)
    assert hit >= 20 and organs == set(_ORGAN_LEVEL)
