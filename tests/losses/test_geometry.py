"""What the prototype-DIST geometries do (issue 16): towards the teacher's bank, and how strongly.

The bank used here is the default teacher's (``tests/fixtures/default_teacher_bank.json``: its provenance
is in the file): a confident teacher, diagonal 0.81-0.98.
"""

import json
import os

import pytest
import torch

from conftest import REPO
from lightning_distill.losses.prototype import (
    GEOMETRIES,
    identity_distances,
    masked_pearson_rows,
    prototype_dist_loss,
    prototype_dist_terms,
)

@pytest.fixture(scope="module")
def bank():
    with open(os.path.join(REPO, "tests", "fixtures", "default_teacher_bank.json")) as f:
        return torch.tensor(json.load(f)["prototypes"])


def _offdiag_rank_agreement(s: torch.Tensor, t: torch.Tensor) -> float:
    """Mean over rows of the Spearman correlation of the off-diagonal entries: does the student rank
    each class's confusions as the teacher does? (A neutral judge: every geometry is monotone in it.)"""
    k = t.shape[0]
    off = ~torch.eye(k, dtype=torch.bool)
    ranks = lambda x: x[off].view(k, k - 1).argsort(1).argsort(1).float()  # noqa: E731
    corr, _ = masked_pearson_rows(ranks(s), ranks(t), torch.ones(k, k - 1, dtype=torch.bool))
    return float(corr.mean())


def _uniform_confusion(k: int, diag: float) -> torch.Tensor:
    s = torch.full((k, k), (1 - diag) / (k - 1))
    s.fill_diagonal_(diag)
    return s


def test_identity_degeneracy_of_the_default_bank_is_recorded(bank):
    """The figures docs/geometry.md explains. A change of them must be deliberate (update both)."""
    d = identity_distances(bank)
    assert d["prob"] == pytest.approx((0.0034, 0.0010), abs=1e-4)  # the literal reading: ~blind
    assert d["logprob"] == pytest.approx((0.2833, 0.1836), abs=1e-3)
    assert d["offdiag"] == pytest.approx((1.0, 1.0), abs=1e-6)  # the identity has no off-diagonal structure
    # Pearson is blind to a row's confidence: diagonals 0.95 / 0.70 / 0.40 give the same figures in
    # every geometry (confidence is the segmentation loss's business)
    for g in GEOMETRIES:
        values = [prototype_dist_terms(_uniform_confusion(9, c), bank, geometry=g) for c in (0.95, 0.7, 0.4)]
        for inter, intra in values[1:]:
            assert float(inter) == pytest.approx(float(values[0][0]), abs=1e-5)
            assert float(intra) == pytest.approx(float(values[0][1]), abs=1e-5)


def test_prob_is_blind_to_the_off_diagonal_pattern_the_others_see_it(bank):
    """A student right on every diagonal entry but with the teacher's confusions in a shuffled order:
    ``prob`` barely notices, ``logprob`` and ``offdiag`` do."""
    k = bank.shape[0]
    g = torch.Generator().manual_seed(0)
    shuffled = bank.clone()
    for i in range(k):
        cols = [j for j in range(k) if j != i]
        perm = [cols[p] for p in torch.randperm(k - 1, generator=g)]
        shuffled[i, cols] = bank[i, perm]
    seen = {geo: float(prototype_dist_loss(shuffled, bank, geometry=geo)) for geo in GEOMETRIES}
    assert seen["prob"] < 0.02  # of a range [0, 4]: nearly the identity's 0.0044
    assert seen["logprob"] > 0.5 and seen["offdiag"] > 1.0  # (0.94 and 2.03 with this shuffle)


def test_prob_gradient_on_a_confident_student_is_tiny(bank):
    """At a confident student with flat confusions (where CE leaves a student), the literal reading's
    gradient on the logits is >100x smaller than the log-probability geometry's."""
    k = bank.shape[0]
    grads = {}
    for geo in GEOMETRIES:
        z = (4 * torch.eye(k) + 0.01 * torch.randn(k, k, generator=torch.Generator().manual_seed(0))).requires_grad_()
        prototype_dist_loss(torch.softmax(z, 1), bank, geometry=geo).backward()
        grads[geo] = float(z.grad.norm())
    assert grads["prob"] < 1e-3
    assert grads["logprob"] > 100 * grads["prob"] and grads["offdiag"] > 100 * grads["prob"]


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_optimising_free_logits_moves_them_to_the_banks_confusions_and_stops_there(bank, geometry):
    """Free student logits (one row per class), confident with flat confusions, optimised under the
    loss alone: the student comes to rank every class's confusions as the teacher does, the loss goes
    to ~0, and it stays there."""
    k = bank.shape[0]
    z = (4 * torch.eye(k) + 0.01 * torch.randn(k, k, generator=torch.Generator().manual_seed(0))).requires_grad_()
    before = _offdiag_rank_agreement(torch.softmax(z, 1).detach(), bank)
    opt = torch.optim.Adam([z], lr=0.05)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            loss = prototype_dist_loss(torch.softmax(z, 1), bank, geometry=geometry)
            loss.backward()
            opt.step()
        return float(loss.detach())

    loss = steps(300)
    reached = torch.softmax(z, 1).detach().clone()
    after = _offdiag_rank_agreement(reached, bank)
    assert before < 0.2 and after > 0.85, (before, after)
    assert loss < 0.005
    assert steps(100) < 0.005  # stays at the optimum ...
    assert (torch.softmax(z, 1).detach() - reached).abs().max() < 0.05  # ... and near where it was


