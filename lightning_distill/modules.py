"""The supervised segmentation LightningModule every method builds on: 3D teacher pretraining, the 2D
baseline, and (subclassed in :mod:`lightning_distill.methods`) every student share one ``model_step``.

The module takes its network, loss settings and optimizer settings as arguments. Loss terms are a
weighted sum whose terms are each logged (``train/seg_dice``, ``train/seg_ce``, ``train/dist_inter``,
...); metrics are logged as ``split/name`` (``val/dice``, ``val/dice_liver``, ``test/hd95``, ...).
"""

from __future__ import annotations

import warnings
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from monai.inferers import sliding_window_inference
from monai.losses import DiceLoss, MaskedDiceLoss
from torch import Tensor, nn

from lightning_distill import __version__
from lightning_distill.bank.callback import PrototypeBank
from lightning_distill.bank.format import bank_record
from lightning_distill.data.class_mean import class_mean_image
from lightning_distill.data.nifti import IGNORE_INDEX
from lightning_distill.losses.dice import batch_dice_loss
from lightning_distill.losses.transfer import hard_transfer_loss, one_hot_target, retemper, soft_transfer_loss
from lightning_distill.metrics import (CaseMeans, collect_cases, per_case_dice, per_case_hd95, per_case_surface_metrics,
                                       summarize)


