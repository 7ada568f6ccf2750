import numpy as np
import pytest
import torch

from conftest import assert_close_to_precision
from lightning_distill.losses.dist import EPS
from lightning_distill.losses import (
    dist_loss,
    masked_class_mean,
    masked_class_sums,
    pearson_rows,
    pixel_dist_loss,
    prototype_dist_loss,
    prototype_dist_terms,
)


def test_masked_class_mean_2d_hand_example():
    # one image 2x2, two channels; labels [[0, 1], [1, 2]], K = 4 (class 3 absent)
    values = torch.tensor([[[[1.0, 2.0], [4.0, 8.0]], [[0.0, 10.0], [20.0, 30.0]]]])  # (1, 2, 2, 2)
    labels = torch.tensor([[[0, 1], [1, 2]]])
    protos, present = masked_class_mean(values, labels, 4)
    expected = torch.tensor([[1.0, 0.0], [3.0, 15.0], [8.0, 30.0], [0.0, 0.0]])
    assert torch.allclose(protos, expected)
    assert present.tolist() == [True, True, True, False]
    sums, counts = masked_class_sums(values, labels[:, None], 4)  # (B, 1, H, W) labels too
    assert counts.tolist() == [1, 2, 1, 0]
    assert torch.allclose(sums[1], torch.tensor([6.0, 30.0]))


def test_masked_class_mean_3d_hand_example_over_batch():
    # two volumes 1x1x2, one channel; class 1 appears in both volumes
    values = torch.tensor([[[[[1.0, 3.0]]]], [[[[5.0, 7.0]]]]])  # (2, 1, 1, 1, 2)
    labels = torch.tensor([[[[0, 1]]], [[[1, 1]]]])  # (2, 1, 1, 2)
    protos, present = masked_class_mean(values, labels, 2)
    assert torch.allclose(protos, torch.tensor([[1.0], [(3.0 + 5.0 + 7.0) / 3]]))
    assert present.all()


def test_masked_class_mean_ignore_index_and_lower_resolution_features():
    values = torch.ones(1, 3, 2, 2)
    labels = torch.tensor([[[0, 255, 1, 1], [0, 255, 1, 1], [2, 2, 1, 1], [2, 2, 1, 1]]])  # 4x4 labels
    sums, counts = masked_class_sums(values, labels, 3)
    # nearest resampling to 2x2 picks labels[0,0]=0, [0,2]=1, [2,0]=2, [2,2]=1
    assert counts.tolist() == [1, 2, 1]
    labels[0, 0, 0] = 255
    _, counts = masked_class_sums(values, labels, 3)
    assert counts.tolist() == [0, 2, 1]  # ignored pixels are left out


@pytest.mark.parametrize("seed", range(5))
def test_prototype_dist_zero_for_identical_inputs(seed):
    p = torch.softmax(torch.randn(5, 5, generator=torch.Generator().manual_seed(seed)), dim=1)
    inter, intra = prototype_dist_terms(p, p.clone())
    # 1 - r for identical vectors is not 0 but EPS / |x - mean|^2 (the loss adds EPS to the
    # denominator) plus float32 rounding amplified by the same 1 / |x - mean|^2: a column of small
    # probabilities has a small spread, so the bound comes from the least-spread row or column
    spread = min(float((v - v.mean(1, keepdim=True)).pow(2).sum(1).min()) for v in (p, p.T))
    bound = (EPS + 8 * torch.finfo(torch.float32).eps) / spread
    assert 0 <= inter.abs() <= bound and 0 <= intra.abs() <= bound, (inter, intra, bound)


def test_prototype_dist_invariant_to_positive_affine_rescaling():
    g = torch.Generator().manual_seed(0)
    p_s, p_t = torch.rand(6, 6, generator=g), torch.rand(6, 6, generator=g)
    inter, intra = prototype_dist_terms(p_s, p_t)
    scale, shift = torch.rand(6, 1, generator=g) + 0.1, torch.randn(6, 1, generator=g)
    inter_rows, _ = prototype_dist_terms(p_s * scale + shift, p_t)  # each row: a*row + b, a > 0
    _, intra_cols = prototype_dist_terms(p_s * scale.T + shift.T, p_t)  # each column: a*col + b
    assert torch.allclose(inter, inter_rows, atol=1e-5)
    assert torch.allclose(intra, intra_cols, atol=1e-5)
    whole = prototype_dist_loss(3.0 * p_s + 0.5, p_t)
    assert torch.allclose(whole, inter + intra, atol=1e-5)


def test_prototype_dist_finite_with_one_or_no_present_class():
    p_s = torch.rand(4, 4, requires_grad=True)
    p_t = torch.rand(4, 4)
    one = torch.tensor([False, True, False, False])
    inter, intra = prototype_dist_terms(p_s, p_t, one)
    assert torch.isfinite(inter) and intra == 0
    loss = prototype_dist_loss(p_s, p_t, torch.zeros(4, dtype=torch.bool))
    assert loss == 0
    loss.backward()  # still differentiable (zero gradient)
    assert torch.isfinite(p_s.grad).all()


