"""Metrics (lightning_distill/metrics.py): surface Dice (normalised surface distance) per case, in summaries and
tables; HD95 and surface Dice from one pass over the boundaries equal MONAI's two functions; the per-case means of
validation."""

import math

import pytest
import torch

import warnings

import numpy as np
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from lightning_distill.metrics import (CaseMeans, collect_cases, format_table, one_hot, per_case_surface_dice,
                                       per_case_surface_metrics, summarize)


def _square(shift: int = 0, size: int = 16) -> torch.Tensor:
    """A ``(1, 1, size, size)`` label map: a 6x6 square of class 1 at rows 4..9, columns 4+shift..9+shift."""
    m = torch.zeros(1, 1, size, size, dtype=torch.long)
    m[..., 4:10, 4 + shift:10 + shift] = 1
    return m


def test_identical_masks_score_one():
    sq = _square()
    assert per_case_surface_dice(sq, sq, 2).tolist() == [[1.0]]


def test_square_shifted_by_two_pixels_hand_computed():
    # Boundary pixels (MONAI, no subvoxels: the mask minus its erosion) of a 6x6 square: 20.
    # Ground truth G: rows 4..9 x columns 4..9; prediction P: the same shifted right by 2 (columns 6..11).
    # Distances of P's boundary pixels to G's boundary (pixels, spacing 1):
    #   top and bottom rows, columns 6..9: on G's top/bottom row            -> 0 (8 pixels)
    #   top and bottom rows, columns 10, 11: nearest is G's corner (4|9, 9) -> 1, 2 (each row)
    #   left column 6, rows 5..8: G's top/bottom row or G's left column 4   -> 1, 2, 2, 1
    #   right column 11, rows 5..8: G's right column 9                      -> 2, 2, 2, 2
    # Within 1 pixel: 8 + 2 + 2 = 12 of 20; by symmetry G -> P also 12 of 20.
    # NSD = (12 + 12) / (20 + 20) = 0.6. With a tolerance >= 2 pixels every distance counts: 1.0.
    pred, gt = _square(shift=2), _square()
    assert per_case_surface_dice(pred, gt, 2).item() == pytest.approx(0.6)  # default: one voxel
    assert per_case_surface_dice(pred, gt, 2, tolerance_mm=1.0).item() == pytest.approx(0.6)
    assert per_case_surface_dice(pred, gt, 2, tolerance_mm=3.0).item() == pytest.approx(1.0)


def test_tolerance_is_in_mm_and_follows_spacing():
    pred, gt = _square(shift=2), _square()
    # a fixed 1 mm tolerance: coarser pixels make the same 2-pixel shift larger in mm -> stricter
    coarse = per_case_surface_dice(pred, gt, 2, spacing=[[2.0, 2.0]], tolerance_mm=1.0).item()
    assert coarse == pytest.approx(0.4) and coarse < 0.6  # only the 8 zero distances per side count: 16/40
    # anisotropic: the shift is along the last axis; at 0.5 mm there the shift is 1 mm -> within 1 mm
    fine = per_case_surface_dice(pred, gt, 2, spacing=[[1.0, 0.5]], tolerance_mm=1.0).item()
    assert fine == pytest.approx(1.0)
    # default tolerance = one voxel = the case's largest spacing: isotropic scaling changes nothing
    assert per_case_surface_dice(pred, gt, 2, spacing=[[2.0, 2.0]]).item() == pytest.approx(0.6)
    # and the largest spacing (1 mm here) is used, not the smallest
    assert per_case_surface_dice(pred, gt, 2, spacing=[[1.0, 0.5]]).item() == pytest.approx(1.0)


def test_tolerance_is_per_case_when_spacing_differs_in_a_batch():
    pred, gt = torch.cat([_square(shift=2)] * 2), torch.cat([_square()] * 2)
    out = per_case_surface_dice(pred, gt, 2, spacing=[[1.0, 1.0], [2.0, 2.0]])
    assert out[:, 0].tolist() == pytest.approx([0.6, 0.6])  # one voxel each
    out = per_case_surface_dice(pred, gt, 2, spacing=[[1.0, 1.0], [2.0, 2.0]], tolerance_mm=1.0)
    assert out[:, 0].tolist() == pytest.approx([0.6, 0.4])


