"""The LightningModule of a run config: a teacher, or the student of ``distill.method`` made by that
method's builder (:data:`lightning_distill.methods.METHODS`), with its transfer term switched on."""

from __future__ import annotations

from typing import Sequence

from omegaconf import DictConfig

from lightning_distill.config.load import to_dict
from lightning_distill.data.datamodules import SegmentationDataModule
from lightning_distill.methods import method_builder
from lightning_distill.modules import SegmentationModule
from lightning_distill.networks import build_net


def build_module(cfg: DictConfig, names: Sequence[str]) -> SegmentationModule:
    """The run's LightningModule: the teacher (``stage=teacher``) or the student of ``distill.method``,
    made by that method's builder (:data:`lightning_distill.methods.METHODS`)."""
    net = build_net(cfg, len(names))
    common = dict(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, scheduler=cfg.optim.scheduler,
                  dice_weight=cfg.loss.dice_weight, ce_weight=cfg.loss.ce_weight, dice_batch=cfg.loss.dice_batch,
                  roi_size=list(cfg.data.patch_size) if cfg.data.patch_size else None, val_hd95=cfg.val_hd95,
                  surface_tolerance=cfg.surface_tolerance_mm, sw_batch_size=cfg.sw_batch_size, config=to_dict(cfg))
    if cfg.stage == "teacher":
        return SegmentationModule(net, names, input_transform=cfg.input_transform, **common)
    if cfg.input_transform != "none":
        raise ValueError(f"input_transform={cfg.input_transform} is for teachers (stage=teacher); a student sees the original images")
    d = cfg.distill
    if d.bank_control != "none" and (d.method != "prototype" or not d.prototypes):
        raise ValueError(f"distill.bank_control={d.bank_control} transforms the teacher's prototype bank: it needs "
                         f"distill.method=prototype and distill.prototypes (got method {d.method}, prototypes {d.prototypes})")
    return method_builder(d.method)(cfg, net, names, common)


def set_transfer(cfg: DictConfig, module: SegmentationModule, dm: SegmentationDataModule) -> None:
    """Switch on the transfer term of ``transfer.slices`` (its temperature: ``transfer.tau``, default the
    folder's) and record the extra slices in the run's checkpoints."""
    t = cfg.transfer
    module.training_data["transfer"] = {name: src.record() for name, (src, _) in dm.extras.items()}
    if "transfer" in dm.extras:
        stored = dm.extras["transfer"][0].meta.get("tau")
        module.set_transfer(mode=t.mode, weight=t.weight, tau=float(t.tau if t.tau is not None else (stored or 1.0)),
                            threshold=t.threshold, target=t.target, stored_tau=stored)
