"""The data a run config describes: its preprocessing, subjects (source) and Lightning DataModule.

Below :mod:`lightning_distill.train` (which trains on them), :mod:`lightning_distill.inference`
(which preprocesses like them) and the lab (which builds a student's test slices), so that none of
them builds data its own way. A method that trains on a second, unpaired modality hands its
data config in through ``target`` (:func:`build_datamodule`); nothing here names a method but the
check that teacher-labelled slices go with the core method (:func:`transfer_sources`).
"""

from __future__ import annotations

import os
from collections import abc
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_distill.data.datamodules import SegmentationDataModule, SliceDataModule, UnpairedDataModule, VolumeDataModule
from lightning_distill.data.preprocess import Preprocess
from lightning_distill.data.provenance import subject_of
from lightning_distill.data.sources import (PHANTOM_ORIENTATION, DomainShift, NiftiSource, PhantomSource, SubjectSource,
                                            phantom_spec)
from lightning_distill.data.transfer import TeacherSlices
from lightning_distill.devices import uses_cuda
from lightning_distill.fingerprint import training_record


def make_preprocess(cfg: DictConfig) -> Preprocess:
    """The preprocessing of ``cfg``'s data (2D data: one slice, ``Z = 1``).

    NIfTI data follow ``data.nifti``; phantom-trained models get the phantom's HU window (MR
    phantom: per-image 0.5/99.5 percentile normalisation) and array orientation, so they can
    predict NIfTI files too.
    """
    d = cfg.data
    shape = list(d.shape) + ([1] if len(d.shape) == 2 else [])
    if d.source == "nifti":
        n = d.nifti
        return Preprocess(orientation=n.orientation, spacing=list(n.spacing) if n.spacing else None, modality=n.modality,
                          ct_window=tuple(n.ct_window), mr_norm=n.mr_norm, percentiles=tuple(n.percentiles),
                          crop_foreground=n.crop_foreground, crop_threshold=n.crop_threshold,
                          crop_margin=n.crop_margin, shape=shape, resize=n.resize)
    if d.phantom.modality == "MR":  # the phantom source's per-image percentile normalisation
        return Preprocess(orientation=PHANTOM_ORIENTATION, modality="MR", mr_norm="percentile", percentiles=(0.5, 99.5),
                          shape=shape)
    return Preprocess(orientation=PHANTOM_ORIENTATION, modality="CT", ct_window=tuple(d.window), shape=shape)


def build_source(cfg: DictConfig, root: Optional[str] = None, slice_mode: Optional[str] = None,
                 cases: Optional[Sequence[str]] = None) -> SubjectSource:
    """The subjects of ``cfg.data``; for NIfTI data ``root``, ``slice_mode`` and ``cases`` replace
    the config's (the validation volumes of ``data.nifti.val_root``)."""
    d = cfg.data
    if d.source == "phantom":
        p = d.phantom
        return PhantomSource(phantom_spec(p), d.num_subjects, tuple(d.shape), window=tuple(d.window), shift=DomainShift(**p.shift))
    if d.source == "nifti":
        n = d.nifti
        root = root or n.root
        if not root:
            raise ValueError("data.source=nifti needs data.nifti.root (the dataset folder)")
        dims = len(d.shape)
        if dims not in (2, 3):
            raise ValueError(f"data.shape must have 2 (slices) or 3 (volumes) entries, got {list(d.shape)}")
        pre = make_preprocess(cfg)
        if not cfg.classes:
            raise ValueError("data.source=nifti needs `classes`: the experiment's class names, background first "
                             "(the dataset's labels are mapped to them with data.nifti.label_map)")
        cases = list(cases) if cases is not None else (list(n.cases) if n.cases else None)
        return NiftiSource(root, list(cfg.classes), dims, pre, layout=n.layout, image_pattern=n.image_pattern,
                           label_pattern=n.label_pattern, label_map=OmegaConf.to_container(n.label_map),
                           unmapped=n.unmapped, cases=cases, slice_mode=slice_mode or n.slice_mode,
                           on_bad_case=d.on_bad_case, require_foreground=n.require_foreground, on_missing=n.on_missing,
                           open_mode=n.open, cache_dir=n.cache_dir)
    raise ValueError(f"unknown data.source {d.source!r}")