def test_absent_classes():
    empty, sq = _square() * 0, _square()
    # ground truth lacks the class: NaN whether or not it is predicted (MONAI gives 0 for a false positive)
    assert math.isnan(per_case_surface_dice(sq, empty, 2).item())
    assert math.isnan(per_case_surface_dice(empty, empty, 2).item())
    # ground truth has it, prediction empty: 0
    assert per_case_surface_dice(empty, sq, 2).item() == 0.0
    # several classes, one case: class 2 absent from both -> NaN, class 1 perfect
    three = per_case_surface_dice(sq, sq, 3)
    assert three.shape == (1, 2) and three[0, 0] == 1.0 and math.isnan(three[0, 1])


def test_3d_and_batch_shapes():
    gt = torch.zeros(2, 1, 12, 12, 8, dtype=torch.long)
    gt[:, :, 3:9, 3:9, 2:6] = 1
    gt[1, :, 0:2, 0:2, 0:2] = 2
    pred = gt.clone()
    pred[0] = 0
    pred[0, :, 3:9, 4:10, 2:6] = 1  # shifted by one voxel along the second axis
    out = per_case_surface_dice(pred, gt, 3, spacing=[[1.0, 1.0, 2.0], [1.0, 1.0, 2.0]])
    assert out.shape == (2, 2)
    assert 0.0 < out[0, 0] <= 1.0 and math.isnan(out[0, 1])  # case 0 has no class 2
    assert out[1].tolist() == [1.0, 1.0]
    # a 1-voxel shift is within one voxel (2 mm, the largest spacing) -> 1; strict 0 mm tolerance -> less
    assert out[0, 0] == pytest.approx(1.0)
    assert per_case_surface_dice(pred[:1], gt[:1], 3, spacing=[[1.0, 1.0, 2.0]], tolerance_mm=0.0)[0, 0] < 1.0


def _monai_hd95_and_nsd(pred, label, k, spacing, tol):
    """HD95 and NSD as MONAI's two functions give them, with the package's rules for empty masks (the module
    docstring): the diagonal for a missed organ, NaN without ground truth."""
    p, y = one_hot(pred, k), one_hot(label, k)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(p, y, include_background=False, percentile=95, spacing=[list(s) for s in spacing])
        nsd = torch.cat([compute_surface_dice(p[i:i + 1], y[i:i + 1], class_thresholds=[tol or max(spacing[i])] * (k - 1),
                                              include_background=False, spacing=[list(spacing[i])]) for i in range(len(p))])
    gt, pr = y[:, 1:].flatten(2).sum(-1) > 0, p[:, 1:].flatten(2).sum(-1) > 0
    diag = torch.tensor([math.sqrt(sum((n * s) ** 2 for n, s in zip(p.shape[2:], row))) for row in spacing])
    hd = torch.where(gt & ~pr, diag[:, None].expand_as(hd), hd.float())
    nan = torch.full_like(hd, float("nan"))
    return torch.where(gt, hd, nan), torch.where(gt, nsd.float(), nan)


