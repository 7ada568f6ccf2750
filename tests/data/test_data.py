import numpy as np
import pytest
import torch

from lightning_distill.data import CLASS_NAMES, PhantomSource, PhantomSpec, SliceDataModule, VolumeDataModule
from lightning_distill.data.datamodules import split_ids, train_subset
from lightning_distill.data.phantom import render_slice, render_volume

from conftest import REPO


def test_phantom_is_deterministic_and_has_all_classes():
    spec = PhantomSpec(seed=3)
    a, b = render_volume(spec, 5, (48, 48, 32)), render_volume(spec, 5, (48, 48, 32))
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert a["image"].shape == (48, 48, 32) and a["image"].dtype == np.float32
    assert set(np.unique(a["label"])) == set(range(len(CLASS_NAMES)))
    assert len(CLASS_NAMES) >= 9
    other = render_volume(spec, 6, (48, 48, 32))
    assert not np.array_equal(a["label"], other["label"])  # subjects vary


def test_teacher_and_student_populations_are_different_subjects():
    t = render_slice(PhantomSpec(seed=1), 0, (64, 64), z=-0.3)
    s = render_slice(PhantomSpec(seed=2), 0, (64, 64), z=-0.3)
    assert not np.array_equal(t["label"], s["label"])


def test_contrast_phase_changes_organ_intensity():
    means = {}
    for phase in ("noncontrast", "arterial"):
        spec = PhantomSpec(seed=0, phases=(phase,), noise_hu=(0.0, 0.0), blur=0.0)
        v = render_volume(spec, 0, (48, 48, 32))
        means[phase] = float(v["image"][v["label"] == CLASS_NAMES.index("aorta")].mean())
    assert means["arterial"] > means["noncontrast"] + 100


def test_splits_disjoint_and_nested_subsets():
    ids = [f"s{i}" for i in range(50)]
    sp = split_ids(ids, val=5, test=10, seed=0)
    assert len(sp["test"]) == 10 and len(sp["val"]) == 5 and len(sp["train"]) == 35
    assert not (set(sp["train"]) & set(sp["val"])) and not (set(sp["train"]) & set(sp["test"]))
    small, mid, full = (train_subset(sp["train"], f) for f in (0.25, 0.5, 1.0))
    assert set(small) <= set(mid) <= set(full) and len(small) == 9 and len(full) == 35
    assert split_ids(ids, 5, 10, 0) == sp and split_ids(ids, 5, 10, 1) != sp
    assert len(train_subset(sp["train"], count=7)) == 7
    with pytest.raises(ValueError, match="train_fraction"):
        train_subset(sp["train"], 0.0)
    with pytest.raises(ValueError, match="keep any for training"):
        split_ids(ids, 25, 25, 0)


def test_slice_datamodule_batches():
    src = PhantomSource(PhantomSpec(seed=2), num_subjects=12, shape=(64, 64))
    dm = SliceDataModule(src, batch_size=4, val_subjects=2, test_subjects=2, train_fraction=0.5)
    assert len(dm.train_ids) == 4
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 1, 64, 64) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4, 1, 64, 64) and batch["label"].dtype == torch.int64
    assert batch["spacing"].shape == (4, 2) and len(batch["id"]) == 4
    assert int(batch["label"].max()) < len(CLASS_NAMES)


def test_volume_datamodule_whole_volumes_and_patches():
    src = PhantomSource(PhantomSpec(seed=1), num_subjects=6, shape=(32, 32, 16))
    dm = VolumeDataModule(src, batch_size=2, val_subjects=1, test_subjects=1)
    assert next(iter(dm.train_dataloader()))["image"].shape == (2, 1, 32, 32, 16)
    dm = VolumeDataModule(src, batch_size=2, val_subjects=1, test_subjects=1, patch_size=[16, 16, 8])
    b = next(iter(dm.train_dataloader()))
    assert b["image"].shape == (2, 1, 16, 16, 8) and b["label"].shape == (2, 1, 16, 16, 8)
    assert next(iter(dm.val_dataloader()))["image"].shape == (1, 1, 32, 32, 16)  # whole volumes
    with pytest.raises(ValueError, match="3D source"):
        VolumeDataModule(PhantomSource(PhantomSpec(), 6, (32, 32)))


def test_explicit_subject_splits():
    src = PhantomSource(PhantomSpec(seed=2), num_subjects=10, shape=(32, 32))
    ids = src.ids
    dm = SliceDataModule(src, batch_size=2, splits={"train": ids[:6], "val": ids[6:7], "test": ids[7:]}, train_fraction=0.5)
    assert set(dm.train_ids) <= set(ids[:6]) and len(dm.train_ids) == 3
    assert dm.splits["val"] == ids[6:7] and dm.splits["test"] == sorted(ids[7:])
    with pytest.raises(ValueError, match="more than one split"):
        SliceDataModule(src, splits={"train": ids[:6], "val": ids[5:7], "test": ids[7:]})
    with pytest.raises(ValueError, match="not in the data"):
        SliceDataModule(src, splits={"train": ["nobody"], "val": [], "test": ids[7:]})


def test_domain_shift_changes_images_not_labels_and_is_deterministic():
    from lightning_distill.config import load_config
    from lightning_distill.train import build_source

    over = ["data.num_subjects=3", "data.shape=[64,64]"]
    plain = build_source(load_config(f"{REPO}/experiments/student.yaml", over))
    shift = ["data.phantom.shift.resolution=2", "data.phantom.shift.gamma=0.7", "data.phantom.shift.contrast=0.8",
             "data.phantom.shift.noise=0.05"]
    shifted = build_source(load_config(f"{REPO}/experiments/student.yaml", over + shift))
    a, b, b2 = plain.load(plain.ids[0]), shifted.load(shifted.ids[0]), shifted.load(shifted.ids[0])
    assert (a["label"] == b["label"]).all() and (b["image"] == b2["image"]).all()
    assert b["image"].shape == a["image"].shape and abs(b["image"] - a["image"]).mean() > 0.02
    assert 0.0 <= b["image"].min() and b["image"].max() <= 1.0
    with pytest.raises(ValueError, match="invalid domain shift"):
        build_source(load_config(f"{REPO}/experiments/student.yaml", over + ["data.phantom.shift.resolution=0.5"]))