def test_prototype_dist_uses_only_present_rows():
    p_s, p_t = torch.rand(4, 4), torch.rand(4, 4)
    present = torch.tensor([True, True, False, True])
    changed = p_s.clone()
    changed[2] = torch.randn(4) * 100  # an absent class's row must not matter
    assert torch.allclose(prototype_dist_loss(p_s, p_t, present), prototype_dist_loss(changed, p_t, present))


def test_prototype_dist_gradient_only_into_student():
    p_s = torch.rand(5, 5, requires_grad=True)
    p_t = torch.rand(5, 5, requires_grad=True)
    prototype_dist_loss(p_s, p_t).backward()
    assert p_s.grad is not None and p_s.grad.abs().sum() > 0
    assert p_t.grad is None


def test_pixel_dist_hand_computed_value():
    # two pixels, two classes; teacher ranks classes opposite to the student on every pixel and
    # across pixels, so every Pearson correlation is -1: inter = intra = 2, loss = beta*2 + gamma*2
    z_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).T.reshape(1, 2, 2, 1)  # B=1, C=2, H=2, W=1
    z_t = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).T.reshape(1, 2, 2, 1)
    assert torch.allclose(pixel_dist_loss(z_s, z_t), torch.tensor(4.0), atol=1e-6)
    assert torch.allclose(pixel_dist_loss(z_s, z_t, beta=0.5, gamma=0.25), torch.tensor(1.5), atol=1e-6)
    assert pixel_dist_loss(z_s, z_s).abs() < 1e-6


def _reference_dist(z_s, z_t, tau):
    """The official formula with numpy's Pearson (np.corrcoef), rows = instances."""
    def softmax(z):
        e = np.exp(z / tau - (z / tau).max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    ys, yt = softmax(z_s), softmax(z_t)
    inter = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ys, yt)])
    intra = 1 - np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(ys.T, yt.T)])
    return tau**2 * (inter + intra)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_pixel_dist_matches_official_formula(tau):
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 5, 3, generator=g), torch.randn(2, 4, 5, 3, generator=g)  # B C H W
    ours = pixel_dist_loss(s, t, tau=tau)
    rows = lambda z: z.movedim(1, -1).reshape(-1, 4).double().numpy()  # noqa: E731
    assert abs(float(ours) - _reference_dist(rows(s), rows(t), tau)) < 1e-5
    # 3D logits take the same path
    s3, t3 = torch.randn(1, 3, 2, 3, 4, generator=g), torch.randn(1, 3, 2, 3, 4, generator=g)
    assert torch.isfinite(pixel_dist_loss(s3, t3))
    assert torch.allclose(dist_loss(s3.movedim(1, -1).reshape(-1, 3), t3.movedim(1, -1).reshape(-1, 3)), pixel_dist_loss(s3, t3))


def test_pearson_and_shape_errors():
    a = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(pearson_rows(a, 2 * a + 1), torch.tensor([1.0]))
    assert torch.allclose(pearson_rows(a, -a), torch.tensor([-1.0]))
    with pytest.raises(ValueError, match="differ in shape"):
        pixel_dist_loss(torch.zeros(1, 2, 3, 3), torch.zeros(1, 3, 3, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        prototype_dist_terms(torch.zeros(3, 3), torch.zeros(3, 4))


def test_batch_dice_equals_monai_dice_loss_in_one_process():
    """The DDP-capable Dice is MONAI's batch Dice (value and gradient) when there is one process."""
    from monai.losses import DiceLoss, MaskedDiceLoss

    from lightning_distill.losses.dice import batch_dice_loss

    g = torch.Generator().manual_seed(0)
    for shape in [(3, 5, 16, 16), (2, 4, 8, 8, 6)]:
        x = torch.randn(*shape, generator=g, requires_grad=True)
        y = torch.randint(0, shape[1], (shape[0], 1, *shape[2:]), generator=g)
        mask = (torch.rand(shape[0], 1, *shape[2:], generator=g) > 0.3).float()
        ref = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(x, y)
        ours = batch_dice_loss(x, y, sync=True)  # no process group: nothing to sum over
        # two implementations of one loss (other reductions): equal to float32 precision, values and gradients
        assert_close_to_precision(ours, ref)
        assert_close_to_precision(torch.autograd.grad(ours, x)[0], torch.autograd.grad(ref, x)[0])
        masked = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=True)(x, y, mask=mask)
        assert_close_to_precision(batch_dice_loss(x, y, mask=mask), masked)
    with pytest.raises(ValueError, match="label must be"):
        batch_dice_loss(torch.zeros(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long))
