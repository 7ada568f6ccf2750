"""Training augmentation (issues 17, 18): MONAI transforms seeded per sample; image and label move together,
labels keep their values, the draws depend on the draw seed alone."""

import numpy as np
import pytest
import torch

from lightning_distill.data.datamodules import SubjectDataset


class _Source:
    """Two subjects: a bright square labelled 1 and a dimmer bar labelled 2 (2D or 3D)."""

    def __init__(self, shape):
        self.shape = shape

    def load(self, sid):
        image = np.zeros((1, *self.shape), np.float32)
        label = np.zeros(self.shape, np.int64)
        image[0, 10:22, 8:20] = 1.0
        label[10:22, 8:20] = 1
        image[0, 30:34, 5:40] = 0.5
        label[30:34, 5:40] = 2
        label[0, 0] = 255  # an ignored pixel stays an ignore value (nearest neighbour), never a class
        return {"image": image, "label": label, "spacing": [1.0] * len(self.shape)}


@pytest.mark.parametrize("shape", [(48, 48), (48, 48, 6)])
def test_affine_moves_image_and_label_together_and_is_seeded(shape):
    ds = SubjectDataset(_Source(shape), ["a", "b"], spatial_augment="affine")
    plain = SubjectDataset(_Source(shape), ["a", "b"])
    a, again, other = ds[(0, 7)], ds[(0, 7)], ds[(0, 8)]
    assert torch.equal(a["image"], again["image"]) and torch.equal(a["label"], again["label"])  # resumable
    assert not torch.equal(a["label"], other["label"])  # another draw, another map
    assert not torch.equal(a["label"], plain[(0, 7)]["label"])  # the map did move things
    assert a["image"].shape == plain[0]["image"].shape and a["label"].shape == plain[0]["label"].shape
    assert set(a["label"].unique().tolist()) <= {0, 1, 2, 255} and a["label"].dtype == torch.int64
    # plain tensors, not MONAI MetaTensors (those spread into prototype sums and checkpoints, which then
    # fail to load with torch.load(weights_only=True))
    assert type(a["image"]) is torch.Tensor and type(a["label"]) is torch.Tensor
    img, lab = a["image"][0], a["label"][0]
    # where the label says square, the image is bright; where it says bar, the image is about 0.5
    assert img[lab == 1].mean() > 0.9 and abs(float(img[lab == 2].mean()) - 0.5) < 0.1
    assert img[lab == 0].mean() < 0.1
    if len(shape) == 3:  # in-plane only: every axial slice is mapped alike
        assert all(torch.equal(lab[..., 0] > 0, lab[..., z] > 0) for z in range(1, shape[2]))


def test_unknown_spatial_augment_is_refused():
    with pytest.raises(ValueError, match="affine"):
        SubjectDataset(_Source((8, 8)), ["a"], spatial_augment="elastic")


def test_config_key_reaches_the_training_set(tiny_student):
    import os

    from lightning_distill.config import load_config
    from lightning_distill.train import build_datamodule

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/data/ -> the repo
    dm = build_datamodule(load_config(os.path.join(repo, "experiments", "student.yaml"),
                                      [*tiny_student, "data.spatial_augment=affine"]))
    dm.setup()
    assert dm.datasets["train"].spatial_augment == "affine" and dm.datasets["val"].spatial_augment == "none"


def _label_values(shape):
    """Labels with non-contiguous values (0, 1, 2, 7) and the ignore index 255."""
    lab = _Source(shape).load("a")["label"]
    lab[36:44, 30:46] = 7
    return lab


class _Labels(_Source):
    def load(self, sid):
        return dict(super().load(sid), label=_label_values(self.shape))


