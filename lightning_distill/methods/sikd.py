"""SIKD: shape-intensity knowledge distillation (Dong, Du, Xu, "Shape-intensity knowledge
distillation for robust medical image segmentation"; method as in the authors' code, whdong-whu/SIKD).

A teacher of the student's architecture is trained on *class-wise averaged images* (every pixel
replaced by the mean intensity of its class in that image and channel), so it sees shape and the
class-level intensity layout without texture or noise. The student trains on the original images
with the segmentation loss plus ``weight * MSE`` between its penultimate-layer features and the
frozen teacher's on the averaged image of the same sample (weight 2.0 by default). Features are
pulled through forward hooks by module name; only the student is used at inference.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.config.run import is_baseline
from lightning_distill.data.class_mean import class_mean_image
from lightning_distill.methods.frozen import FrozenTeacher, load_teacher_network
from lightning_distill.methods.prototype import build as baseline
from lightning_distill.modules import SegmentationModule
from lightning_distill.networks import InputHook, head_module_name


def sikd_loss(student_features: Tensor, teacher_features: Tensor) -> Tensor:
    """MSE between student and (detached) teacher feature maps of one shape ``(B, D, *spatial)``."""
    if student_features.shape != teacher_features.shape:
        raise ValueError(f"SIKD needs student and teacher features of one shape, got {tuple(student_features.shape)} "
                         f"and {tuple(teacher_features.shape)} (use the same architecture for both)")
    return F.mse_loss(student_features.float(), teacher_features.detach().float())


class SIKDModule(SegmentationModule):
    """Student: segmentation on original images + ``weight * MSE`` to the class-mean teacher's features.

    Logged terms: ``train/seg_dice``, ``train/seg_ce``, ``train/sikd_mse``.

    Args:
        net: the student network.
        class_names: the K class names.
        teacher: the trained teacher network (same architecture; frozen here).
        feature_layer: module name whose *input* is the penultimate feature map (smp:
            ``segmentation_head``), in the student and, by default, in the teacher.
        teacher_feature_layer: the teacher's module name, if it differs.
        distill_weight: weight of the MSE term (``distill.weight``; the paper's code uses 2.0, as experiments/sikd.yaml).
        **kwargs: :class:`~lightning_distill.modules.SegmentationModule` arguments.
    """

    def __init__(self, net: nn.Module, class_names: Sequence[str], teacher: nn.Module,
                 feature_layer: str = "segmentation_head", teacher_feature_layer: Optional[str] = None,
                 distill_weight: float = 1.0, **kwargs):
        super().__init__(net, class_names, **kwargs)
        self.teacher = FrozenTeacher(teacher)
        self.distill_weight = float(distill_weight)
        self._student_hook = InputHook(net, feature_layer, which="input")
        self._teacher_hook = InputHook(teacher, teacher_feature_layer or feature_layer, which="input", detach=True)

    def term_weights(self) -> Dict[str, float]:
        return {**super().term_weights(), "sikd_mse": self.distill_weight}

    def extra_terms(self, batch: Dict, logits: Tensor) -> Dict[str, Tensor]:
        student = self._student_hook.pop()
        self.teacher(class_mean_image(batch["image"], batch["label"], self.num_classes))
        return {"sikd_mse": sikd_loss(student, self._teacher_hook.pop())}


def build(cfg, net: nn.Module, class_names: Sequence[str], common: Dict[str, Any]) -> SegmentationModule:
    """``distill.method=sikd``: the student of the class-mean teacher ``distill.teacher``; with ``distill.weight=0``, the
    baseline (no teacher is loaded)."""
    d = cfg.distill
    if is_baseline(cfg):
        return baseline(cfg, net, class_names, common)
    return SIKDModule(net, class_names, teacher=load_teacher_network(d.teacher, class_names, "distill.method=sikd"),
                      feature_layer=d.feature_layer or head_module_name(cfg.model.name), distill_weight=d.weight, **common)
