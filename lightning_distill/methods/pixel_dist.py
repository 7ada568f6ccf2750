"""Pixel-wise DIST with a paired 2D teacher (Huang et al., NeurIPS 2022, Sec. 4.3): the classic
alternative to prototype distillation, for comparison. Unlike the prototype student it needs the
teacher network and a teacher forward pass on the *same* 2D input at every training step.
"""

from __future__ import annotations

from typing import Any, Dict, Sequence

from torch import Tensor, nn

from lightning_distill.config.run import is_baseline
from lightning_distill.losses.dist import pixel_dist_loss
from lightning_distill.methods.frozen import FrozenTeacher, load_teacher_network
from lightning_distill.methods.prototype import build as baseline
from lightning_distill.modules import SegmentationModule


class PixelDistModule(SegmentationModule):
    """Segmentation + ``weight * pixel DIST(student logits, teacher logits)``; term logged as ``train/pixel_dist``.

    Args:
        net: the student network ``(B, C, H, W) -> (B, K, H, W)``.
        class_names: the K class names.
        teacher: a trained network with the same input and output shapes (frozen here).
        distill_weight, beta, gamma, tau: DIST settings (:func:`~lightning_distill.losses.dist.pixel_dist_loss`).
        **kwargs: :class:`~lightning_distill.modules.SegmentationModule` arguments.
    """

    def __init__(self, net: nn.Module, class_names: Sequence[str], teacher: nn.Module, distill_weight: float = 1.0,
                 beta: float = 1.0, gamma: float = 1.0, tau: float = 1.0, **kwargs):
        super().__init__(net, class_names, **kwargs)
        self.teacher = FrozenTeacher(teacher)
        self.distill_weight, self.beta, self.gamma, self.tau = float(distill_weight), float(beta), float(gamma), float(tau)

    def term_weights(self) -> Dict[str, float]:
        return {**super().term_weights(), "pixel_dist": self.distill_weight}

    def extra_terms(self, batch: Dict, logits: Tensor) -> Dict[str, Tensor]:
        t = self.teacher(batch["image"])
        return {"pixel_dist": pixel_dist_loss(logits, t, beta=self.beta, gamma=self.gamma, tau=self.tau)}


def build(cfg, net: nn.Module, class_names: Sequence[str], common: Dict[str, Any]) -> SegmentationModule:
    """``distill.method=pixel``: pixel-wise DIST from the paired 2D teacher ``distill.teacher``; with ``distill.weight=0``, the
    baseline (no teacher is loaded)."""
    d = cfg.distill
    if is_baseline(cfg):
        return baseline(cfg, net, class_names, common)
    teacher = load_teacher_network(d.teacher, class_names, "distill.method=pixel")
    return PixelDistModule(net, class_names, teacher=teacher, distill_weight=d.weight, beta=d.beta, gamma=d.gamma,
                           tau=1.0 if d.tau is None else d.tau, **common)
