"""The bank of a ``fit`` run: its settings checked before training, the callback that accumulates it,
and the teacher's bank file written after training (with the teacher's per-class reliability).

``fit`` calls :func:`check_bank_config` and :func:`run_bank_callback` before training and
:func:`export_teacher_bank` (teachers) after it; the pieces they use are in the modules beside this
one (:mod:`.callback`, :mod:`.scan`, :mod:`.axial`, :mod:`.format`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import lightning as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig
from torch import nn

from lightning_distill.bank.axial import check_axial_range
from lightning_distill.bank.callback import PrototypeBank
from lightning_distill.bank.format import save_bank
from lightning_distill.bank.scan import class_reliability, final_bank, format_reliability
from lightning_distill.config.load import to_dict
from lightning_distill.data.datamodules import SegmentationDataModule, SubjectDataset
from lightning_distill.io import file_sha256
from lightning_distill.networks import head_module_name


def teacher_feature_layer(cfg: DictConfig) -> Optional[str]:
    """The module whose input a feature-space teacher bank averages (``bank.feature_layer``, default the
    network's head); ``None`` for a probability-space bank."""
    b = cfg.bank
    return (b.feature_layer or head_module_name(cfg.model.name)) if b.space == "feature" else None


def run_bank_callback(cfg: DictConfig, names: Sequence[str], own_tau: float, out: Path,
                      axial: Optional[Tuple[float, float]]) -> Optional[PrototypeBank]:
    """The run's :class:`PrototypeBank`: a teacher's bank (``bank.*``; ``None`` with ``bank.source=final``,
    whose bank is computed after training) or a student's own prototypes at its temperature ``own_tau``
    (``student_prototypes.pt``, in probability space, beside the bank's other temperatures)."""
    b, teacher = cfg.bank, cfg.stage == "teacher"
    if teacher and b.source == "final":
        return None
    return PrototypeBank(names, space=b.space if teacher else "prob", tau=own_tau, taus=b.taus, momentum=b.momentum,
                         start=b.start, feature_layer=teacher_feature_layer(cfg) if teacher else None,
                         export_path=str(out / (b.export if teacher else "student_prototypes.pt")),
                         metadata={"config": to_dict(cfg), "stage": cfg.stage}, axial_range=axial)


def check_bank_config(cfg: DictConfig, dm: SegmentationDataModule) -> Optional[Tuple[float, float]]:
    """Check ``bank.source``, ``bank.final_split`` and ``bank.axial_range`` against the run before it
    trains; returns the axial range (``None``: whole volumes).

    Raises:
        ValueError: naming the key: a student run with a teacher-only bank setting, an axial range
            that is not ``[lo, hi]`` with ``0 <= lo < hi <= 1``, of 2D data, or of a running bank
            over training patches that crop the axial axis; ``bank.final_split=val`` without
            validation subjects.
    """
    b = cfg.bank
    if cfg.stage != "teacher":
        bad = [k for k, on in (("bank.source=final", b.source != "running"), ("bank.axial_range", b.axial_range is not None)) if on]
        if bad:
            raise ValueError(f"{' and '.join(bad)} set in a student run: they are teacher settings (stage=teacher); a "
                             "student records its own prototypes as a running mean over its 2D batches")
        return None
    axial = check_axial_range(None if b.axial_range is None else list(b.axial_range))
    if axial is not None:
        d = cfg.data
        if len(d.shape) != 3:
            raise ValueError(f"bank.axial_range needs a 3D teacher (data.shape [X, Y, Z], Z axial), got data.shape={list(d.shape)}")
        ps = d.patch_size
        if b.source == "running" and ps and (d.shape[-1] <= 0 or ps[-1] < d.shape[-1]):
            raise ValueError(f"bank.axial_range with bank.source=running needs training patches that span the whole axial axis "
                             f"(a patch does not know where it lies in its volume), but data.patch_size={list(ps)} crops "
                             f"data.shape={list(d.shape)}: use bank.source=final (whole volumes) or a patch_size whose "
                             f"last entry is {d.shape[-1]}")
        if d.source == "nifti" and not str(d.nifti.orientation or "").upper().endswith("S"):
            warnings.warn(f"bank.axial_range counts along the volumes' last axis, from its first slice (0) to its last (1): "
                          f"inferior to superior when data.nifti.orientation ends with S (RAS, LAS, ...), but it is "
                          f"{d.nifti.orientation!r}", stacklevel=2)
        if rank_zero_only.rank == 0:
            z = [2 * f - 1 for f in axial]
            where = (f" (phantom z in [{z[0]:g}, {z[1]:g}], the coordinate of a student's data.phantom.slice_z)"
                     if d.source == "phantom" else " of each volume's field of view")
            print(f"bank.axial_range={list(axial)}: the bank averages the voxels from {axial[0]:g} to {axial[1]:g} of the "
                  f"axial extent{where}")
    if b.source == "final" and b.final_split == "val" and not dm.splits["val"]:
        raise ValueError("bank.source=final with bank.final_split=val needs validation subjects (data.val_subjects > 0, or "
                         "data.splits with val subjects); use bank.final_split=train or both")
    return axial


def final_volumes(dm: SegmentationDataModule, split: str):
    """The whole volumes :func:`~lightning_distill.bank.scan.final_bank` runs over: the training ones
    without augmentation or crops (sharing the training set's cache of decoded volumes) and/or the
    validation ones. Returns ``(datasets, split)``, ``split`` being what is used (``both`` without
    validation subjects is ``train``)."""
    dm.setup()
    train = dm.datasets["train"]
    plain = SubjectDataset(dm.source, train.ids)
    if train.cache is not None:
        plain.cache = train.cache  # it holds the volumes as decoded, before crops and augmentation
    if split == "both" and not dm.splits["val"]:
        print("bank.final_split=both: there is no validation split, the final bank runs over the training volumes only")
        split = "train"
    return {"train": [plain], "val": [dm.datasets["val"]], "both": [plain, dm.datasets["val"]]}[split], split


def export_teacher_bank(cfg: DictConfig, trainer: L.Trainer, module: nn.Module, dm: SegmentationDataModule,
                         bank_cb: Optional[PrototypeBank], path: Path, best: Optional[str], last: Optional[str],
                         fast: Any, axial: Optional[Tuple[float, float]]) -> None:
    """Write the teacher's ``prototypes.pt`` after training (every process calls it; rank 0 writes).

    The best checkpoint's weights (the last weights, with a warning, when there is none) are loaded
    into ``module`` (the test that follows loads the same). With a validation split the teacher's
    per-class reliability on it is recorded in the bank's metadata (else a message says there is
    none). ``bank.source=running`` then re-exports the callback's bank, now that the final checkpoint
    exists (so the file records its hash); ``final`` computes the bank with those weights over the
    volumes of ``bank.final_split`` and records that checkpoint and its hash.
    """
    b, names = cfg.bank, list(module.class_names)
    limit = int(fast) if fast else None  # fast_dev_run: as many batches as it runs
    final = b.source == "final"
    has_val = bool(dm.splits["val"])
    if best is None and (final or has_val) and not fast:  # (fast_dev_run writes no checkpoint: nothing to say)
        why = "no best checkpoint was written (see the warning above)"
        what = " and ".join(w for w, on in (("the final prototype bank", final), ("the teacher's reliability", has_val)) if on)
        warnings.warn(f"{why}: {what} {'use' if final and has_val else 'uses'} the last weights ({last or 'not saved'})",
                      stacklevel=3)
    weights = best or last
    if best:
        module.load_state_dict(torch.load(best, map_location="cpu", weights_only=False)["state_dict"])
    device = trainer.strategy.root_device
    meta: Dict[str, Any] = {}
    dm.setup()
    if has_val:
        rel = class_reliability(module, [dm.datasets["val"]], names, axial_range=axial, device=device, max_batches=limit)
        meta = {"reliability": rel, "reliability_split": "val", "reliability_checkpoint": weights}
        if trainer.is_global_zero:
            what = "volumes" if dm.source.spatial_dims == 3 else "slices"
            on = f"the first {limit} validation batch(es) (fast_dev_run)" if limit else f"{len(dm.splits['val'])} validation {what}"
            print(f"teacher reliability on {on} ({weights or 'the last weights'}"
                  f"{', bank.axial_range=' + str(list(axial)) if axial else ''}):\n{format_reliability(rel)}")
    elif trainer.is_global_zero:
        print("there is no validation split: the prototype bank records no per-class reliability (a student's "
              "distill.row_weight=reliability and distill.min_reliability need it)")
    if not final:
        if bank_cb is not None and bank_cb.sums is not None:
            bank_cb.metadata.update(meta)
            bank_cb.export(trainer, last)
        return
    volumes, split = final_volumes(dm, b.final_split)
    bank = final_bank(module, volumes, names, space=b.space, tau=b.tau, taus=list(b.taus),
                      feature_layer=teacher_feature_layer(cfg),
                      axial_range=axial, device=device, max_batches=limit,
                      metadata={"config": to_dict(cfg), "stage": cfg.stage, "final_split": split, "checkpoint": weights,
                                "checkpoint_sha256": file_sha256(weights) if weights else None, **meta})
    if trainer.is_global_zero:
        save_bank(path, bank)
        print(f"final prototype bank ({bank.meta['volumes']} volumes of bank.final_split={split}, "
              f"{weights or 'the last weights'}) -> {path}")
