"""A 3D teacher scored on a 2D student's own test slices (lightning_distill/lab/teacher_slices.py)."""

import json
import os

import pytest

from conftest import REPO
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