def build_datamodule(cfg: DictConfig, source: Optional[SubjectSource] = None, training: bool = True,
                     target: Optional[DictConfig] = None) -> SegmentationDataModule:
    """The run's data module.

    Args:
        cfg: a run config.
        source: the subjects of ``cfg.data`` (default: :func:`build_source`).
        training: ``False``: evaluation only; neither ``target`` nor the separate validation volumes
            of ``data.nifti.val_root`` nor the extra training slices of ``transfer.*`` are read.
        target: a second, unpaired modality (a run config whose ``data`` describes it; a method's
            ``target_config`` hook gives it, :func:`lightning_distill.methods.target_config`):
            training batches then also carry its ``image_b`` (:class:`UnpairedDataModule`).
    """
    source = source or build_source(cfg)
    d = cfg.data
    common = dict(batch_size=d.batch_size, val_subjects=d.val_subjects, test_subjects=d.test_subjects,
                  train_fraction=d.train_fraction, train_subjects=d.train_subjects, split_seed=d.split_seed,
                  num_workers=loader_workers(cfg), augment=d.augment, spatial_augment=d.spatial_augment,
                  patch_size=d.patch_size, eval_batch_size=d.eval_batch_size,
                  splits=OmegaConf.to_container(d.splits) if d.splits else None, seed=cfg.seed)
    if training and target is not None:
        t, tcfg = target.data, target.copy()
        if not tcfg.classes:  # the target's labels are not used; NIfTI reading still maps them to classes
            tcfg.classes = list(source.class_names)
        return UnpairedDataModule(source, build_source(tcfg), target_val_subjects=t.val_subjects,
                                  target_test_subjects=t.test_subjects, target_fraction=t.train_fraction,
                                  target_split_seed=t.split_seed,
                                  target_splits=OmegaConf.to_container(t.splits) if t.splits else None, **common)
    cls = VolumeDataModule if source.spatial_dims == 3 else SliceDataModule
    extras = transfer_sources(cfg, source) if training else {}
    return cls(source, val_source=val_source(cfg, source) if training else None, extras=extras, **common)


def transfer_sources(cfg: DictConfig, source: SubjectSource) -> Dict[str, Tuple[SubjectSource, int]]:
    """The extra training samples of ``transfer.slices`` and ``transfer.union`` (``teach`` folders) as
    :class:`~lightning_distill.data.datamodules.SegmentationDataModule` ``extras``: ``{"transfer": (slices,
    ratio), "union": (slices, union_ratio)}``, each when set.

    Raises:
        ValueError: a teacher run, 3D data, another method than ``prototype`` (naming the key), a ratio < 1.
    """
    t = cfg.transfer
    if not t.slices and not t.union:
        return {}
    if cfg.stage != "student" or source.spatial_dims != 2:
        raise ValueError("transfer.slices / transfer.union are for 2D students (stage=student, data.shape [X, Y])")
    if cfg.distill.method != "prototype":
        raise ValueError(f"transfer.slices / transfer.union go with distill.method=prototype (the baseline at "
                         f"distill.weight=0, or prototype DIST), not {cfg.distill.method}")
    names = list(cfg.classes) if cfg.classes else list(source.class_names)
    select = OmegaConf.to_container(t.select)
    extras: Dict[str, Tuple[SubjectSource, int]] = {}
    for key, path, ratio, need in (("transfer", t.slices, t.ratio, "truth" if t.target == "truth" else "teacher"),
                                   ("union", t.union, t.union_ratio, "truth")):
        if not path:
            continue
        if int(ratio) < 1:
            raise ValueError(f"transfer.{'ratio' if key == 'transfer' else 'union_ratio'} must be at least 1, got {ratio}")
        extras[key] = (TeacherSlices(path, names, select=select, need=need), int(ratio))
        if rank_zero_only.rank == 0:
            src = extras[key][0]
            print(f"transfer.{'slices' if key == 'transfer' else 'union'}: {len(src.ids)} slices of {src.record()['volumes']} "
                  f"volumes from {path} ({ratio} per labelled slice" + (f"; select {select}" if select else "")
                  + (f"; left out {src.left_out}" if any(src.left_out.values()) else "") + ")", flush=True)
    return extras


def val_source(cfg: DictConfig, source: SubjectSource) -> Optional[SubjectSource]:
    """Every axial slice of the validation patients' volumes in ``data.nifti.val_root`` (2D NIfTI
    runs that set it), else ``None`` (validation on ``source``)."""
    d = cfg.data
    if d.source != "nifti" or not d.nifti.val_root:
        return None
    if source.spatial_dims != 2:
        raise ValueError("data.nifti.val_root is for 2D runs (validation on every axial slice of volumes); "
                         f"this run's data.shape {list(d.shape)} is 3D")
    if not (d.splits and d.splits.get("val")):
        raise ValueError("data.nifti.val_root needs data.splits with the val cases (their volumes are read from "
                         f"{d.nifti.val_root})")
    return build_source(cfg, root=d.nifti.val_root, slice_mode="all", cases=list(d.splits.val))