class SegmentationModule(L.LightningModule):
    """Supervised segmentation (Dice + CE) for 2D or 3D networks: the teacher, and the baseline.

    Args:
        net: network mapping ``(B, C, *spatial)`` to ``(B, K, *spatial)`` logits.
        class_names: the K class names, background first.
        lr, weight_decay: AdamW settings.
        scheduler: ``"cosine"`` (per step, to ``trainer.max_steps``) or ``"none"``.
        dice_weight, ce_weight: weights of the segmentation terms.
        roi_size: sliding-window size for validation/test inference (``None``: whole input).
        val_hd95: also compute HD95 during validation (slower); test always computes it.
        config: resolved run config, saved with the hyperparameters (so it is in checkpoints).
        input_transform: ``"none"``, or ``"class_mean"``: the network sees class-wise averaged images
            in every split (the SIKD teacher; needs labels, so it cannot predict unlabelled data).
        surface_tolerance: tolerance in mm of the surface Dice computed at test time (``None``: one
            voxel, i.e. per case the largest spacing of that case).
        dice_batch: Dice over the whole batch (default) or per image (``False``: every image's
            classes weigh alike, a class-balanced loss).
        sw_batch_size: windows per forward of the sliding-window inference (with ``roi_size``).

    Per-class CE weights (a class-balanced baseline) are set with :meth:`set_ce_class_weights`; the
    transfer term of teacher-labelled slices with :meth:`set_transfer`.
    """

    def __init__(self, net: nn.Module, class_names: Sequence[str], lr: float = 1e-3, weight_decay: float = 1e-4,
                 scheduler: str = "cosine", dice_weight: float = 1.0, ce_weight: float = 1.0,
                 roi_size: Optional[Sequence[int]] = None, val_hd95: bool = False, config: Optional[Dict] = None,
                 input_transform: str = "none", surface_tolerance: Optional[float] = None, dice_batch: bool = True,
                 sw_batch_size: int = 2):
        super().__init__()
        if scheduler not in ("cosine", "none"):
            raise ValueError(f"scheduler must be 'cosine' or 'none', got {scheduler!r}")
        if input_transform not in ("none", "class_mean"):
            raise ValueError(f"input_transform must be 'none' or 'class_mean', got {input_transform!r}")
        self.save_hyperparameters(ignore=["net", "bank", "teacher", "g_ab", "g_ba", "d_a", "d_b"])  # networks are in the state dict
        self.net = net
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.organs = self.class_names[1:]
        self.dice_loss = DiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=dice_batch)
        self.masked_dice_loss = MaskedDiceLoss(include_background=False, to_onehot_y=True, softmax=True, batch=dice_batch)
        # per-class CE weights (None: unweighted); not saved in checkpoints: `fit` derives them from the data
        self.register_buffer("ce_class_weights", None, persistent=False)
        # per-organ means over the validation cases, each case once also under DDP (the sampler pads with repeats)
        self.val_dice = CaseMeans(len(self.organs))
        self.val_hd = CaseMeans(len(self.organs))
        self._test_rows: List[Dict[str, Any]] = []
        self.test_summary: Optional[Dict] = None
        # what checkpoints record about the training data (set by `fit`, see lightning_distill.fingerprint)
        self.training_data: Dict[str, Any] = {}
        # the learning curve: one [step, val Dice mean, {organ: Dice}] per validation (kept in checkpoints)
        self.val_curve: List[List[Any]] = []
        # the transfer term (set_transfer; None: none)
        self.transfer: Optional[Dict[str, Any]] = None

    # ------------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Every checkpoint (weights-only ones too) carries ``checkpoint["lightning_distill"]``: the
        package version, the class names, the resolved run config, the run's prototype bank so far
        (the :class:`~lightning_distill.bank.callback.PrototypeBank` callback's, when it has accumulated)
        and :attr:`training_data` (``intensity`` fingerprint, ``train_subjects``, ``data`` identity;
        see :func:`lightning_distill.fingerprint.training_record`)."""

        meta: Dict[str, Any] = {"version": __version__, "class_names": list(self.class_names),
                                "config": self.hparams.get("config"), **self.training_data}
        trainer = self._trainer
        for cb in (trainer.callbacks if trainer is not None else []):
            if isinstance(cb, PrototypeBank) and cb.sums is not None:
                meta["prototype_bank"] = bank_record(cb.bank())
        run_id = _wandb_run_id(trainer)
        if run_id:  # `resume` continues this W&B run
            meta["wandb_run_id"] = run_id
        meta["val_curve"] = list(self.val_curve)
        checkpoint["lightning_distill"] = meta

    def on_load_checkpoint(self, checkpoint: Dict[str, Any]) -> None:
        """Refuse a checkpoint of another class set (before any weight is loaded); warn on another version.
        A resumed run continues the checkpoint's learning curve."""
        check_checkpoint(checkpoint, self.class_names)
        curve = (checkpoint.get("lightning_distill") or {}).get("val_curve")
        if curve and not self.val_curve:
            self.val_curve = [list(p) for p in curve]

    # ------------------------------------------------------------------ throughput (docs/gpu.md)
    def set_accel(self, channels_last: bool = False, compile: bool = False) -> Optional[torch.memory_format]:
        """Channels-last weights (``channels_last_3d`` for a 3D network), and/or the network compiled in
        place (``nn.Module.compile``: the state dict, so checkpoints, keep their keys). Returns the memory
        format the inputs should have (``None``: as they are; the DataModule converts them)."""
        fmt = None
        if channels_last:
            three_d = any(isinstance(m, nn.Conv3d) for m in self.net.modules())
            fmt = torch.channels_last_3d if three_d else torch.channels_last
            self.net.to(memory_format=fmt)
        if compile:
            self.net.compile()
        return fmt

    # ------------------------------------------------------------------ core
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def predict_logits(self, x: Tensor) -> Tensor:
        """Logits for a whole input (sliding window when ``roi_size`` is set)."""
        roi = self.hparams.roi_size
        if roi is not None and any(s > r for s, r in zip(x.shape[2:], roi)):
            return sliding_window_inference(x, roi_size=list(roi), sw_batch_size=self.hparams.get("sw_batch_size", 2),
                                            predictor=self.net, overlap=0.25)
        return self.net(x)

    def seg_terms(self, logits: Tensor, label: Tensor) -> Dict[str, Tensor]:
        """Dice and CE; pixels labelled ``IGNORE_INDEX`` (255) count in neither.

        Under DDP the training Dice is that of the global batch (statistics summed over the processes,
        see :mod:`lightning_distill.losses.dice`), so N processes with batches of B optimise the same
        objective as one process with batches of N x B; the cross-entropy, a mean over pixels, needs
        nothing (DDP averages it).
        """
        ignore = label == IGNORE_INDEX
        # on an accelerator, `ignore.any()` would make the host wait for the device every step: there the
        # masked loss is used whatever (with nothing ignored it equals the unmasked one, bit for bit)
        masked = bool(ignore.any()) if label.device.type == "cpu" else True
        if self.hparams.get("dice_batch", True) and self._trainer is not None and self.trainer.world_size > 1:
            # DDP: the Dice of the global batch (a per-image Dice needs no synchronisation)
            mask = (~ignore).float() if masked else None
            dice = batch_dice_loss(logits, label.masked_fill(ignore, 0), mask=mask, sync=self.training)
        elif masked:
            dice = self.masked_dice_loss(logits, label.masked_fill(ignore, 0), mask=(~ignore).float())
        else:
            dice = self.dice_loss(logits, label)
        w = self.ce_class_weights
        ce = F.cross_entropy(logits, label[:, 0], weight=None if w is None else w.to(logits.dtype), ignore_index=IGNORE_INDEX)
        return {"seg_dice": dice, "seg_ce": ce}

    def set_ce_class_weights(self, weights: Optional[Sequence[float]]) -> None:
        """Weight the cross-entropy of class k by ``weights[k]`` (``None``: unweighted)."""
        if weights is not None and len(weights) != self.num_classes:
            raise ValueError(f"{len(weights)} CE class weights for {self.num_classes} classes")
        self.ce_class_weights = None if weights is None else torch.as_tensor(list(weights), dtype=torch.float32,
                                                                              device=self.device)

    def set_transfer(self, mode: str = "soft", weight: float = 1.0, tau: float = 1.0, threshold: float = 0.9,
                     target: str = "teacher", stored_tau: Optional[float] = None) -> None:
        """Learn from the extra training samples ``transfer_*`` of a batch (teacher-labelled slices,
        :mod:`lightning_distill.data.transfer`): ``weight * transfer`` beside the segmentation loss.

        Args:
            mode: ``soft`` (``tau^2 * KL(teacher || student)`` at ``tau``) or ``hard`` (CE on the teacher's
                argmax where its confidence >= ``threshold``); :mod:`lightning_distill.losses.transfer`.
            target: ``teacher`` (its stored probabilities) or ``truth`` (the slices' ground truth through
                the same channel: a control).
            stored_tau: the temperature of the stored probabilities (default ``tau``); another is re-tempered.

        Raises:
            ValueError: an unknown mode or target, ``tau <= 0``, a threshold outside [0, 1].
        """
        if mode not in ("soft", "hard") or target not in ("teacher", "truth"):
            raise ValueError(f"transfer mode must be soft or hard and target teacher or truth, got {mode!r}, {target!r}")
        if tau <= 0 or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"transfer needs tau > 0 and a threshold in [0, 1], got {tau}, {threshold}")
        self.transfer = {"mode": mode, "weight": float(weight), "tau": float(tau), "threshold": float(threshold),
                         "target": target, "stored_tau": float(tau if stored_tau is None else stored_tau)}

    def transfer_term(self, logits: Tensor, batch: Dict) -> Tensor:
        """The transfer loss of the ``transfer_*`` samples' ``logits`` ``(N, K, *spatial)`` (see :meth:`set_transfer`)."""
        t = self.transfer
        if t["target"] == "truth":
            label = batch["transfer_label"].flatten(0, 1)
            target = one_hot_target(label, self.num_classes)
            if t["mode"] == "soft":
                return soft_transfer_loss(logits, target, t["tau"], mask=(label != IGNORE_INDEX))
            return F.cross_entropy(logits.float(), label[:, 0], ignore_index=IGNORE_INDEX)
        soft = batch["transfer_soft"].flatten(0, 1)
        prob, conf = soft[:, :self.num_classes], soft[:, self.num_classes]
        if t["mode"] == "soft":
            return soft_transfer_loss(logits, retemper(prob, t["stored_tau"], t["tau"]), t["tau"])
        return hard_transfer_loss(logits, prob, conf, t["threshold"])

    @staticmethod
    def _eval_pair(logits: Tensor, label: Tensor):
        """Predicted and true label maps with ignored pixels set to background in both."""
        pred = logits.argmax(1, keepdim=True)
        ignore = label == IGNORE_INDEX
        return pred.masked_fill(ignore, 0), label.masked_fill(ignore, 0)

    def extra_terms(self, batch: Dict, logits: Tensor) -> Dict[str, Tensor]:
        """Additional (weighted) loss terms; none for plain segmentation."""
        return {}

    def term_weights(self) -> Dict[str, float]:
        w = {"seg_dice": self.hparams.dice_weight, "seg_ce": self.hparams.ce_weight}
        if self.transfer is not None:
            w["transfer"] = self.transfer["weight"]
        return w

    def model_step(self, batch: Dict, train: bool = True) -> Dict[str, Any]:
        """Shared by train/val/test: logits, every loss term, and their weighted sum.

        In training, a batch's extra samples (:class:`~lightning_distill.data.datamodules.ExtraDraws`) go
        through the network in the same forward: ``union_*`` (labelled slices) join the labelled samples
        for every term, ``transfer_*`` (teacher-labelled slices) give the ``transfer`` term only.
        """
        image, label = batch["image"], batch["label"]
        if self.hparams.input_transform == "class_mean":
            image = class_mean_image(image, label, self.num_classes)
        if not train:
            logits = self.predict_logits(image)
            terms = self.seg_terms(logits, label)
            return {"loss": weighted_sum(terms, self.term_weights()), "logits": logits, "terms": terms}
        if "union_image" in batch:
            image = torch.cat([image, batch["union_image"].flatten(0, 1)])
            label = torch.cat([label, batch["union_label"].flatten(0, 1).to(label.dtype)])
            batch = {**batch, "image": image, "label": label}
        taught = batch.get("transfer_image") if self.transfer is not None else None
        n = image.shape[0]
        every = self.net(image if taught is None else torch.cat([image, taught.flatten(0, 1)]))
        logits = every[:n]
        terms = self.seg_terms(logits, label)
        terms.update(self.extra_terms(batch, logits))
        if taught is not None:
            terms["transfer"] = self.transfer_term(every[n:], batch)
        loss = weighted_sum(terms, self.term_weights())
        return {"loss": loss, "logits": logits, "terms": terms}

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Dict, batch_idx: int):
        out = self.model_step(batch, train=True)
        bs = batch["image"].shape[0]
        # the progress bar reads its value every step: a host sync on an accelerator, so it shows it on CPU only
        self.log("train/loss", out["loss"], prog_bar=self.device.type == "cpu", batch_size=bs)
        for k, v in out["terms"].items():
            self.log(f"train/{k}", v, batch_size=bs)
        self.log_contribution(out)
        # the logits of the batch's own samples (callbacks pair them with batch["label"]; not a union's)
        return {"loss": out["loss"], "logits": out["logits"][:bs].detach()}

    def log_contribution(self, out: Dict[str, Any]) -> None:
        """Log how much the distillation terms move the network (none for plain segmentation)."""

    def validation_step(self, batch: Dict, batch_idx: int):
        out = self.model_step(batch, train=False)
        pred, label = self._eval_pair(out["logits"], batch["label"])
        dice = per_case_dice(pred, label, self.num_classes)
        self.val_dice.update(batch["id"], dice)
        if self.hparams.val_hd95:
            hd = per_case_hd95(pred, label, self.num_classes, batch["spacing"].cpu().numpy())
            self.val_hd.update(batch["id"], hd)
        self.log("val/loss", out["loss"], batch_size=batch["image"].shape[0], sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        per_organ = list(self.val_dice.compute())
        for o, v in zip(self.organs, per_organ):
            self.log(f"val/dice_{o}", v)
        mean = torch.nanmean(torch.stack(per_organ))
        self.log("val/dice", mean, prog_bar=True)
        if self._trainer is not None and not self.trainer.sanity_checking:
            nan_none = lambda v: None if torch.isnan(v) else round(float(v), 5)  # noqa: E731
            self.val_curve.append([int(self.trainer.global_step), nan_none(mean),
                                   {o: nan_none(v) for o, v in zip(self.organs, per_organ)}])
        self.val_dice.reset()
        if self.hparams.val_hd95:
            per_organ = list(self.val_hd.compute())
            for o, v in zip(self.organs, per_organ):
                self.log(f"val/hd95_{o}", v)
            self.log("val/hd95", torch.nanmean(torch.stack(per_organ)))
            self.val_hd.reset()

    def on_test_epoch_start(self) -> None:
        self._test_rows = []

    def test_step(self, batch: Dict, batch_idx: int):
        out = self.model_step(batch, train=False)
        pred, label = self._eval_pair(out["logits"], batch["label"])
        dice = per_case_dice(pred, label, self.num_classes).cpu()
        spacing = batch["spacing"].cpu().numpy()
        hd, sd = per_case_surface_metrics(pred, label, self.num_classes, spacing, self.hparams.surface_tolerance)
        for i, cid in enumerate(batch["id"]):
            self._test_rows.append({"id": cid, "dice": dice[i], "hd95": hd[i], "surface_dice": sd[i]})

    def on_test_epoch_end(self) -> None:
        rows = self._test_rows
        if self.trainer.world_size > 1:  # gather every process's cases (objects: variable length)
            gathered: List = [None] * self.trainer.world_size
            torch.distributed.all_gather_object(gathered, rows)
            seen, rows = set(), []
            for part in gathered:
                for r in part:
                    if r["id"] not in seen:  # the distributed sampler may repeat cases to even out
                        seen.add(r["id"])
                        rows.append(r)
        rows = sorted(rows, key=lambda r: r["id"])
        dice = torch.stack([r["dice"] for r in rows])
        hd = torch.stack([r["hd95"] for r in rows])
        sd = torch.stack([r["surface_dice"] for r in rows])
        summary = summarize(dice, hd, self.organs, surface_dice=sd)
        summary["cases"] = collect_cases([r["id"] for r in rows], dice, hd, self.organs, surface_dice=sd)
        self.test_summary = summary
        nan = lambda v: float("nan") if v is None else v  # noqa: E731
        for metric in ("dice", "hd95", "surface_dice"):  # test/dice, test/dice_liver, test/hd95_liver, ...
            self.log(f"test/{metric}", nan(summary[f"{metric}_mean"]))
            for o in self.organs:
                self.log(f"test/{metric}_{o}", nan(summary[metric][o]))

    def predict_step(self, batch: Dict, batch_idx: int):
        if self.hparams.input_transform != "none":
            raise ValueError(f"a network trained on {self.hparams.input_transform} inputs needs labels to build them "
                             "and cannot predict unlabelled images (use the student)")
        return self.predict_logits(batch["image"]).argmax(1)

    def make_optimizer(self, params=None) -> torch.optim.Optimizer:
        """AdamW over ``params`` (default: the trainable parameters; a frozen teacher's are left out).

        The fused kernel, except under mixed precision (``16-mixed``, ``bf16-mixed``) with gradient clipping:
        a fused optimiser unscales the gradients inside its step, after Lightning would clip them, so
        Lightning's mixed-precision plugin refuses the pair (for bf16 too)."""
        params = [p for p in self.parameters() if p.requires_grad] if params is None else list(params)
        trainer = self._trainer
        if trainer is not None and "mixed" in str(trainer.precision) and trainer.gradient_clip_val:
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        try:  # the fused kernel is ~6x faster than the default loop on CPU (12M params: 8 vs 50 ms)
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay, fused=True)
        except (RuntimeError, ValueError):  # devices or dtypes without a fused kernel
            return torch.optim.AdamW(params, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)

    def configure_optimizers(self):
        opt = self.make_optimizer()
        if self.hparams.scheduler == "cosine":
            total = self.trainer.estimated_stepping_batches
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, int(total)))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        return opt