@pytest.mark.parametrize("shape,tol", [((3, 24, 20), None), ((3, 24, 20), 2.5), ((3, 16, 12, 8), None)])
def test_one_pass_equals_monais_hausdorff_and_surface_dice(shape, tol):
    """Blocks of 4 classes, one case with an organ missed and one with an organ absent from the ground truth,
    anisotropic spacing per case. Both sides take the same boundary distances (one MONAI function) and the same
    quantile and counts, so the values are equal exactly, not within a tolerance."""
    g = torch.Generator().manual_seed(0)
    k = 4
    coarse = torch.randint(0, k, (shape[0], *(n // 4 for n in shape[1:])), generator=g)
    coarse.flatten(1)[:, :k] = torch.arange(k)  # every class in every case
    label = coarse
    for d in range(1, len(shape)):  # 4-voxel blocks
        label = label.repeat_interleave(4, dim=d)
    pred = label.clone()
    noise = torch.rand(shape, generator=g) < 0.15
    pred[noise] = torch.randint(0, k, shape, generator=g)[noise]
    pred[0][pred[0] == 2] = 0    # class 2 missed on case 0
    label[1][label[1] == 3] = 1  # class 3 absent from case 1's ground truth (a false positive stays)
    spacing = np.array([[1.0, 0.7, 2.0, 1.5][:len(shape) - 1], [0.8, 0.8, 1.0, 3.0][:len(shape) - 1]]
                       + [[1.2] * (len(shape) - 1)] * (shape[0] - 2))
    hd, nsd = per_case_surface_metrics(pred, label, k, spacing, tol)
    ref_hd, ref_nsd = _monai_hd95_and_nsd(pred, label, k, spacing, tol)
    torch.testing.assert_close(hd, ref_hd, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(nsd, ref_nsd, rtol=0, atol=0, equal_nan=True)
    assert math.isnan(hd[1, 2]) and math.isnan(nsd[1, 2])          # no ground truth of class 3 on case 1
    assert nsd[0, 1] == 0 and hd[0, 1] == pytest.approx(math.sqrt(sum((n * s) ** 2 for n, s in zip(shape[1:], spacing[0]))))
    assert torch.isfinite(hd[:, 0]).all() and (nsd[:, 0] > 0).all()  # class 1: present everywhere, found everywhere


def test_summaries_cases_and_table_carry_surface_dice():
    organs = ["liver", "spleen"]
    dice = torch.tensor([[0.9, float("nan")], [0.7, 0.5]])
    hd = torch.tensor([[2.0, float("nan")], [4.0, 6.0]])
    sd = torch.tensor([[0.8, float("nan")], [0.6, 0.4]])
    s = summarize(dice, hd, organs, surface_dice=sd)
    assert s["surface_dice"] == {"liver": pytest.approx(0.7), "spleen": pytest.approx(0.4)}
    assert s["surface_dice_mean"] == pytest.approx(0.55)
    assert "surface_dice" not in summarize(dice, hd, organs) and "surface_dice_mean" not in summarize(dice, None, organs)
    cases = collect_cases(["a", "b"], dice, hd, organs, surface_dice=sd)
    assert cases[0]["surface_dice"] == {"liver": pytest.approx(0.8), "spleen": None}
    assert "surface_dice" not in collect_cases(["a", "b"], dice, hd, organs)[0]
    table = format_table(s, "t")
    assert "| organ | Dice | surface Dice | HD95 (mm) |" in table and "| spleen | 0.500 | 0.400 | 6.0 |" in table
    assert "**0.550**" in table
    old = format_table(summarize(dice, hd, organs))
    assert "surface Dice" not in old and "| organ | Dice | HD95 (mm) |" in old
    assert all(ln.count("|") == table.splitlines()[1].count("|") for ln in table.splitlines()[1:])


def test_case_means_in_one_process_equal_torchmetrics_mean():
    from torchmetrics import MeanMetric

    g = torch.Generator().manual_seed(0)
    chunks = [torch.rand(3, 4, generator=g) for _ in range(5)]
    chunks[1][0, 2] = float("nan")
    means, ref = CaseMeans(4), [MeanMetric(nan_strategy="ignore") for _ in range(4)]
    for n, c in enumerate(chunks):
        means.update([f"{n}-{i}" for i in range(3)], c)
        for j, m in enumerate(ref):
            m.update(c[:, j].clone())  # a contiguous column, as CaseMeans passes it: the very same computation
    assert torch.equal(means.compute(), torch.stack([m.compute() for m in ref]))  # the same MeanMetric updates
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        means.update(["a", "b"], torch.zeros(2, 3))
