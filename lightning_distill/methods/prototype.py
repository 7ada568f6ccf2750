"""The core 3D->2D method: a 2D student distilled from a 3D teacher's prototype bank.

Segmentation loss + lambda * prototype DIST (Pearson-correlation inter- and intra-class relations,
Huang et al., NeurIPS 2022) between the student's batch class prototypes and the teacher's bank of
class-wise prediction centroids (:mod:`lightning_distill.bank`). No teacher network and no 3D
input at training or prediction time. Losses: :mod:`lightning_distill.losses.prototype`.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
from omegaconf import DictConfig
from torch import Tensor, nn

from lightning_distill.losses.prototype import (GEOMETRIES, LOG_FLOOR, all_reduce_class_sums, class_means, masked_class_sums,
                                               prototype_dist_terms)
from lightning_distill.modules import SegmentationModule
from lightning_distill.networks import InputHook, head_module_name
from lightning_distill.bank.controls import control_bank
from lightning_distill.bank.format import Bank, load_bank


def build(cfg: DictConfig, net: nn.Module, class_names: Sequence[str], common: Dict[str, Any]) -> "StudentModule":
    """``distill.method=prototype``: the student of ``distill.prototypes`` (the teacher's bank, transformed by
    ``distill.bank_control``); without a bank and with ``distill.weight=0``, the plain 2D baseline."""
    d = cfg.distill
    bank = None
    if d.prototypes:
        bank = load_bank(d.prototypes)
        bank.meta["path"] = str(d.prototypes)
        bank = control_bank(bank, d.bank_control, seed=cfg.seed)
    elif d.weight != 0:
        raise ValueError("distill.weight is not 0 but distill.prototypes is not set: give the teacher's prototypes.pt "
                         "(e.g. distill.prototypes=runs/teacher/prototypes.pt), or set distill.weight=0 for the baseline")
    return StudentModule(net, class_names, bank=bank, distill_weight=d.weight, beta=d.beta, gamma=d.gamma, tau=d.tau,
                         geometry=d.geometry, log_floor=d.log_floor, min_pixels=d.min_pixels, row_weight=d.row_weight,
                         min_reliability=d.min_reliability, mask_classes=list(d.mask_classes), grad_every=d.grad_every,
                         feature_layer=d.feature_layer or head_module_name(cfg.model.name), **common)


class StudentModule(SegmentationModule):
    """2D student: segmentation + lambda * prototype DIST against a teacher's exported bank.

    The teacher network is never loaded: only its bank (a ``K x C`` matrix) is, and it is kept as a
    buffer so checkpoints carry it. With ``distill_weight = 0`` (or no bank) this is the baseline.

    Args:
        bank: the teacher's prototype bank (``None`` for the baseline).
        distill_weight: lambda.
        beta, gamma: weights of the inter- and intra-class relation terms.
        tau: the temperature of the student's softmax AND of the bank matrix compared with it (one
            of the bank's ``taus``, see :meth:`~lightning_distill.bank.format.Bank.at_tau`). Default:
            the bank's own ``tau``.
        geometry: ``prob`` | ``logprob`` | ``offdiag``: what the Pearson correlations compare (see
            :mod:`lightning_distill.losses.prototype`).
        log_floor: ``logprob``: probabilities are clamped here before the log.
        min_pixels: a class enters the loss only with at least this many labelled pixels in the batch.
        row_weight: ``none`` or ``reliability``: the inter term's rows weighted by the teacher's
            held-out Dice of the class (``bank.meta["reliability"]``).
        min_reliability: rows of classes whose teacher held-out Dice is below this are left out.
        mask_classes: class names left out of both terms (their row of the inter term and their
            row/column of the intra block), as if the bank lacked them: to test whether one class's
            prototype is what hurts (CHAOS spleen, docs/benchmarks/chaos.md).
        grad_every: every N training steps, log ``train/dist_grad_norm``, ``train/seg_grad_norm`` and
            their ratio ``train/dist_grad_ratio``: gradient norms of the weighted distillation and
            segmentation losses with respect to the tensor the distillation reads (the logits; the
            penultimate features for a feature-space bank). 0: never.
        feature_layer: for a ``feature``-space bank, the student's head module name; its input feature
            map is projected to the bank's D channels by a learned 1x1 convolution.
        **kwargs: :class:`SegmentationModule` arguments.
    """

    def __init__(self, net: nn.Module, class_names: Sequence[str], bank: Optional[Bank] = None,
                 distill_weight: float = 1.0, beta: float = 1.0, gamma: float = 1.0, tau: Optional[float] = None,
                 geometry: str = "prob", log_floor: float = LOG_FLOOR, min_pixels: int = 16, row_weight: str = "none",
                 min_reliability: float = 0.0, grad_every: int = 25, mask_classes: Sequence[str] = (),
                 feature_layer: Optional[str] = "segmentation_head", **kwargs):
        super().__init__(net, class_names, **kwargs)
        unknown = [c for c in mask_classes if c not in self.class_names]
        if unknown:
            raise ValueError(f"distill.mask_classes {unknown} are not classes of this run; valid: {list(self.class_names)}")
        if mask_classes and bank is None:
            raise ValueError("distill.mask_classes needs a teacher bank (distill.prototypes)")
        if geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {list(GEOMETRIES)}, got {geometry!r}")
        if row_weight not in ("none", "reliability"):
            raise ValueError(f"row_weight must be 'none' or 'reliability', got {row_weight!r}")
        if min_pixels < 1 or grad_every < 0 or not 0 < log_floor < 1:
            raise ValueError(f"need min_pixels >= 1, grad_every >= 0 and 0 < log_floor < 1; got {min_pixels}, {grad_every}, {log_floor}")
        self.distill_weight, self.beta, self.gamma = float(distill_weight), float(beta), float(gamma)
        self.geometry, self.log_floor, self.min_pixels = geometry, float(log_floor), int(min_pixels)
        self.grad_every = int(grad_every)
        self.space = bank.space if bank is not None else "prob"
        self.tau = float(tau if tau is not None else (bank.tau if bank is not None else 1.0))
        if self.space == "feature" and geometry != "prob":
            raise ValueError(f"a feature-space bank is compared as it is: distill.geometry must be 'prob', got {geometry!r}")
        self.projector: Optional[nn.Module] = None
        self._hook: Optional[InputHook] = None
        self._distill_input: Optional[Tensor] = None
        if bank is not None:
            bank.check_classes(self.class_names, str(bank.meta.get("path", "")))
            self.register_buffer("teacher_prototypes", bank.at_tau(tau).clone().float())
            present = bank.present.clone()
            for c in mask_classes:
                present[self.class_names.index(c)] = False
            self.register_buffer("teacher_present", present)
            weights = row_weights(bank, row_weight, min_reliability)
            self.register_buffer("teacher_row_weights", weights)
            if self.space == "feature":
                if not feature_layer:
                    raise ValueError("a feature-space bank needs the student's feature_layer (head module name)")
                d = bank.prototypes.shape[1]
                conv = nn.Conv3d if any(isinstance(m, nn.Conv3d) for m in net.modules()) else nn.Conv2d
                self.projector = nn.Sequential(conv(self._head_channels(net, feature_layer), d, kernel_size=1))
                self._hook = InputHook(net, feature_layer, which="input")
        else:
            self.teacher_prototypes = None
            self.teacher_row_weights = None
        self.student_batch_prototypes: Optional[Tensor] = None  # last batch's, for inspection

    @staticmethod
    def _head_channels(net: nn.Module, name: str) -> int:
        head = dict(net.named_modules())[name]
        for m in head.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d)):
                return m.in_channels
        raise ValueError(f"cannot tell the input channels of head module {name!r}")

    def term_weights(self) -> Dict[str, float]:
        w = super().term_weights()
        lam = self.distill_weight if self.teacher_prototypes is not None else 0.0
        w.update({"dist_inter": lam * self.beta, "dist_intra": lam * self.gamma})
        return w

    def extra_terms(self, batch: Dict, logits: Tensor) -> Dict[str, Tensor]:
        if self.teacher_prototypes is None:  # no bank: plain baseline
            return {}
        # with a bank and lambda = 0 the terms are still computed and logged (weight 0), so a
        # baseline run can be compared with the distilled one on the same relation measures
        if self.space == "prob":
            self._distill_input = logits
            values = torch.softmax(logits.float() / self.tau, dim=1)
        else:
            # the head's input for the whole forward (a batch's transfer_* samples too): the figure differentiates
            # it (the segmentation loss reaches the labelled rows through it, not through a slice of it)
            self._distill_input = self._hook.pop()
            values = self.projector(self._distill_input[: logits.shape[0]]).float()
        sums, counts = masked_class_sums(values, batch["label"], self.num_classes)
        if self.training:  # DDP: the prototypes of the global batch (a no-op in one process)
            sums, counts = all_reduce_class_sums(sums, counts)
        p_s = class_means(sums, counts)
        present = (counts >= self.min_pixels) & self.teacher_present
        self.student_batch_prototypes = p_s.detach()
        inter, intra = prototype_dist_terms(p_s, self.teacher_prototypes, present, geometry=self.geometry,
                                            space=self.space, row_weights=self.teacher_row_weights, floor=self.log_floor)
        return {"dist_inter": inter, "dist_intra": intra}

    def log_contribution(self, out: Dict[str, Any]) -> None:
        """Every ``grad_every`` steps, write the gradient norms of the weighted distillation and
        segmentation losses on the tensor the distillation reads, and their ratio, straight to the
        loggers (``train/dist_grad_norm``, ``train/seg_grad_norm``, ``train/dist_grad_ratio``): an
        inert distillation term shows as a ratio near 0. Two ``autograd.grad`` calls through the loss
        heads only (not the network), so the cost is small."""
        x = self._distill_input
        self._distill_input = None
        if (not self.grad_every or x is None or not self.loggers or self.global_step % self.grad_every
                or not torch.is_grad_enabled()):
            return
        figures = self.contribution_figures(out, x)
        for logger in self.loggers:
            logger.log_metrics(figures, step=self.global_step)

    def contribution_figures(self, out: Dict[str, Any], x: Tensor) -> Dict[str, float]:
        """Gradient norms on ``x`` of the weighted distillation and segmentation losses of ``out`` (a
        :meth:`model_step` result whose graph still holds), and their ratio."""
        w, terms = self.term_weights(), out["terms"]
        norms = {}
        for name in ("dist", "seg"):
            loss = sum(w.get(k, 0.0) * v for k, v in terms.items() if k.startswith(name + "_"))
            g = (torch.autograd.grad(loss, x, retain_graph=True, allow_unused=True)[0]
                 if torch.is_tensor(loss) and loss.requires_grad else None)
            norms[name] = 0.0 if g is None else float(g.float().norm())
        return {"train/dist_grad_norm": norms["dist"], "train/seg_grad_norm": norms["seg"],
                "train/dist_grad_ratio": norms["dist"] / max(norms["seg"], 1e-12)}


def row_weights(bank: Bank, row_weight: str = "none", min_reliability: float = 0.0) -> Optional[Tensor]:
    """``(K,)`` weights of the bank's rows in the inter term, from its per-class reliability.

    ``row_weight="reliability"``: each row weighted by the teacher's held-out Dice of the class;
    ``min_reliability > 0``: rows whose Dice is below it get weight 0 (left out). A class the
    reliability record does not list (e.g. background) keeps weight 1. ``None`` when neither is asked.

    Raises:
        ValueError: weighting asked for but the bank records no reliability (a teacher run without a
            validation split, or a bank written before reliability was recorded).
    """
    if row_weight == "none" and min_reliability <= 0:
        return None
    rel = bank.meta.get("reliability")
    if not rel:
        raise ValueError(f"distill.row_weight={row_weight} / distill.min_reliability={min_reliability} need the teacher's "
                         f"per-class reliability, but the bank {bank.meta.get('path', '')} records none (pretrain the "
                         "teacher with a validation split)")
    dice = torch.tensor([float(rel[c]["dice"]) if c in rel and rel[c].get("dice") is not None else 1.0
                         for c in bank.class_names])
    w = dice.clamp(0, 1) if row_weight == "reliability" else torch.ones_like(dice)
    return torch.where(dice < min_reliability, torch.zeros_like(w), w)