def weighted_sum(terms: Dict[str, Tensor], weights: Dict[str, float]) -> Tensor:
    """``sum_k weights[k] * terms[k]`` over the terms that have a weight.

    A term of weight 0 still enters, as ``0 * nan_to_num(term)``: it adds exactly nothing to the loss
    or to any gradient, but every parameter it reads stays in the graph, so DDP's gradient reducer
    finds no unused parameter (a feature-bank projector at lambda = 0, a CMEDL teacher at
    ``teacher_weight=0``) and no NaN of a term that does not count can reach the loss.
    """
    total: Any = 0.0
    for k, v in terms.items():
        if k not in weights:
            continue
        w = float(weights[k])
        total = total + (w * v if w != 0.0 else 0.0 * torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0))
    return total


def _wandb_run_id(trainer) -> Optional[str]:
    """The id of the run's W&B run (rank 0, ``logger=wandb``), else ``None``."""
    if trainer is None or not trainer.is_global_zero:
        return None

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger):
            return logger.version
    return None


def checkpoint_class_names(checkpoint: Dict[str, Any]) -> Optional[List[str]]:
    meta = checkpoint.get("lightning_distill") or {}
    names = meta.get("class_names") or (checkpoint.get("hyper_parameters") or {}).get("class_names")
    return list(names) if names is not None else None


def check_checkpoint(checkpoint: Dict[str, Any], class_names: Sequence[str], source: str = "the checkpoint") -> None:
    """Raise ``ValueError`` when ``checkpoint`` was trained on other classes (or another order) than
    ``class_names``; warn when it was written by another lightning_distill version."""

    trained = checkpoint_class_names(checkpoint)
    if trained is None:
        raise ValueError(f"{source} has no class names: it was not written by lightning_distill")
    if trained != list(class_names):
        missing = [c for c in class_names if c not in trained]
        extra = [c for c in trained if c not in class_names]
        raise ValueError(f"{source} was trained on the classes {trained}, this run segments {list(class_names)} "
                         f"(not in the checkpoint: {missing}; not in this run: {extra}"
                         f"{'; same names in another order' if not missing and not extra else ''}). "
                         "A checkpoint can only continue (or initialise) a run with the same class set.")
    version = (checkpoint.get("lightning_distill") or {}).get("version")
    if version is not None and version != __version__:
        warnings.warn(f"{source} was written by lightning_distill {version}, this is {__version__}", stacklevel=2)


TeacherModule = SegmentationModule
"""The 3D teacher is plain supervised segmentation; the prototype bank callback watches it."""