def class_names(cfg: DictConfig, source: SubjectSource):
    names = list(cfg.classes) if cfg.classes else list(source.class_names)
    if list(source.class_names) != names:
        raise ValueError(f"config classes {names} differ from the data's classes {list(source.class_names)}")
    return names


def loader_workers(cfg: DictConfig) -> int:
    """``data.num_workers``, with ``auto``: 0 on CPU (the loaders keep ahead of training with the cores
    free for it, docs/performance.md), on a GPU ``min(8, cores per device - 1)``.

    Raises:
        ValueError: neither ``auto`` nor an integer >= 0.
    """
    n = cfg.data.num_workers
    if isinstance(n, str) and n.strip().lower() == "auto":
        user = OmegaConf.to_container(cfg.trainer)
        if not uses_cuda(user):
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores // process_count(user) - 1))
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"data.num_workers must be auto or an integer >= 0, got {n!r}")
    return n


def process_count(targs: Dict[str, Any]) -> int:
    """Training processes on this node for trainer arguments ``targs`` (1 unless ``devices`` asks for more)."""
    devices = targs.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    return int(devices) if str(devices).isdigit() and int(devices) > 0 else 1


def training_class_voxels(dm: SegmentationDataModule, num_classes: int) -> List[int]:
    """Voxels of each class in the training labels (through the training set's cache; ignored voxels
    and labels outside ``[0, num_classes)`` are not counted)."""
    dm.setup()
    train_set = dm.datasets["train"]
    counts = torch.zeros(num_classes, dtype=torch.long)
    for sid in train_set.ids:
        label = train_set._load(sid)["label"].long().flatten()
        label = label[(label >= 0) & (label < num_classes)]
        counts += torch.bincount(label, minlength=num_classes)
    return counts.tolist()


def balanced_class_weights(counts: Sequence[int]) -> List[float]:
    """sklearn's "balanced" class weights ``N / (K * n_k)`` (a class with no voxel: 1)."""
    total, k = float(sum(counts)), len(counts)
    return [total / (k * n) if n > 0 else 1.0 for n in counts]


def training_record_of(cfg: DictConfig, dm: SegmentationDataModule) -> Dict[str, Any]:
    """What the run's checkpoints record about its training data (:func:`~lightning_distill.fingerprint.training_record`),
    read through the training set's cache (training reuses the decoded samples); the intensity threshold is
    calibrated on the validation samples (held out, of the training kind)."""
    dm.setup()
    train_set = dm.datasets["train"]
    preprocessing = {"source": cfg.data.source, **make_preprocess(cfg).intensity_settings()}
    val_set = dm.datasets.get("val")
    held_out = {i: (lambda i=i: val_set._load(i)["image"].numpy()) for i in (val_set.ids if val_set is not None else [])}
    return training_record(cfg, dm, lambda sid: train_set._load(sid)["image"].numpy(), preprocessing,
                           raw_profiles(dm.source, dm.train_ids), training_identities(dm), held_out)


def training_identities(dm: SegmentationDataModule) -> List[str]:
    """Every subject a training sample of ``dm`` comes from: its training subjects and the subjects of its extra
    training sources (``transfer.slices``, ``transfer.union``), as :mod:`~lightning_distill.data.provenance`
    identities."""
    ids = {dm.source.subject_identity(s) for s in dm.train_subject_ids}
    for src, _ in dm.extras.values():
        ids |= {src.subject_identity(s) for s in {subject_of(i) for i in src.ids}}
    return sorted(ids)


class RawProfiles(abc.Mapping):
    """Raw intensity quantile profiles of the samples ``ids``, looked up when asked (NIfTI sources keep
    one per case read so far, a lazily opened one only after the case is read; a sample
    ``"<case>@<z>"`` is a slice of its case); empty for sources without them (the phantom)."""

    def __init__(self, source, ids):
        self.raw, self.ids = getattr(source, "raw_quantiles", {}), list(ids)

    def __getitem__(self, i):
        return self.raw[subject_of(i)]

    def __iter__(self):
        return (i for i in self.ids if subject_of(i) in self.raw)

    def __len__(self):
        return sum(1 for _ in self)


def raw_profiles(source, ids) -> Mapping:
    return RawProfiles(source, ids)
