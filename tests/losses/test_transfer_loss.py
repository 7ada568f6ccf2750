"""The losses of teacher-labelled slices (lightning_distill/losses/transfer.py; issue 32)."""

import pytest
import torch

from conftest import assert_close_to_precision
from lightning_distill.data.nifti import IGNORE_INDEX
from lightning_distill.losses.transfer import hard_transfer_loss, one_hot_target, retemper, soft_transfer_loss


def _logits(seed=0, shape=(2, 5, 6, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_loss_and_its_gradient_vanish_when_the_student_equals_the_teacher(tau):
    z = _logits().requires_grad_()
    teacher = torch.softmax(z.detach() / tau, 1)
    loss = soft_transfer_loss(z, teacher, tau)
    (g,) = torch.autograd.grad(loss, z)
    # KL of a distribution with itself, summed over 5 float32 terms per pixel: 0 up to float32 rounding of log p
    assert abs(float(loss.detach())) <= 1e-6
    assert float(g.abs().max()) <= 1e-7
    # and a student that differs has a positive loss, which a gradient step lowers
    z2 = _logits(1).requires_grad_()
    l2 = soft_transfer_loss(z2, teacher, tau)
    (g2,) = torch.autograd.grad(l2, z2)
    assert float(l2.detach()) > 0.05
    assert float(soft_transfer_loss(z2.detach() - 50.0 * g2, teacher, tau)) < float(l2.detach())


def test_soft_loss_is_tau_squared_times_the_mean_pixel_kl():
    z, t = _logits(2), torch.softmax(_logits(3), 1)
    tau = 2.0
    q = torch.softmax(z / tau, 1)
    kl = (t * (t.log() - q.log())).sum(1).mean()
    assert_close_to_precision(soft_transfer_loss(z, t, tau), tau ** 2 * kl, rel=1e-5)  # another summation of the same KL
    mask = torch.zeros(2, 1, 6, 7, dtype=torch.bool)
    mask[:, :, :3] = True
    kl_masked = (t * (t.log() - q.log())).sum(1)[:, :3].mean()
    assert_close_to_precision(soft_transfer_loss(z, t, tau, mask=mask), tau ** 2 * kl_masked, rel=1e-5)


def test_hard_loss_gives_pixels_under_the_threshold_exactly_no_gradient():
    z = _logits(4).requires_grad_()
    t = torch.softmax(_logits(5), 1)
    conf = t.max(1).values
    threshold = float(conf.median())
    loss = hard_transfer_loss(z, t, conf, threshold)
    (g,) = torch.autograd.grad(loss, z)
    low = (conf < threshold)[:, None].expand_as(g)
    assert low.any() and (~low).any()
    assert torch.count_nonzero(g[low]) == 0  # ignored pixels: no term at all, so exactly zero
    assert float(g[~low].abs().sum()) > 0
    # the loss is CE on the teacher's argmax over the kept pixels
    keep = conf >= threshold
    expect = torch.nn.functional.cross_entropy(z.detach(), t.argmax(1).masked_fill(~keep, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
    assert_close_to_precision(loss, expect)
    # nothing kept: 0, still a tensor of the graph
    none = hard_transfer_loss(z, t, conf, 1.1)
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_retemper_reads_stored_probabilities_at_another_temperature():
    z = _logits(6)
    p1 = torch.softmax(z, 1)
    for tau in (0.5, 2.0, 4.0):
        assert_close_to_precision(retemper(p1, 1.0, tau), torch.softmax(z / tau, 1), rel=1e-5)
    # from float16 storage (what teach writes): within float16 rounding, raised to the power tau_from / tau_to
    assert torch.allclose(retemper(p1.half(), 1.0, 2.0), torch.softmax(z / 2.0, 1), atol=2e-3)


def test_one_hot_target_leaves_ignored_pixels_out():
    label = torch.tensor([[[[0, 2], [IGNORE_INDEX, 1]]]])
    oh = one_hot_target(label, 3)
    assert oh.shape == (1, 3, 2, 2)
    assert oh[0, :, 1, 0].sum() == 0 and oh[0, 2, 0, 1] == 1 and oh[0, 1, 1, 1] == 1
