"""Real data: the CHAOS T2 MRI set, read from $CHAOS_DIR or ../shared/data/chaos_t2_mr.

Skipped cleanly when the data are not on this machine (they are never copied into the repo).
"""

import json
import os

import numpy as np
import pytest

from conftest import REPO

CHAOS = os.environ.get("CHAOS_DIR", os.path.join(REPO, "..", "shared", "data", "chaos_t2_mr"))
pytestmark = [
    pytest.mark.chaos,
    pytest.mark.skipif(not os.path.isfile(os.path.join(CHAOS, "dataset.json")), reason=f"CHAOS data not found at {CHAOS}"),
]


def test_chaos_teacher_config_reads_volumes_with_groups():
    from lightning_distill.config import load_config
    from lightning_distill.train import build_datamodule, build_source

    cfg = load_config(os.path.join(REPO, "experiments/chaos/teacher.yaml"), [f"data.nifti.root={CHAOS}"])
    src = build_source(cfg)
    assert len(src.ids) == 20 and list(src.class_names) == ["background", "liver", "right_kidney", "left_kidney", "spleen"]
    dm = build_datamodule(cfg, src)
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 6, "val": 1, "test": 6}
    item = src.load("chaos_001")
    assert item["image"].shape == (1, 96, 96, 32) and item["label"].shape == (96, 96, 32)
    assert set(np.unique(item["label"])) == {0, 1, 2, 3, 4}
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0


def test_chaos_student_groups_are_disjoint_from_teacher():
    from lightning_distill.config import load_config

    t = load_config(os.path.join(REPO, "experiments/chaos/teacher.yaml")).data.splits
    s = load_config(os.path.join(REPO, "experiments/chaos/student.yaml")).data.splits
    teacher = set(t.train) | set(t.val)
    student = set(s.train) | set(s.val)
    test = set(s.test)
    assert not (teacher & student) and not (teacher & test) and not (student & test)
    assert set(t.test) == test and len(teacher | student | test) == 20


def test_chaos_single_slice_extraction(tmp_path):
    from lightning_distill.data.nifti import discover
    from lightning_distill.slices import extract_slices

    index = discover(CHAOS)
    src = tmp_path / "two"  # a 2-case copy-free view: symlinks to the real files
    for sub in ("imagesTr", "labelsTr"):
        (src / sub).mkdir(parents=True)
    for case in index.cases[:2]:
        os.symlink(case.images[0], src / "imagesTr" / case.images[0].name)
        os.symlink(case.label, src / "labelsTr" / case.label.name)
    meta = json.loads((index.root / "dataset.json").read_text())
    (src / "dataset.json").write_text(json.dumps(meta))
    chosen = extract_slices(src, tmp_path / "slices", "max-area", "left_kidney")
    assert len(chosen) == 2
    import nibabel as nib

    first = index.cases[0].case_id
    img = nib.load(str(tmp_path / "slices" / "imagesTr" / f"{first}_0000.nii.gz"))
    assert img.shape == (256, 256) and np.allclose(img.header.get_zooms()[:2], (1.25, 1.25))


def test_chaos_student_validates_on_a_volume_with_every_organ():
    """Model selection sees every organ: the val patient's single slice has no spleen, its volume has."""
    from types import SimpleNamespace

    from lightning_distill.config import load_config
    from lightning_distill.data.build import val_source

    cfg = load_config(os.path.join(REPO, "experiments/chaos/student.yaml"), [f"data.nifti.val_root={CHAOS}"])
    src = val_source(cfg, SimpleNamespace(spatial_dims=2))
    assert {i.split("@")[0] for i in src.ids} == set(cfg.data.splits.val)
    present = set()
    for i in src.ids:
        present |= set(np.unique(src.load(i)["label"]).tolist())
    assert present == set(range(len(cfg.classes)))  # background and all four organs
    t2d = load_config(os.path.join(REPO, "experiments/chaos/teacher2d.yaml")).data.splits
    t3d = load_config(os.path.join(REPO, "experiments/chaos/teacher.yaml")).data.splits
    assert t2d == t3d  # the 2D teacher control sees the 3D teacher's patients


@pytest.mark.slow
def test_quick_chaos_benchmark_scores_teachers_on_the_students_slices(tmp_path, monkeypatch):
    """`make bench-chaos --quick`: both teachers scored on the students' test slices (single slices and
    every axial slice), students validated on the val patient's volume, the teacher's slices of its own
    volumes written once and read by the data routes, SIKD's teacher per size, the teachers' banks in the report."""
    from lightning_distill.lab.benchmark import read_records
    from lightning_distill.cli import main

    monkeypatch.setenv("CHAOS_DIR", os.path.abspath(CHAOS))
    monkeypatch.chdir(tmp_path)  # the prepared slices go to ./runs/chaos/slices
    out = tmp_path / "bench"
    assert main(["benchmark", os.path.join(REPO, "experiments/benchmarks/chaos.yaml"), "--quick", f"output_dir={out}"]) == 0
    records = read_records(f"{out}-quick/results.jsonl")
    teachers = {r["instance"]: r for r in records if r["kind"] == "teacher"}
    assert {"mr3d", "t2d"} <= set(teachers)
    for t in (teachers["mr3d"], teachers["t2d"]):
        assert t["student_slices"]["test"]["num_cases"] == 6  # the six group-C single slices
        assert t["student_slices_sets"]["allslices"]["test"]["num_cases"] > 100  # every axial slice of them
        assert t["bank"]["classes"][4] == "spleen" and len(t["bank"]["matrix"]) == 5
    students = [r for r in records if r["kind"] == "student"]
    assert {r["method"] for r in students} == {"baseline", "prob", "soft", "union", "sikd"}
    for r in students:
        assert set(r["test_sets"]) == {"allslices"} and r["config"]["data"]["nifti"]["val_root"] is not None
    slices = {r["key"]: r for r in records if r["kind"] == "slices"}
    assert set(slices) == {"slices|s3d"}  # only the 3D teacher's slices are read by the quick grid's methods
    assert slices["slices|s3d"]["num_volumes"] == 6 and slices["slices|s3d"]["labelled_by"] == "3D model"
    by_method = {r["method"]: r["config"] for r in students}
    assert by_method["soft"]["transfer"]["slices"] == by_method["union"]["transfer"]["union"] == str(out) + "-quick/slices/s3d"
    assert "sikd2d_Unet_f1" in {r["instance"] for r in records if r["kind"] == "teacher"} | set(teachers)
    report = (out.parent / "bench-quick" / "report.md").read_text()
    assert "## What the teachers' banks hold" in report and "### test set `allslices`" in report
