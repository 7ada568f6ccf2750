"""Class-wise averaged images: SIKD's teacher input (``input_transform: class_mean``).

It lives with the data, below the modules that use it (:class:`~lightning_distill.modules.SegmentationModule`,
:mod:`lightning_distill.methods.sikd`, the picture callback), so that none of them imports another for it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.data.nifti import IGNORE_INDEX


def class_mean_image(image: Tensor, label: Tensor, num_classes: int, eps: float = 1e-8,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """Replace every pixel by the mean intensity of its class, per image and per channel.

    ``x̄ = Σ_i 1[y = i] · (Σ x · 1[y = i]) / (Σ 1[y = i] + eps)`` over the spatial axes, background
    (class 0) included. Pixels labelled ``ignore_index`` keep their own intensity and do not count
    in any class mean. Works for 2D and 3D (``B C spatial...``).

    Args:
        image: ``(B, C, *spatial)`` float.
        label: ``(B, 1, *spatial)`` integer labels in ``[0, num_classes)`` (or ``ignore_index``).
        num_classes: K.
        eps: added to the pixel count (a class absent from an image gets mean 0, used by no pixel).

    Returns:
        ``(B, C, *spatial)``, same dtype as ``image``.

    Raises:
        ValueError: shapes that do not match, or labels outside ``[0, num_classes)`` (checked on the CPU; on an
            accelerator the check would make the host wait every step, and every label was checked when read).
    """
    if label.ndim != image.ndim or label.shape[1] != 1 or label.shape[0] != image.shape[0] or label.shape[2:] != image.shape[2:]:
        raise ValueError(f"class_mean_image needs image (B, C, *spatial) and label (B, 1, *spatial), got "
                         f"{tuple(image.shape)} and {tuple(label.shape)}")
    lab = label[:, 0].long()
    ignore = lab == ignore_index
    lab = lab.masked_fill(ignore, 0)
    if lab.device.type == "cpu" and lab.numel() and (lab.min() < 0 or lab.max() >= num_classes):
        raise ValueError(f"labels must be in [0, {num_classes}) (or {ignore_index}), got values in "
                         f"[{int(lab.min())}, {int(lab.max())}]")
    onehot = F.one_hot(lab, num_classes).movedim(-1, 1).to(image.dtype) * (~ignore).unsqueeze(1).to(image.dtype)  # B K *sp
    dims = tuple(range(3, image.ndim + 1))
    sums = (image.unsqueeze(2) * onehot.unsqueeze(1)).sum(dims)  # B C K
    counts = onehot.sum(tuple(range(2, image.ndim)))  # B K
    means = sums / (counts.unsqueeze(1) + eps)  # B C K
    shape = means.shape + (1,) * (image.ndim - 2)
    out = (means.reshape(shape) * onehot.unsqueeze(1)).sum(2)  # B C *sp
    return torch.where(ignore.unsqueeze(1), image, out)
