"""Spatial augmentation of training samples (issue 17): image and label move together, seeded and resumable."""

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

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    dm = build_datamodule(load_config(os.path.join(repo, "experiments", "student.yaml"),
                                      [*tiny_student, "data.spatial_augment=affine"]))
    dm.setup()
    assert dm.datasets["train"].spatial_augment == "affine" and dm.datasets["val"].spatial_augment == "none"
