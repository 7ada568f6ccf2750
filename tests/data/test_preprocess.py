"""``Preprocess`` against a frozen copy of the hand-written implementation it replaced (issue 18).

The preprocessing defines what a trained model expects, and checkpoints record its settings, so
moving steps onto MONAI transforms must not change a number: ``FrozenPreprocess`` below keeps the
steps that moved onto MONAI (CT window, foreground crop, inversion) as they were at commit 4374088
and inherits the rest. For every option the config allows, on synthetic
volumes (air background, anisotropic and rotated affines, labels with several classes, an all-zero
channel, percentiles at ties, too few non-zero voxels), the images and affines must agree to the
precision of their dtype (tests/conftest.py: ``assert_close_to_precision``), the labels and crop boxes
exactly, the recorded settings exactly, and probabilities mapped back to the input grid to float32
precision with the same argmax (up to ties within that precision). Nothing is stored on disk.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

from conftest import assert_close_to_precision
from lightning_distill.data.preprocess import Preprocess
from lightning_distill.data.sources import mr_percentile_normalise


# ---------------------------------------------------------------------------------------- oracle
class FrozenPreprocess(Preprocess):
    """The steps issue 18 moved onto MONAI, as they were at commit 4374088: the CT window, the
    foreground crop and the inversion. Settings, spatial transforms and the MR steps did not change
    and are inherited."""

    def intensity(self, image: torch.Tensor) -> torch.Tensor:
        if self.modality == "CT":
            lo, hi = self.ct_window
            return ((image.clamp(lo, hi) - lo) / (hi - lo)).float()
        return super().intensity(image)

    def __call__(self, image: np.ndarray, affine: np.ndarray, label: Optional[np.ndarray] = None):
        """Orientation, spacing and intensity by the inherited code (crop and resize off), then the
        former crop (a box around the voxels above the threshold, widened by the margin, no crop
        without foreground) and the resize."""
        from monai.data import MetaTensor
        from monai.transforms import SpatialCrop

        img, lbl, chain = Preprocess.__call__(dataclasses.replace(self, crop_foreground=False, shape=None),
                                              image, affine, label)
        if self.crop_foreground:
            mask = img.as_tensor().amax(0) > self.crop_threshold
            if mask.any():
                idx = torch.nonzero(mask)
                start = (idx.min(0).values - self.crop_margin).clamp_min(0)
                end = torch.minimum(idx.max(0).values + 1 + self.crop_margin, torch.tensor(mask.shape))
                crop = SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())
                img, chain = crop(img), [*chain, crop]  # the inverse needs the very object that cropped
                lbl = None if lbl is None else SpatialCrop(roi_start=start.tolist(), roi_end=end.tolist())(lbl)
        size, size_l = self.spatial("bilinear")[1], self.spatial("nearest")[1]
        if size is not None:
            img, chain = size(img), [*chain, size]
            lbl = None if lbl is None else size_l(lbl.float())
        if lbl is not None:
            lbl = MetaTensor(lbl.as_tensor().round().long(), affine=lbl.affine)
        return img, lbl, chain

    @staticmethod
    def invert(probs: torch.Tensor, reference, chain) -> torch.Tensor:
        from monai.data import MetaTensor
        from monai.transforms import Compose

        p = MetaTensor(probs.float(), affine=reference.affine.clone())
        p.applied_operations = [dict(op) for op in reference.applied_operations]
        return Compose(list(chain)).inverse(p).as_tensor()


# ------------------------------------------------------------------------------------ synthetic data
SHAPE = (20, 17, 9)
KINDS = ("ct", "mr", "ties", "sparse", "single")


def _case(kind: str, seed: int = 0, shape: Sequence[int] = SHAPE) -> Tuple[np.ndarray, np.ndarray]:
    """A ``(C, X, Y, Z)`` float32 image and an ``(X, Y, Z)`` label map with classes 0..3."""
    r = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.65) ** 2 < 1
    lbl = np.zeros(shape, np.int64)
    lbl[body & ((x + 0.3) ** 2 + y ** 2 < 0.12)] = 1
    lbl[body & ((x - 0.35) ** 2 + (y + 0.2) ** 2 < 0.06)] = 2
    lbl[body & (np.abs(x - 0.2) < 0.15) & (np.abs(y - 0.3) < 0.1) & (z >= 0)] = 3
    if kind == "ct":  # HU, air (-1000) around the body
        img = np.where(body, r.normal(40.0, 25.0, shape) + 60.0 * lbl, -1000.0)[None]
    elif kind == "mr":  # 0 around the body, a bias field inside; the second channel is all zero
        mr = np.where(body, r.gamma(4.0, 50.0, shape) * (1.2 + 0.3 * x) + 80.0 * lbl, 0.0)
        img = np.stack([mr, np.zeros(shape)])
    elif kind == "ties":  # a few integer levels: the percentiles fall inside runs of equal values
        img = np.where(body, r.integers(0, 4, shape) * 10.0 + 20.0 * lbl, 0.0)[None]
    elif kind == "sparse":  # < 0.5 % non-zero voxels: both default percentiles are 0 (hi == lo)
        img = np.zeros((1, *shape))
        last = shape[2] - 1
        img[0, 3, 4, min(2, last)], img[0, 10, 8, min(5, last)], img[0, 15, 12, last] = 5.0, 7.0, 500.0
    elif kind == "single":  # one non-zero voxel (the z-score falls back to all voxels); a constant channel
        one = np.zeros(shape)
        one[9, 8, shape[2] // 2] = 250.0
        img = np.stack([one, np.full(shape, 3.0)])
    else:
        raise KeyError(kind)
    return img.astype(np.float32), lbl


def _affine(kind: str) -> np.ndarray:
    """Anisotropic voxel-to-world matrices; ``rot`` also flips x and rotates about z by 20 degrees."""
    if kind == "aniso":
        a = np.diag([0.7, 0.9, 3.0, 1.0])
    else:
        c, s = np.cos(np.radians(20.0)), np.sin(np.radians(20.0))
        a = np.eye(4)
        a[:3, :3] = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([-0.8, 1.1, 2.5])
    a[:3, 3] = [-12.0, 30.5, 7.25]
    return a


# Every intensity option the config allows (data.nifti.modality / ct_window / mr_norm / percentiles) ...
INTENSITY = [
    dict(modality="CT"), dict(modality="CT", ct_window=(-1000.0, 1000.0)), dict(modality="CT", ct_window=(0.0, 255.0)),
    dict(modality="CT", ct_window=(-100.3, 200.7)),
    dict(modality="MR"), dict(modality="MR", percentiles=(0.0, 100.0)), dict(modality="MR", percentiles=(5.0, 95.0)),
    dict(modality="MR", percentiles=(50.0, 50.0)), dict(modality="MR", percentiles=(99.5, 0.5)),
    dict(modality="MR", mr_norm="zscore"), dict(modality="MR", mr_norm="zscore", percentiles=(5.0, 95.0)),
    dict(modality="none"),
]
# ... the foreground crop (off; default; tight; nothing above the threshold; a margin past the edges) ...
CROP = [
    dict(), dict(crop_foreground=True), dict(crop_foreground=True, crop_threshold=0.5, crop_margin=0),
    dict(crop_foreground=True, crop_threshold=1e9), dict(crop_foreground=True, crop_threshold=-1e9, crop_margin=100),
]
# ... and the spatial steps (orientation, spacing with kept axes, resize / pad_crop, a 2D slice).
SPATIAL = [
    dict(spacing=[1.5, 1.5, 2.0], shape=[16, 16, 8]),
    dict(orientation=None),
    dict(orientation="LPS", spacing=[2.0, 0.0, -1.0], shape=[12, 20, 6], resize="pad_crop"),
    dict(orientation="RAS", spacing=[1.2, 1.2], shape=[16, 12, 10], resize="resize"),
]


def _boxes(t) -> list:
    """The crops recorded on a MetaTensor: (size before, voxels cut from each side)."""
    return [(list(np.asarray(op["orig_size"]).tolist()), list(op["extra_info"]["cropped"]))
            for op in t.applied_operations if "cropped" in op.get("extra_info", {})]


def _close(new: torch.Tensor, old: torch.Tensor, what: str):
    """Two implementations of one step (MONAI's and the frozen one): equal to float32 precision, not bit for bit."""
    assert new.shape == old.shape and new.dtype == old.dtype, (what, new.shape, old.shape, new.dtype, old.dtype)
    assert_close_to_precision(new, old, inputs=torch.float64 if new.dtype == torch.float64 else torch.float32, msg=what)


def _compare(kwargs: Dict[str, Any], image: np.ndarray, affine: np.ndarray, label: np.ndarray, what: str):
    """Preprocess and invert one case with both implementations and compare everything a caller sees."""
    new_pre, old_pre = Preprocess(**kwargs), FrozenPreprocess(**kwargs)
    assert new_pre.intensity_settings() == old_pre.intensity_settings(), what
    new_img, new_lbl, new_chain = new_pre(image.copy(), affine.copy(), label.copy())
    old_img, old_lbl, old_chain = old_pre(image.copy(), affine.copy(), label.copy())
    _close(new_img.as_tensor(), old_img.as_tensor(), what + " image")
    assert_close_to_precision(new_img.affine, old_img.affine, inputs=torch.float64, msg=what)  # another product order
    assert torch.equal(new_lbl.as_tensor(), old_lbl.as_tensor()) and new_lbl.dtype == torch.int64, what + " label"
    assert_close_to_precision(new_lbl.affine, old_lbl.affine, inputs=torch.float64, msg=what)
    assert _boxes(new_img) == _boxes(old_img), what + " crop box"
    assert len(new_chain) == len(old_chain), what
    # predict: probabilities on the preprocessed grid back onto the input grid
    k = int(label.max()) + 1
    logits = torch.from_numpy(np.random.default_rng(1).normal(0.0, 3.0, (k, *new_img.shape[1:])).astype(np.float32))
    probs = torch.softmax(logits, 0)
    new_back = Preprocess.invert(probs, new_img, new_chain)
    old_back = FrozenPreprocess.invert(probs, old_img, old_chain)
    assert tuple(old_back.shape) == (k, *image.shape[1:]), what
    _close(new_back, old_back, what + " inverse")
    # the same mask: each side's argmax is a largest probability of the other side too, up to the rounding
    # between the two (where two classes tie within it, either is the argmax; ties of exact zeros outside a
    # crop pick the same index on both sides)
    for a, b in ((new_back, old_back), (old_back, new_back)):
        chosen = b.gather(0, a.argmax(0, keepdim=True))[0]
        assert bool((chosen >= b.max(0).values - 1e-6).all()), what + " inverse argmax"
    assert (new_back.argmax(0) != old_back.argmax(0)).float().mean() < 1e-3, what + " inverse argmax"
    # inverting leaves the image's record intact: the same reference inverts again to the same result
    assert torch.equal(Preprocess.invert(probs, new_img, new_chain), new_back), what + " second inverse"
    assert _boxes(new_img) == _boxes(old_img), what + " crop box after invert"


@pytest.mark.parametrize("intensity", INTENSITY, ids=lambda d: "-".join(f"{v}" for v in d.values()))
@pytest.mark.parametrize("crop", CROP, ids=["nocrop", "crop", "tight", "empty", "wide"])
def test_intensity_and_crop_match_the_frozen_implementation(intensity, crop):
    for kind in KINDS:
        image, label = _case(kind)
        _compare({**SPATIAL[0], **intensity, **crop}, image, _affine("rot"), label, f"{kind} {intensity} {crop}")


@pytest.mark.parametrize("spatial", SPATIAL, ids=["spacing", "no-orientation", "LPS-keep-axes-pad", "2-spacings"])
@pytest.mark.parametrize("affine", ["aniso", "rot"])
def test_spatial_steps_match_the_frozen_implementation(spatial, affine):
    for kind, intensity in itertools.product(KINDS, [INTENSITY[0], INTENSITY[4], INTENSITY[9], INTENSITY[-1]]):
        image, label = _case(kind, seed=3)
        _compare({**spatial, **intensity, "crop_foreground": True}, image, _affine(affine), label,
                 f"{kind} {spatial} {intensity} {affine}")


@pytest.mark.parametrize("intensity", [INTENSITY[0], INTENSITY[4], INTENSITY[6], INTENSITY[9], INTENSITY[-1]])
def test_a_2d_slice_matches_the_frozen_implementation(intensity):
    for kind in KINDS:
        image, label = _case(kind, seed=5, shape=(20, 17, 1))
        for crop in CROP:
            _compare({"shape": [16, 16, 1], **intensity, **crop}, image, np.diag([0.6, 0.6, 5.0, 1.0]), label,
                     f"2D {kind} {intensity} {crop}")


@pytest.mark.parametrize("intensity", INTENSITY, ids=lambda d: "-".join(f"{v}" for v in d.values()))
def test_intensity_on_plain_tensors_matches(intensity):
    """``Preprocess.intensity`` is called on plain tensors too (the phantom's MR normalisation)."""
    for kind in KINDS:
        image = torch.from_numpy(_case(kind, seed=7)[0])
        for x in (image, image.double()):
            new = Preprocess(**intensity).intensity(x)
            assert type(new) is torch.Tensor, type(new)
            _close(new, FrozenPreprocess(**intensity).intensity(x), f"{kind} {intensity} {x.dtype}")


def test_phantom_mr_normalisation_matches():
    for kind in KINDS:
        for c in _case(kind, seed=11)[0]:
            old = FrozenPreprocess(modality="MR", mr_norm="percentile").intensity(torch.from_numpy(c)[None])[0].numpy()
            assert_close_to_precision(mr_percentile_normalise(c), old)


@pytest.mark.parametrize("window", [(100.0, 100.0), (250.0, -175.0)])
def test_a_ct_window_that_is_not_increasing_is_an_error(window):
    """The frozen code gave NaN (lo == hi) or constant (lo > hi) images; MONAI would invert the
    window, so such a window is refused with a clear message instead."""
    image = torch.from_numpy(_case("ct")[0])
    old = FrozenPreprocess(modality="CT", ct_window=window).intensity(image)
    assert bool(old.isnan().all()) or bool((old == 1.0).all())
    pre = Preprocess(modality="CT", ct_window=window)
    with pytest.raises(ValueError, match="ct_window must be"):
        pre.intensity(image)
    with pytest.raises(ValueError, match="ct_window must be"):
        pre(image.numpy(), _affine("aniso"))
    assert pre.intensity_settings() == {"modality": "CT", "ct_window": list(window)}  # still recorded as before
    Preprocess(modality="MR", ct_window=window).intensity(image)  # only the CT step uses the window
