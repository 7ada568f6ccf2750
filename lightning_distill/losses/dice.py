"""Batch soft Dice loss whose statistics can be summed over DDP processes.

With ``batch=True`` (the package's Dice: one Dice per class over the whole batch) the loss is not a
mean over samples, so under DDP each process's Dice over its own share of the batch is a different
objective from the single-process Dice over the whole batch. :func:`batch_dice_loss` with
``sync=True`` all-reduces the per-class sums (differentiably) before the ratio, so every process
computes the Dice of the global batch. The gradient then matches one process over the union of
the batches: the all-reduce's backward sums the processes' (equal) upstream gradients, and DDP's
gradient averaging divides that sum by the world size again.

Formula (as MONAI's ``DiceLoss(include_background=False, to_onehot_y=True, softmax=True,
batch=True)``): ``1 - mean_k (2 sum p_k g_k + 1e-5) / (sum p_k + sum g_k + 1e-5)`` over the
foreground classes k, sums over batch and space.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.nn.functional import all_reduce

from lightning_distill.devices import process_group_size

SMOOTH = 1e-5


def batch_dice_loss(logits: Tensor, label: Tensor, mask: Optional[Tensor] = None, sync: bool = False) -> Tensor:
    """Soft Dice loss over the batch (foreground classes), optionally over all DDP processes.

    Args:
        logits: ``(B, K, *spatial)``.
        label: ``(B, 1, *spatial)`` int64 in ``0..K-1``.
        mask: ``(B, 1, *spatial)`` weights (0 leaves a pixel out), or ``None``.
        sync: sum the statistics over the default process group when one is initialised.

    Returns:
        A scalar: the same value on every process when ``sync``.
    """
    k = logits.shape[1]
    if label.ndim != logits.ndim or label.shape[1] != 1:
        raise ValueError(f"label must be (B, 1, *spatial) for logits {tuple(logits.shape)}, got {tuple(label.shape)}")
    probs = torch.softmax(logits.float(), dim=1)[:, 1:]
    onehot = F.one_hot(label[:, 0].long(), k).movedim(-1, 1)[:, 1:].to(probs.dtype)
    if mask is not None:
        probs, onehot = probs * mask, onehot * mask
    dims = [0, *range(2, logits.ndim)]
    stats = torch.stack([(probs * onehot).sum(dims), probs.sum(dims), onehot.sum(dims)])
    if sync and process_group_size() > 1:

        stats = all_reduce(stats, op=dist.ReduceOp.SUM)
    inter, pred, truth = stats
    return (1 - (2 * inter + SMOOTH) / (pred + truth + SMOOTH)).mean()
