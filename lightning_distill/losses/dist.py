"""DIST: knowledge distillation from a stronger teacher (Huang et al., NeurIPS 2022).

DIST matches *relations* rather than values: the Pearson correlation between the student's and
the teacher's predicted distributions, across classes for each instance (inter-class relation) and
across instances for each class (intra-class relation)::

    Y = softmax(Z / tau) over classes                                   Z: N x C logits
    inter = 1 - mean_i pearson(Y_s[i, :], Y_t[i, :])
    intra = 1 - mean_j pearson(Y_s[:, j], Y_t[:, j])
    L     = tau^2 * (beta * inter + gamma * intra)

``pearson(a, b) = cosine(a - mean(a), b - mean(b))`` with ``eps = 1e-8`` in the denominator, as in the
authors' code (hunto/DIST_KD). Their segmentation recipe treats every pixel as an instance. The
``tau^2`` factor follows mmrazor; at the default ``tau = 1`` both readings agree.

The functions here are pure: the callers decide which tensors are teacher and student, and the
teacher side should come from a frozen network under ``torch.no_grad()``.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

EPS = 1e-8


def pearson_rows(a: Tensor, b: Tensor, eps: float = EPS) -> Tensor:
    """Pearson correlation of matching rows.

    Args:
        a: ``(N, C)``.
        b: ``(N, C)``.
        eps: added to the product of norms.

    Returns:
        ``(N,)`` correlations in ``[-1, 1]``.
    """
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"pearson_rows needs two (N, C) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    a = a - a.mean(dim=1, keepdim=True)
    b = b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + eps)


def inter_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """``1 - mean_i pearson(y_s[i], y_t[i])``: rows are instances, columns classes."""
    return 1.0 - pearson_rows(y_s, y_t).mean()


def intra_class_relation(y_s: Tensor, y_t: Tensor) -> Tensor:
    """``1 - mean_j pearson(y_s[:, j], y_t[:, j])``: the inter relation of the transposes."""
    return inter_class_relation(y_s.transpose(0, 1), y_t.transpose(0, 1))


def dist_terms(y_s: Tensor, y_t: Tensor) -> Tuple[Tensor, Tensor]:
    """Both DIST relation terms of two ``(N, C)`` matrices (no softmax applied here).

    The intra term needs at least two rows; with a single row it is defined as 0 (there is no
    relation across instances to match), so the loss stays finite.
    """
    inter = inter_class_relation(y_s, y_t)
    intra = intra_class_relation(y_s, y_t) if y_s.shape[0] > 1 else y_s.new_zeros(())
    return inter, intra


def dist_loss(z_s: Tensor, z_t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """Classic DIST on ``(N, C)`` logits (Huang et al. 2022, Eq. 9).

    Args:
        z_s: student logits ``(N, C)``.
        z_t: teacher logits ``(N, C)`` (detach them, or compute under ``no_grad``).
        beta: weight of the inter-class term.
        gamma: weight of the intra-class term.
        tau: softmax temperature; the loss is scaled by ``tau**2``.

    Returns:
        Scalar loss.
    """
    y_s = torch.softmax(z_s / tau, dim=1)
    y_t = torch.softmax(z_t / tau, dim=1)
    inter, intra = dist_terms(y_s, y_t)
    return tau**2 * (beta * inter + gamma * intra)


def pixel_dist_loss(logits_s: Tensor, logits_t: Tensor, beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0) -> Tensor:
    """DIST for dense prediction: every pixel/voxel is an instance (Huang et al. 2022, Sec. 4.3).

    Args:
        logits_s: student logits ``(B, C, *spatial)`` (2D or 3D).
        logits_t: teacher logits of the same shape.
        beta, gamma, tau: as in :func:`dist_loss`.

    Returns:
        Scalar loss over the ``B * prod(spatial)`` rows.
    """
    if logits_s.shape != logits_t.shape:
        raise ValueError(f"student and teacher logits differ in shape: {tuple(logits_s.shape)} vs {tuple(logits_t.shape)}")
    if logits_s.ndim < 3:
        raise ValueError(f"pixel_dist_loss expects (B, C, *spatial) logits, got shape {tuple(logits_s.shape)}")
    c = logits_s.shape[1]
    z_s = logits_s.movedim(1, -1).reshape(-1, c)
    z_t = logits_t.movedim(1, -1).reshape(-1, c)
    return dist_loss(z_s, z_t, beta=beta, gamma=gamma, tau=tau)
