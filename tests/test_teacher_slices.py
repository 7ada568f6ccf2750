"""The 3D-necessary confusions of the phantom, and a 3D teacher scored on a 2D student's own test slices."""

import json
import os

import numpy as np
import pytest

from lightning_distill.data.phantom import (HU_LEVELS, _ORGAN_LEVEL, PhantomSpec, render, render_slice, render_volume, sample_subject,
                                            volume_z)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def test_teacher_scored_on_the_student_slices(teacher_bank, tiny_student, tmp_path):
    """The teacher segments each student test subject's volume and is scored on the student's slices;
    the comparison table has the student, the baseline and the teacher on the same ids."""
    from lightning_distill.cli import main

    student_args = [a for a in tiny_student if not a.startswith("data.shape")] + ["data.shape=[32,32]"]
    runs = {}
    for name, extra in (("student", [f"distill.prototypes={teacher_bank}/prototypes.pt"]),
                        ("baseline", ["distill.weight=0", "distill.prototypes=null"])):
        runs[name] = tmp_path / name
        assert main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={runs[name]}", *student_args, *extra]) == 0
    ckpt = str(teacher_bank / "checkpoints" / "best.ckpt")
    assert main(["compare", str(runs["student"]), "--teacher", ckpt, "--baseline", str(runs["baseline"])]) == 0
    text = (runs["student"] / "comparison.md").read_text()
    assert "| organ | student | baseline | 3D teacher |" in text and "3D teacher − baseline" in text
    t = json.loads((runs["student"] / "results_teacher_slices.json").read_text())
    s = json.loads((runs["student"] / "results.json").read_text())
    assert sorted(t["test_ids"]) == sorted(c["id"] for c in s["test_cases"])
    assert t["test"]["num_cases"] == s["test"]["num_cases"] == 4
    assert all(0.0 <= v <= 1.0 for v in t["test"]["dice"].values() if v is not None)
    # a baseline tested on other slices is refused
    other = tmp_path / "other"
    other.mkdir()
    b = json.loads((runs["baseline"] / "results.json").read_text())
    b["test_cases"] = b["test_cases"][1:]
    (other / "results.json").write_text(json.dumps(b))
    assert main(["compare", str(runs["student"]), "--teacher", ckpt, "--baseline", str(other)]) == 2


def test_teacher_on_other_slices_is_refused(teacher_bank, tmp_path):
    from lightning_distill.config import load_config
    from lightning_distill.lab.teacher_slices import score_teacher_on_student_slices

    ckpt = str(teacher_bank / "checkpoints" / "best.ckpt")
    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), ["data.shape=[64,64]", "data.num_subjects=8",
                                                                       "data.val_subjects=2", "data.test_subjects=2"])
    with pytest.raises(ValueError, match="in-plane grid"):
        score_teacher_on_student_slices(ckpt, cfg)
    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), ["data.shape=[32,32]", "data.num_subjects=8",
                                                                       "data.val_subjects=2", "data.test_subjects=2",
                                                                       "data.phantom.shift.gamma=0.7"])
    with pytest.raises(ValueError, match="domain shift"):
        score_teacher_on_student_slices(ckpt, cfg)
    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), ["data.shape=[32,32]", "data.num_subjects=8",
                                                                       "data.val_subjects=2", "data.test_subjects=2",
                                                                       "data.window=[-100,200]"])
    with pytest.raises(ValueError, match="other intensities"):
        score_teacher_on_student_slices(ckpt, cfg)