@pytest.mark.parametrize("geometry", GEOMETRIES)
def test_degenerate_inputs_give_finite_documented_values(geometry):
    k = 5
    g = torch.Generator().manual_seed(1)
    p_t = torch.softmax(torch.randn(k, k, generator=g) + 3 * torch.eye(k), 1)
    p_s = torch.softmax(torch.randn(k, k, generator=g), 1).requires_grad_()
    none = torch.zeros(k, dtype=torch.bool)
    one = torch.tensor([False, True, False, False, False])
    two = torch.tensor([True, True, False, False, False])
    inter, intra = prototype_dist_terms(p_s, p_t, none, geometry=geometry)
    assert inter == 0 and intra == 0  # no class: nothing to relate
    for present in (one, two):
        inter, intra = prototype_dist_terms(p_s, p_t, present, geometry=geometry)
        # a row has K (offdiag: K - 1) >= 3 entries: a real correlation; a column of a 1x1 or 2x2
        # sub-matrix has < 3 entries (+-1 or undefined): left out, so intra is 0, not a meaningless +-1
        assert torch.isfinite(inter) and 0 < float(inter.detach()) < 2
        assert intra == 0
        (inter + intra).backward()
        assert torch.isfinite(p_s.grad).all()
        p_s.grad = None
    # absent classes' columns do not enter the intra term
    three = torch.tensor([True, True, True, False, False])
    changed = p_s.detach().clone()
    changed[:, 3:] = torch.rand(k, 2, generator=g)
    assert torch.allclose(prototype_dist_terms(p_s, p_t, three, geometry=geometry)[1],
                          prototype_dist_terms(changed, p_t, three, geometry=geometry)[1], atol=1e-6)
    # an all-zero student row (a class absent from the batch) and a zero teacher entry stay finite
    zero = p_s.detach().clone()
    zero[2] = 0
    t0 = p_t.clone()
    t0[0, 1] = 0
    assert all(torch.isfinite(v) for v in prototype_dist_terms(zero, t0, geometry=geometry))


def test_constant_teacher_vector_is_left_out():
    """A teacher row with every entry equal carries no relation: it is not counted (not a loss of 1)."""
    p_t = torch.tensor([[0.25, 0.25, 0.25, 0.25], [0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1], [0.1, 0.1, 0.1, 0.7]])
    p_s = torch.softmax(torch.randn(4, 4, generator=torch.Generator().manual_seed(0)), 1)
    inter, _ = prototype_dist_terms(p_s, p_t)
    corr, valid = masked_pearson_rows(p_s, p_t, torch.ones(4, 4, dtype=torch.bool))
    assert valid.tolist() == [False, True, True, True]
    assert float(inter) == pytest.approx(1 - float(corr[1:].mean()), abs=1e-6)


def test_row_weights_weight_and_drop_rows():
    k = 4
    g = torch.Generator().manual_seed(2)
    p_t = torch.softmax(torch.randn(k, k, generator=g) + 2 * torch.eye(k), 1)
    p_s = torch.softmax(torch.randn(k, k, generator=g), 1)
    corr, _ = masked_pearson_rows(p_s, p_t, torch.ones(k, k, dtype=torch.bool))
    w = torch.tensor([1.0, 0.5, 0.0, 0.25])
    inter, _ = prototype_dist_terms(p_s, p_t, row_weights=w)
    assert float(inter) == pytest.approx(1 - float((w * corr).sum() / w.sum()), abs=1e-6)
    changed = p_s.clone()
    changed[2] = torch.rand(k, generator=g)  # a dropped row (weight 0) matters in neither term
    assert torch.allclose(torch.stack(prototype_dist_terms(p_s, p_t, row_weights=w)),
                          torch.stack(prototype_dist_terms(changed, p_t, row_weights=w)), atol=1e-6)


def test_geometry_errors():
    p = torch.softmax(torch.randn(3, 3), 1)
    with pytest.raises(ValueError, match="logprob"):
        prototype_dist_terms(p, p, geometry="log")
    with pytest.raises(ValueError, match="feature-space"):
        prototype_dist_terms(torch.randn(3, 8), torch.randn(3, 8), space="feature", geometry="offdiag")
    with pytest.raises(ValueError, match="K x K"):
        prototype_dist_terms(torch.randn(3, 8), torch.randn(3, 8))
    inter, intra = prototype_dist_terms(torch.randn(4, 8), torch.randn(4, 8), space="feature")
    assert torch.isfinite(inter) and torch.isfinite(intra) and float(intra) > 0  # feature columns over 4 rows


