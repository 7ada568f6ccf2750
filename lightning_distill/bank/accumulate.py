"""What a bank accumulates: the per-voxel vectors (:func:`bank_values`) and their per-class sums
(:class:`ClassSums`), shared by the training callback and the offline scan.

A bank's row k is the mean, over the voxels whose label is k, of ``softmax(logits / tau)``
(``space="prob"``: K x K; Yu et al. 2024) or of the penultimate feature map (``space="feature"``:
K x D). ``taus`` lists further temperatures accumulated over the same voxels (one K x K matrix each,
side by side along the channels): a mean of ``softmax(z / tau)`` cannot be recomputed at another tau
from the mean at one tau.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
from torchmetrics import Metric

from lightning_distill.losses.prototype import masked_class_sums

SPACES = ("prob", "feature")


def check_options(space: str, tau: float, taus: Sequence[float] = (), feature_layer: Optional[str] = None) -> List[float]:
    """Validate a bank's space and temperatures; return the further temperatures to accumulate
    (``taus`` without ``tau``, sorted; none in feature space).

    Raises:
        ValueError: an unknown ``space``, ``feature`` without ``feature_layer``, or a temperature <= 0.
    """
    if space not in SPACES:
        raise ValueError(f"space must be 'prob' or 'feature', got {space!r}")
    if space == "feature" and not feature_layer:
        raise ValueError("space='feature' needs feature_layer (the name of the network's head module)")
    if tau <= 0 or any(t <= 0 for t in taus):
        raise ValueError(f"temperatures must be positive, got tau={tau}, taus={list(taus)}")
    return sorted({float(t) for t in taus} - {float(tau)}) if space == "prob" else []


def bank_values(logits: torch.Tensor, feats: Optional[torch.Tensor], space: str, tau: float,
                 extra_taus: Sequence[float], feature_layer: Optional[str] = None) -> torch.Tensor:
    """The per-voxel vectors a bank averages: softmax(logits / tau) (``prob``) or ``feats``, then the
    softmax at each of ``extra_taus``, side by side along the channels (one pass, one sum over processes)."""
    logits = logits.detach().float()
    if space == "prob":
        values = torch.softmax(logits / tau, dim=1)
    else:
        if feats is None:
            raise RuntimeError(f"feature hook on {feature_layer!r} captured nothing in this batch")
        values = feats.float()
    if extra_taus:
        values = torch.cat([values] + [torch.softmax(logits / t, dim=1) for t in extra_taus], dim=1)
    return values


class ClassSums(Metric):
    """Per-class sums and voxel counts of per-voxel vectors, summed over the processes when computed.

    States (reduced with ``sum`` across processes): ``sums`` ``(K, C)`` and ``counts`` ``(K,)``, both
    float64. :meth:`update` adds a batch's :func:`masked_class_sums` (labels outside ``[0, K)`` count
    in nothing); :meth:`compute` returns ``(sums, counts)`` over every process (under DDP a
    collective: every process must call it).

    Args:
        num_classes: K.
        channels: C, the length of the per-voxel vectors.
        kwargs: torchmetrics' ``Metric`` options (e.g. ``distributed_available_fn``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, channels: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.add_state("sums", torch.zeros(self.num_classes, int(channels), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(self.num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, label: torch.Tensor) -> None:
        """Add the sums of ``values`` ``(B, C, *spatial)`` per class of ``label`` (``(B, 1, *spatial)``)."""
        sums, counts = masked_class_sums(values, label, self.num_classes)
        self.sums += sums.double()
        self.counts += counts.double()

    def compute(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sums, self.counts


def split_taus(sums: torch.Tensor, extra_taus: Sequence[float]) -> Tuple[torch.Tensor, ...]:
    """``(K, C * (1 + len(extra_taus)))`` sums of :func:`bank_values` as one ``(K, C)`` block per temperature
    (the bank's own ``tau`` first, then ``extra_taus`` in order)."""
    return sums.split(sums.shape[1] // (1 + len(extra_taus)), dim=1)