@pytest.mark.parametrize("shape", [(48, 48), (48, 48, 6)])
def test_augmentation_is_seeded_keeps_label_values_and_leaves_global_rngs_alone(shape):
    torch.manual_seed(0)
    np.random.seed(0)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    ds = SubjectDataset(_Labels(shape), ["a"], augment=True, spatial_augment="affine")  # MONAI built on first use, below
    a, again, other = ds[(0, 11)], ds[(0, 11)], ds[(0, 12)]
    # (1) same seed, same output; (2) another seed, another output
    assert torch.equal(a["image"], again["image"]) and torch.equal(a["label"], again["label"])
    assert not torch.equal(a["image"], other["image"]) and not torch.equal(a["label"], other["label"])
    # (3) nearest-neighbour labels with zero padding: only values present before (0 is background)
    before = set(np.unique(_label_values(shape)).tolist())
    for seed in range(20):
        assert set(ds[(0, seed)]["label"].unique().tolist()) <= before
    # (4) neither torch's nor numpy's global RNG was used
    assert torch.equal(torch.get_rng_state(), torch_state)
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


def test_intensity_augmentation_keeps_its_ranges():
    """Scale ``1 + U(-0.1, 0.1)``, then shift ``U(-0.05, 0.05)``, then noise of sd 0.02, read back
    from an image that is 0 on one half and 1 on the other."""

    class Halves:
        def load(self, sid):
            image = np.zeros((1, 64, 64), np.float32)
            image[0, :, 32:] = 1.0
            return {"image": image, "label": np.zeros((64, 64), np.int64), "spacing": [1.0, 1.0]}

    ds = SubjectDataset(Halves(), ["a"], augment=True)
    factors, shifts, sds = [], [], []
    for seed in range(300):
        x = ds[(0, seed)]["image"][0].double()
        shifts.append(float(x[:, :32].mean()))
        factors.append(float(x[:, 32:].mean()) - shifts[-1] - 1.0)
        sds.append(float(torch.cat([x[:, :32] - x[:, :32].mean(), x[:, 32:] - x[:, 32:].mean()]).std()))
    tol = 0.002  # the noise's share of a half's mean
    assert -0.1 - tol <= min(factors) < -0.09 and 0.09 < max(factors) <= 0.1 + tol
    assert -0.05 - tol <= min(shifts) < -0.045 and 0.045 < max(shifts) <= 0.05 + tol
    assert all(abs(sd - 0.02) < 0.001 for sd in sds)
    assert ds[(0, 1)]["label"].eq(0).all()  # intensity augmentation leaves labels alone


@pytest.mark.parametrize("shape", [(48, 48), (48, 48, 6)])
def test_augmentation_equals_monai_with_metadata_and_restores_the_switch(shape):
    """The transforms run with MONAI's metadata tracking off (for speed): the values are those of the same
    ``Compose`` run with tracking on, the outputs are plain tensors, and the switch is as before afterwards,
    also when a transform raises."""
    from monai.data import get_track_meta

    ds = SubjectDataset(_Labels(shape), ["a"], augment=True, spatial_augment="affine")
    raw = ds._load("a")
    for seed in (3, 4):
        out = ds[(0, seed)]
        draw = int(torch.randint(0, 2 ** 31 - 1, (), generator=torch.Generator().manual_seed(seed)))
        assert get_track_meta()  # MONAI's default, restored
        ref = ds.augmentation(raw["image"].shape).set_random_state(seed=draw)(
            {"image": raw["image"], "label": raw["label"].float()})
        assert type(ref["image"]).__name__ == "MetaTensor"  # the reference did track metadata
        assert type(out["image"]) is torch.Tensor and type(out["label"]) is torch.Tensor
        assert torch.equal(out["image"], ref["image"].as_tensor())
        assert torch.equal(out["label"], ref["label"].as_tensor().round().long())

    class Failing:
        def set_random_state(self, seed):
            return self

        def __call__(self, data):
            assert not get_track_meta()
            raise RuntimeError("a transform failed")

    ds.augmentation = lambda shape: Failing()
    with pytest.raises(RuntimeError, match="a transform failed"):
        ds[(0, 3)]
    assert get_track_meta()
