"""Pixel-wise transfer from a teacher's stored predictions (``lightning-distill teach``).

Pure functions on ``(B, K, *spatial)`` tensors, one code path for 2D and 3D:

* :func:`soft_transfer_loss`: ``tau^2 * KL(teacher || softmax(student / tau))`` per pixel (Hinton et al.
  2015's scaling, so the gradient's size does not shrink with ``tau``), averaged over the pixels.
* :func:`hard_transfer_loss`: cross-entropy on the teacher's argmax where its confidence is at least a
  threshold; the other pixels get exactly no gradient.
* :func:`retemper`: probabilities stored at one temperature, read at another.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.data.nifti import IGNORE_INDEX


def soft_transfer_loss(logits: Tensor, target: Tensor, tau: float = 1.0, mask: Optional[Tensor] = None) -> Tensor:
    """``tau^2 * mean KL(target || softmax(logits / tau))`` over the pixels.

    Args:
        logits: the student's ``(B, K, *spatial)`` logits.
        target: the teacher's ``(B, K, *spatial)`` probabilities at ``tau`` (rows summing to 1; a row of
            smaller sum, e.g. zero padding of an augmentation, counts with that weight).
        tau: the temperature of both.
        mask: ``(B, 1, *spatial)`` bool, pixels that count (default: all); the mean is over them.

    Returns:
        A scalar; 0, with gradient 0, when the student's distribution equals the target.

    Raises:
        ValueError: shapes differ or ``tau <= 0``.
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and teacher probabilities {tuple(target.shape)} differ in shape")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    p = target.float()
    log_q = F.log_softmax(logits.float() / tau, dim=1)
    kl = (torch.special.xlogy(p, p) - p * log_q).sum(dim=1, keepdim=True)  # (B, 1, *spatial)
    if mask is None:
        return tau ** 2 * kl.mean()
    m = mask.to(kl.dtype)
    return tau ** 2 * (kl * m).sum() / m.sum().clamp_min(1.0)


def hard_transfer_loss(logits: Tensor, target: Tensor, confidence: Tensor, threshold: float) -> Tensor:
    """Cross-entropy on ``target.argmax(1)`` over the pixels whose ``confidence`` is at least ``threshold``.

    Args:
        logits: ``(B, K, *spatial)``.
        target: ``(B, K, *spatial)`` teacher probabilities (any temperature: only the argmax is used).
        confidence: ``(B, *spatial)`` or ``(B, 1, *spatial)``.
        threshold: in ``[0, 1]``.

    Returns:
        A scalar mean over the kept pixels (0 with no kept pixel, still in the graph).
    """
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and teacher probabilities {tuple(target.shape)} differ in shape")
    conf = confidence.reshape(target.shape[:1] + target.shape[2:])
    keep = conf >= threshold
    if not bool(keep.any()):
        return logits.sum() * 0.0
    labels = target.argmax(dim=1).masked_fill(~keep, IGNORE_INDEX)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX)


def one_hot_target(label: Tensor, num_classes: int) -> Tensor:
    """``(B, K, *spatial)`` one-hot of a ``(B, 1, *spatial)`` label map; ignored pixels get a row of zeros."""
    lbl = label[:, 0].long()
    valid = lbl != IGNORE_INDEX
    oh = F.one_hot(lbl.masked_fill(~valid, 0), num_classes).movedim(-1, 1).float()
    return oh * valid[:, None]


def retemper(prob: Tensor, tau_from: float, tau_to: float) -> Tensor:
    """Probabilities ``softmax(z / tau_from)`` as ``softmax(z / tau_to)``: ``p ** (tau_from / tau_to)``,
    renormalised over dim 1 (exact up to the precision of ``prob``)."""
    if tau_from == tau_to:
        return prob.float()
    q = prob.float().clamp_min(0) ** (tau_from / tau_to)
    return q / q.sum(dim=1, keepdim=True).clamp_min(1e-12)
