"""Intensity fingerprint: checkpoints record the training intensities; predict/test warn on other ranges."""

import json
import os
import re
import shutil
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from conftest import REPO, TINY_STUDENT
from lightning_distill.cli import main
from lightning_distill.fingerprint import LEVELS, advice, intensity_fingerprint, quantile_profile

STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")
CLASSES = "classes=[background,body_wall,muscle,liver,spleen,right_kidney,left_kidney,aorta,vertebra]"


def _to_uint8(folder):
    """Rewrite HU images as 0..255 (the abdominal window [-175, 250] scaled to 8 bits)."""
    for f in folder.iterdir():
        img = nib.load(str(f))
        hu = np.asarray(img.dataobj, np.float32)
        nib.save(nib.Nifti1Image(np.clip((hu + 175) / 425 * 255, 0, 255).astype(np.uint8), img.affine), str(f))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Phantom slices exported as HU (``hu``), their 0..255 rewrite split into a training dataset
    (``u8``, 16 cases) and 4 held-out images (``held``), and MR slices of other subjects (``mr``)."""
    root = tmp_path_factory.mktemp("fingerprint")
    assert main(["phantom", STUDENT_YAML, str(root / "hu"), "data.num_subjects=20", "data.shape=[64,64]"]) == 0
    assert main(["phantom", STUDENT_YAML, str(root / "mr"), "data.num_subjects=3", "data.shape=[64,64]",
                 "data.phantom.modality=MR", "data.phantom.seed=5"]) == 0
    shutil.copytree(root / "hu", root / "u8")
    _to_uint8(root / "u8" / "imagesTr")
    (root / "held").mkdir()
    for i in range(16, 20):
        (root / "u8" / "imagesTr" / f"phantom2_{i:04d}_0000.nii.gz").rename(root / "held" / f"phantom2_{i:04d}_0000.nii.gz")
        (root / "u8" / "labelsTr" / f"phantom2_{i:04d}.nii.gz").unlink()
    (root / "hu_held").mkdir()  # the held-out subjects in HU
    for f in (root / "held").iterdir():
        shutil.copy(root / "hu" / "imagesTr" / f.name, root / "hu_held" / f.name)
    return root


@pytest.fixture(scope="module")
def ckpt(data):
    """A tiny student trained on the 0..255 images with data.nifti.ct_window=[0,255]."""
    out = data / "run"
    assert main(["fit", STUDENT_YAML, f"output_dir={out}", *TINY_STUDENT, "distill.weight=0", "distill.prototypes=null",
                 "data.source=nifti", f"data.nifti.root={data / 'u8'}", "data.nifti.modality=CT",
                 "data.nifti.ct_window=[0,255]", CLASSES]) == 0
    return out / "checkpoints" / "last.ckpt"


def _intensity_warnings(*argv):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(list(map(str, argv))) == 0
    return [str(w.message) for w in caught if "intensities unlike the training data's" in str(w.message)]


def test_checkpoint_and_results_record_the_fingerprint(ckpt, data):
    meta = torch.load(ckpt, weights_only=False)["lightning_distill"]
    fp = meta["intensity"]
    assert fp["num_samples"] == 8 and len(fp["distances"]) == 8 and fp["max_distance"] == max(fp["distances"])
    assert fp["preprocessing"] == {"source": "nifti", "modality": "CT", "ct_window": [0.0, 255.0]}
    assert fp["raw"][0] >= 0 and 200 < fp["raw"][-1] <= 255  # the 0..255 images before scaling (p99: bone)
    assert fp["threshold"] >= 1.5 * fp["max_distance"]
    # calibrated on the validation split too: held out, of the training kind (issue 35)
    assert len(fp["held_out_distances"]) == 4 and fp["threshold"] >= 1.5 * max(fp["held_out_distances"])
    assert len(meta["train_subjects"]) == 8 and meta["data"] == {"source": "nifti", "root": str((data / "u8").resolve())}
    results = json.loads((ckpt.parent.parent / "results.json").read_text())
    assert results["intensity"]["threshold"] == fp["threshold"] and "distances" not in results["intensity"]


def test_hu_input_into_a_model_trained_on_0_255_warns_to_set_ct_window(ckpt, data, tmp_path):
    msgs = _intensity_warnings("predict", ckpt, data / "hu_held", tmp_path / "out")
    assert len(msgs) == 4  # once per input
    for f, msg in zip(sorted((data / "hu_held").iterdir()), msgs):
        assert msg.startswith(f"{f}: intensities unlike") and "threshold" in msg
        raw = torch.load(ckpt, weights_only=False)["lightning_distill"]["intensity"]["raw"]
        assert f"training 0/0/{raw[-1]:.3g}" in msg  # the training's raw p1/p50/p99 next to the input's
        assert "looks like CT in HU" in msg and "set data.nifti.ct_window=[lo,hi]" in msg
    # the HU window the training images were scaled from: the inputs now look like the training data
    assert _intensity_warnings("predict", ckpt, data / "hu_held", tmp_path / "fixed", "data.nifti.ct_window=[-175,250]") == []


def test_mr_input_into_a_ct_model_warns_to_check_the_modality(ckpt, data, tmp_path):
    msgs = _intensity_warnings("predict", ckpt, data / "mr" / "imagesTr", tmp_path / "out")
    assert len(msgs) == 3 and all("data.nifti.modality=MR" in m and "trained on CT" in m for m in msgs)


def test_held_out_images_like_the_training_data_do_not_warn(ckpt, data, tmp_path):
    assert _intensity_warnings("predict", ckpt, data / "held", tmp_path / "out") == []
    assert len(list((tmp_path / "out").iterdir())) == 4


def test_test_command_warns_once_with_the_worst_samples(ckpt, data, tmp_path):
    msgs = _intensity_warnings("test", ckpt, f"data.nifti.root={data / 'hu'}", "--out", tmp_path / "r.json")
    assert len(msgs) == 1 and msgs[0].startswith("4 of 4 test subjects have intensities unlike")
    assert "worst: phantom2_" in msgs[0] and "data.nifti.ct_window" in msgs[0]
    assert _intensity_warnings("test", ckpt, "--out", tmp_path / "own.json") == []  # its own held-out split


def test_quantile_profile_is_deterministic_and_threshold_has_a_floor():
    big = np.random.default_rng(1).normal(0.5, 0.1, (1, 300, 300)).astype(np.float32)  # subsampled
    assert np.array_equal(quantile_profile(big), quantile_profile(big.copy()))
    assert quantile_profile(big)[4] == pytest.approx(0.5, abs=0.01)
    images = {"a": np.linspace(0, 1, 100, dtype=np.float32)[None], "b": np.linspace(0, 1, 100, dtype=np.float32)[None]}
    fp = intensity_fingerprint(images.__getitem__, ["a", "b"], {"source": "nifti", "modality": "none"})
    assert fp["max_distance"] == 0 and fp["threshold"] == pytest.approx(0.05 * 0.98)  # 5 % of the p1..p99 range


@pytest.fixture(scope="module")
def volumes(data):
    """Two held-out volumes of the students' population (subjects 20 and 21: the training data's kind, every level
    of the body where the training slices are of one), in HU (``hu``) and as 0..255 (``u8``)."""
    assert main(["phantom", STUDENT_YAML, str(data / "vols"), "data.num_subjects=22", "data.shape=[64,64,24]"]) == 0
    hu, u8 = data / "vol_hu", data / "vol_u8"
    for d in (hu, u8):
        d.mkdir()
        for i in (20, 21):
            shutil.copy(data / "vols" / "imagesTr" / f"phantom2_{i:04d}_0000.nii.gz", d)
    _to_uint8(u8)
    return hu, u8


def test_held_out_volumes_of_the_training_kind_do_not_warn_and_hu_volumes_do(ckpt, volumes, tmp_path):
    """A volume is judged by its slice closest to the training data: its other levels show another mix of tissues
    at the training's scale (issue 35: judged by the median slice, held-out 0..255 volumes warned)."""
    hu, u8 = volumes
    assert _intensity_warnings("predict", ckpt, u8, tmp_path / "u8") == []
    msgs = _intensity_warnings("predict", ckpt, hu, tmp_path / "hu")  # the wrong scale moves every slice
    assert len(msgs) == 2 and all("looks like CT in HU" in m and "set data.nifti.ct_window=[lo,hi]" in m for m in msgs)


