"""Class prototypes and the extended DIST loss between prototype matrices.

Yu et al. 2024, "Enhancing Single-Slice Segmentation with 3D-to-2D Unpaired Scan Distillation"
(arXiv 2406.12254): the centroid of class k is the mean, over the voxels labelled k, of a per-voxel
vector X (``z_k = sum_i X_i 1[y_i = k] / sum_i 1[y_i = k]``). With ``X = softmax(logits / tau)`` the
prototypes form a K x K matrix whose row k is the mean predicted distribution of class-k voxels; with
X a feature vector they form a K x D matrix. The student is pulled towards the teacher's bank with
DIST applied to the two matrices: inter-class relation over rows, intra-class relation over
columns, both restricted to the classes present in the student's batch (and in the bank).

Geometries (``distill.geometry``; docs/geometry.md has the measured figures). A Pearson correlation
is blind to a positive affine map of its vector, and a confident teacher's row is nearly one-hot, so
on probabilities (``prob``, the paper's literal reading) every student row that puts most mass on
the right class correlates ~1 with it whatever its confidence or its confusions. The other
geometries compare what the diagonal hides:

* ``prob``: Pearson on the rows/columns of the probability prototypes (the paper).
* ``logprob``: Pearson on ``log(max(P, floor))``: the optimum is a student row proportional to the
  teacher's row raised to some power (the teacher's row at another temperature), so the ranking and
  ratios of the confusions count, not only the argmax.
* ``offdiag``: Pearson on the off-diagonal entries only (rows: ``P[k, j != k]``; columns:
  ``P[i != j, j]``), in the spirit of DKD's non-target term; the diagonal (the confidence) is left to
  the segmentation loss. Renormalising a row's off-diagonal part to a distribution, as DKD does,
  would not change a Pearson correlation, so it is not done.

Degenerate cases (documented values, no NaN): a Pearson correlation over fewer than 3 entries is
always +-1 (2 entries) or undefined (1), and one against a constant teacher vector carries no
relation; such vectors are left out. A term with no vector left is 0 (with a zero gradient). The
intra term uses the square present x present sub-matrix of a K x K bank (columns of absent classes
are not relations the batch can match); for a K x D feature bank, every feature column over the
present rows.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_reduce

from lightning_distill.devices import process_group_size
from lightning_distill.losses.dist import EPS


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
    # float32 whatever the surrounding autocast: under 16-mixed the einsum would run in fp16, where the
    # background row of one 8 x 128^2 batch (~80k probabilities) overflows 65504 (inf, then NaN)
    with torch.autocast(values.device.type, enabled=False):
        v = values.reshape(b, c, -1).float()
        y = labels.reshape(b, -1)
        valid = (y >= 0) & (y < num_classes)
        onehot = F.one_hot(torch.where(valid, y, 0), num_classes).to(v.dtype) * valid[..., None].to(v.dtype)
        sums = torch.einsum("bnk,bcn->kc", onehot, v)
        counts = onehot.sum(dim=(0, 1))
    return sums, counts


def all_reduce_class_sums(sums: Tensor, counts: Tensor) -> Tuple[Tensor, Tensor]:
    """Sum ``(K, C)`` class sums and ``(K,)`` counts over the DDP processes, differentiably.

    Under DDP every process then forms the prototypes of the global batch, so N processes with
    batches of B compute the prototype-DIST terms of one process with a batch of N x B (a small
    per-GPU batch no longer loses the classes that only another process's slices hold). The
    gradient matches one process as well: the all-reduce's backward sums the processes' (equal)
    upstream gradients and DDP's averaging divides by N again (as :func:`~lightning_distill.losses.dice.batch_dice_loss`).
    Without an initialised process group of more than one process, the inputs are returned as they are.
    """
    if process_group_size() == 1:
        return sums, counts

    both = all_reduce(torch.cat([sums, counts.to(sums.dtype)[:, None]], dim=1), op=dist.ReduceOp.SUM)
    return both[:, :-1], both[:, -1]


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


GEOMETRIES: Tuple[str, ...] = ("prob", "logprob", "offdiag")
LOG_FLOOR = 1e-4
MIN_ENTRIES = 3  # a Pearson correlation over fewer entries is +-1 or undefined


def masked_pearson_rows(a: Tensor, b: Tensor, mask: Tensor, eps: float = EPS) -> Tuple[Tensor, Tensor]:
    """Pearson correlation of matching rows over the entries where ``mask`` is true.

    Args:
        a: ``(N, C)`` (the student side).
        b: ``(N, C)`` (the teacher side).
        mask: ``(N, C)`` bool; each row's correlation uses only its true entries.

    Returns:
        ``(corr, valid)``: ``(N,)`` correlations (0 where not valid) and a ``(N,)`` bool mask of the rows
        with at least :data:`MIN_ENTRIES` entries and a non-constant ``b``.
    """
    m = mask.to(a.dtype)
    n = m.sum(1, keepdim=True)
    ac = (a - (a * m).sum(1, keepdim=True) / n.clamp_min(1)) * m
    bc = (b - (b * m).sum(1, keepdim=True) / n.clamp_min(1)) * m
    nb = bc.norm(dim=1)
    valid = (n[:, 0] >= MIN_ENTRIES) & (nb > 1e-6 * (b.abs() * m).amax(1).clamp_min(1e-12))
    corr = (ac * bc).sum(1) / (ac.norm(dim=1) * nb + eps)
    return torch.where(valid, corr, torch.zeros_like(corr)), valid


def geometry_values(p: Tensor, geometry: str, floor: float = LOG_FLOOR) -> Tensor:
    """The matrix a geometry correlates: ``p`` (``prob``, ``offdiag``) or ``log(max(p, floor))`` (``logprob``)."""
    if geometry not in GEOMETRIES:
        raise ValueError(f"unknown prototype geometry {geometry!r}; valid: {list(GEOMETRIES)}")
    return p.clamp_min(floor).log() if geometry == "logprob" else p


def _relation(corr: Tensor, valid: Tensor, weights: Optional[Tensor]) -> Tensor:
    w = valid.to(corr.dtype) * (1.0 if weights is None else weights.to(corr.dtype))
    total = w.sum()
    # nothing to relate: 0, with a (zero) gradient; decided on the device (no host sync per step)
    return torch.where(total > 0, 1.0 - (w * corr).sum() / total.clamp_min(1e-12), corr.sum() * 0.0)


def prototype_dist_terms(p_s: Tensor, p_t: Tensor, present: Optional[Tensor] = None, geometry: str = "prob",
                         space: str = "prob", row_weights: Optional[Tensor] = None,
                         floor: float = LOG_FLOOR) -> Tuple[Tensor, Tensor]:
    """Inter- and intra-class DIST relation terms between two prototype matrices.

    Args:
        p_s: student prototypes ``(K, C)`` (carries the gradient).
        p_t: teacher prototypes ``(K, C)`` (a constant: the bank; detached here, so no gradient
            ever reaches the teacher side).
        present: ``(K,)`` bool mask of the classes that enter the loss. ``None``: all.
        geometry: ``prob`` | ``logprob`` | ``offdiag`` (see the module docstring); a ``feature``
            space bank is compared as it is (``prob``).
        space: ``prob`` (K x K: columns are classes) or ``feature`` (K x D).
        row_weights: ``(K,)`` non-negative weights of the inter term's rows (e.g. the teacher's
            per-class reliability); ``None``: equal. Rows of weight 0 also leave the intra term.
        floor: ``logprob``: probabilities are clamped at ``floor`` before the log.

    Returns:
        ``(inter, intra)``: inter = 1 - (weighted) mean Pearson over the present rows (each row over
        its K entries, or K - 1 off-diagonal ones); intra = 1 - mean Pearson over the present columns
        of the present x present sub-matrix (``feature``: every column over the present rows). Vectors
        with fewer than 3 entries or a constant teacher side are left out; a term with none left is 0.
        Both lie in [0, 2].
    """
    if p_s.shape != p_t.shape or p_s.ndim != 2:
        raise ValueError(f"student prototypes {tuple(p_s.shape)} and teacher prototypes {tuple(p_t.shape)} differ in shape")
    if space not in ("prob", "feature"):
        raise ValueError(f"space must be 'prob' or 'feature', got {space!r}")
    if space == "feature" and geometry != "prob":
        raise ValueError(f"a feature-space bank is compared as it is: geometry must be 'prob', got {geometry!r}")
    k, c = p_s.shape
    if space == "prob" and k != c:
        raise ValueError(f"a prob-space bank is K x K, got {tuple(p_s.shape)}")
    x_s = geometry_values(p_s, geometry, floor)
    x_t = geometry_values(p_t.detach().to(p_s.dtype), geometry, floor)
    rows = torch.ones(k, dtype=torch.bool, device=p_s.device) if present is None else present.to(p_s.device).bool()
    if row_weights is not None:
        row_weights = row_weights.to(device=p_s.device, dtype=p_s.dtype)
        rows = rows & (row_weights > 0)
    entries = torch.ones(k, c, dtype=torch.bool, device=p_s.device)
    if geometry == "offdiag":
        entries = entries & ~torch.eye(k, c, dtype=torch.bool, device=p_s.device)
    corr, valid = masked_pearson_rows(x_s, x_t, entries & rows[:, None])
    inter = _relation(corr, valid & rows, row_weights)
    col_entries = entries & rows[:, None]  # column j over the present rows i
    cols = rows if space == "prob" else torch.ones(c, dtype=torch.bool, device=p_s.device)
    corr_c, valid_c = masked_pearson_rows(x_s.T, x_t.T, (col_entries & cols[None, :]).T)
    intra = _relation(corr_c, valid_c & cols, None)
    return inter, intra


def prototype_dist_loss(p_s: Tensor, p_t: Tensor, present: Optional[Tensor] = None, beta: float = 1.0,
                        gamma: float = 1.0, **kwargs) -> Tensor:
    """``beta * inter + gamma * intra`` of :func:`prototype_dist_terms` (``kwargs``: its options)."""
    inter, intra = prototype_dist_terms(p_s, p_t, present, **kwargs)
    return beta * inter + gamma * intra


def identity_distances(bank: Tensor, geometries: Sequence[str] = GEOMETRIES, present: Optional[Tensor] = None,
                       floor: float = LOG_FLOOR) -> dict:
    """``{geometry: (inter, intra)}`` of the identity matrix (a student that is right with certainty and
    knows no confusion) against a K x K ``bank``: how far each geometry sees the teacher's knowledge
    from 'nothing beyond the labels'. Near 0 means a loss in that geometry is almost blind to the bank."""
    eye = torch.eye(bank.shape[0], dtype=bank.dtype)
    out = {}
    for g in geometries:
        inter, intra = prototype_dist_terms(eye, bank, present, geometry=g, floor=floor)
        out[g] = (float(inter), float(intra))
    return out
