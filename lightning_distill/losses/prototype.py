"""Class prototypes and the extended DIST loss between prototype matrices.

Yu et al. 2024, "Enhancing Single-Slice Segmentation with 3D-to-2D Unpaired Scan Distillation"
(arXiv 2406.12254): the centroid of class k is the mean, over the voxels labelled k, of a per-voxel
vector X (``z_k = sum_i X_i 1[y_i = k] / sum_i 1[y_i = k]``). With ``X = softmax(logits / tau)`` the
prototypes form a K x K matrix whose row k is the mean predicted distribution of class-k voxels; with
X a feature vector they form a K x D matrix. The student is pulled towards the teacher's bank with
DIST applied to the two matrices: inter-class relation over rows, intra-class relation over
columns, both restricted to the classes present in the student's batch (and in the bank).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.losses.dist import dist_terms


def _labels_like(labels: Tensor, values: Tensor) -> Tensor:
    """Labels as ``(B, *spatial)`` int64 at the spatial size of ``values`` (nearest resampling)."""
    if labels.ndim == values.ndim:  # (B, 1, *spatial)
        if labels.shape[1] != 1:
            raise ValueError(f"labels must be (B, *spatial) or (B, 1, *spatial), got {tuple(labels.shape)}")
        labels = labels[:, 0]
    if labels.ndim != values.ndim - 1 or labels.shape[0] != values.shape[0]:
        raise ValueError(f"labels {tuple(labels.shape)} do not match values {tuple(values.shape)} (B, C, *spatial)")
    if labels.shape[1:] != values.shape[2:]:
        labels = F.interpolate(labels[:, None].float(), size=values.shape[2:], mode="nearest")[:, 0]
    return labels.long()


def masked_class_sums(values: Tensor, labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Per-class sums and counts of per-pixel vectors; one routine for 2D and 3D.

    Args:
        values: ``(B, C, *spatial)`` per-pixel vectors (softmax probabilities or features).
        labels: ``(B, *spatial)`` or ``(B, 1, *spatial)`` integer labels. Values outside
            ``[0, num_classes)`` (an ignore index such as 255 or -1) are left out. If the spatial
            size differs from ``values`` (features at a lower resolution), labels are resampled
            with nearest neighbour.
        num_classes: K.

    Returns:
        ``(sums, counts)``: ``(K, C)`` float sums (in float32 or wider) and ``(K,)`` pixel counts.
    """
    labels = _labels_like(labels, values)
    b, c = values.shape[:2]
    v = values.reshape(b, c, -1).float()
    y = labels.reshape(b, -1)
    valid = (y >= 0) & (y < num_classes)
    onehot = F.one_hot(torch.where(valid, y, 0), num_classes).to(v.dtype) * valid[..., None].to(v.dtype)
    sums = torch.einsum("bnk,bcn->kc", onehot, v)
    counts = onehot.sum(dim=(0, 1))
    return sums, counts


def class_means(sums: Tensor, counts: Tensor) -> Tensor:
    """``sums / counts`` per row; rows of absent classes (count 0) are 0."""
    return sums / counts.clamp_min(1)[:, None]


def masked_class_mean(values: Tensor, labels: Tensor, num_classes: int) -> Tuple[Tensor, Tensor]:
    """Class prototypes of a batch.

    Returns:
        ``(prototypes, present)``: ``(K, C)`` means (0 rows for absent classes) and a ``(K,)`` bool
        mask of the classes that occur in ``labels``.
    """
    sums, counts = masked_class_sums(values, labels, num_classes)
    return class_means(sums, counts), counts > 0


def prototype_dist_terms(p_s: Tensor, p_t: Tensor, present: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Inter- and intra-class DIST relation terms between two prototype matrices.

    Args:
        p_s: student prototypes ``(K, C)`` (carries the gradient).
        p_t: teacher prototypes ``(K, C)`` (a constant: the bank; detached here, so no gradient
            ever reaches the teacher side).
        present: ``(K,)`` bool mask; only these rows enter the loss. ``None`` uses all rows.

    Returns:
        ``(inter, intra)``: inter = 1 - mean Pearson over the selected rows (each row's correlation
        across its C entries); intra = 1 - mean Pearson over the C columns restricted to the selected
        rows (0 when fewer than two rows are selected). With no row selected both are 0.
    """
    if p_s.shape != p_t.shape:
        raise ValueError(f"student prototypes {tuple(p_s.shape)} and teacher prototypes {tuple(p_t.shape)} differ in shape")
    p_t = p_t.detach()
    if present is not None:
        p_s, p_t = p_s[present], p_t[present]
    if p_s.shape[0] == 0:
        zero = p_s.sum() * 0.0
        return zero, zero
    return dist_terms(p_s, p_t.to(p_s.dtype))


def prototype_dist_loss(p_s: Tensor, p_t: Tensor, present: Optional[Tensor] = None, beta: float = 1.0, gamma: float = 1.0) -> Tensor:
    """``beta * inter + gamma * intra`` of :func:`prototype_dist_terms`."""
    inter, intra = prototype_dist_terms(p_s, p_t, present)
    return beta * inter + gamma * intra