def test_the_suggested_window_makes_the_input_match_and_the_advice_stops(ckpt, data, tmp_path):
    """0..255 images stored as 0..1020 (another bit depth, the same kind): the advice computes the window that
    scales them as the training images were; with it, nothing warns (issue 35: "[lo,hi] mapping ..." repeated)."""
    ten = tmp_path / "ten"
    ten.mkdir()
    for f in sorted((data / "held").iterdir()):
        img = nib.load(str(f))
        nib.save(nib.Nifti1Image((np.asarray(img.dataobj, np.int16) * 4), img.affine), str(ten / f.name))
    msgs = _intensity_warnings("predict", ckpt, ten, tmp_path / "o1")
    assert len(msgs) == 4
    windows = [re.search(r"set data\.nifti\.ct_window=\[([-0-9.e+]+),([-0-9.e+]+)\]", m) for m in msgs]
    lo, hi = float(windows[0][1]), float(windows[0][2])
    # 4 x [0, 255], estimated from one image's p1..p99 against the training median's: an image's p99 (bone) differs
    # from the median's by several percent, so the estimate does too
    assert lo == pytest.approx(0.0, abs=1.0) and hi == pytest.approx(1020.0, rel=0.1)
    assert _intensity_warnings("predict", ckpt, ten, tmp_path / "o2", f"data.nifti.ct_window=[{lo},{hi}]") == []


def test_advice_says_when_no_intensity_setting_helps():
    """An input already on the training's scale gets no window to try (issue 35: the phantom student advised
    data.window for an HU CT, and a user who applied an advised window got the same advice again)."""
    raw = [-1000.0, -900, -500, -80, 20, 45, 70, 300, 700]
    fp = {"levels": list(LEVELS), "raw": raw, "preprocessing": {"source": "nifti", "modality": "CT", "ct_window": [-175.0, 250.0]}}
    same = advice(fp, [r + 3 for r in raw])
    assert "no intensity setting brings it closer" in same and "ct_window=[" not in same
    assert "set data.nifti.ct_window=[-175,250]" in advice(fp, raw, window=[-100.0, 300.0])  # the user changed it: back
    phantom = {"levels": list(LEVELS), "raw": None, "preprocessing": {"source": "phantom", "modality": "CT", "ct_window": [-175.0, 250.0]}}
    real_ct = advice(phantom, raw)
    assert "both CT in HU" in real_ct and "data.window" not in real_ct
