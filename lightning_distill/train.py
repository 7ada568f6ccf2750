"""Build data, network, module, callbacks and trainer from a :class:`RunConfig` and run ``fit``.

Every run writes into ``output_dir``: the resolved ``config.yaml``, ``checkpoints/`` (``best.ckpt``
by ``val/dice`` and ``last.ckpt``), ``logs/`` (CSV metrics), ``results.json`` and, for a teacher,
the prototype bank (``prototypes.pt``); a student also exports its own prototypes
(``student_prototypes.pt``) for comparison.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from collections import abc
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import lightning as L
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_distill import __version__
from lightning_distill.config import to_dict
from lightning_distill.data.datamodules import (SegmentationDataModule, SliceDataModule, UnpairedDataModule, VolumeDataModule,
                                                subject_of)
from lightning_distill.data.sources import DomainShift, NiftiSource, PhantomSource, SubjectSource, phantom_spec
from lightning_distill.factory import build_net, make_preprocess
from lightning_distill.fingerprint import check_samples, data_identity, fingerprint_summary, training_record
from lightning_distill.io import atomic_write, write_json
from lightning_distill.metrics import format_table
from lightning_distill.methods import method_builder
from lightning_distill.modules import SegmentationModule
from lightning_distill.networks import head_module_name
from lightning_distill.prototypes import (PrototypeBank, check_axial_range, class_reliability, file_sha256,
                                          final_bank, format_reliability, save_bank)


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


def uses_target(cfg: DictConfig) -> bool:
    """Whether the run trains on two modalities (CMEDL: ``cfg.cmedl.target`` beside ``cfg.data``)."""
    return cfg.stage == "student" and cfg.distill.method == "cmedl"


def target_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` with ``data`` replaced by ``cmedl.target`` (to build the teacher modality's source).

    The target's labels are not used, so classes it lacks are a warning there, not an error.
    """
    tcfg = cfg.copy()
    tcfg.data = cfg.cmedl.target
    tcfg.data.nifti.on_missing = "warn"
    return tcfg


def build_datamodule(cfg: DictConfig, source: Optional[SubjectSource] = None,
                     target: Optional[SubjectSource] = None, training: bool = True) -> SegmentationDataModule:
    """The run's data module; with CMEDL, training batches also carry unpaired ``image_b`` of
    ``cmedl.target`` (``training=False``: evaluation only, neither the target data nor the separate
    validation volumes of ``data.nifti.val_root`` are read)."""
    source = source or build_source(cfg)
    d = cfg.data
    common = dict(batch_size=d.batch_size, val_subjects=d.val_subjects, test_subjects=d.test_subjects,
                  train_fraction=d.train_fraction, train_subjects=d.train_subjects, split_seed=d.split_seed,
                  num_workers=loader_workers(cfg), augment=d.augment, spatial_augment=d.spatial_augment,
                  patch_size=d.patch_size, eval_batch_size=d.eval_batch_size,
                  splits=OmegaConf.to_container(d.splits) if d.splits else None, seed=cfg.seed)
    if training and uses_target(cfg):
        t = cfg.cmedl.target
        if target is None:
            tcfg = target_config(cfg)
            if not tcfg.classes:  # the target's labels are not used; NIfTI reading still maps them to classes
                tcfg.classes = list(source.class_names)
            target = build_source(tcfg)
        return UnpairedDataModule(source, target, target_val_subjects=t.val_subjects, target_test_subjects=t.test_subjects,
                                  target_fraction=t.train_fraction, target_split_seed=t.split_seed,
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
    from lightning_distill.data.transfer import TeacherSlices

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


def build_module(cfg: DictConfig, names) -> SegmentationModule:
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


class LastCheckpoint(Checkpoint):
    """``last.ckpt``: the newest training state, for ``resume``.

    Written every ``every_n_steps`` training steps (``trainer.global_step``; ``None``: never
    mid-epoch), after every validation, and when training ends unless already written at that step,
    whether or not ``val/dice`` improved (Lightning's own ``save_last`` only follows a top-k save).
    Never during the sanity check, with ``fast_dev_run`` or outside ``fit``. Written through
    ``trainer.save_checkpoint``, so by the trainer's CheckpointIO (:class:`AtomicCheckpointIO`: an
    atomic write); every DDP process calls it (it gathers state collectively) and rank 0 writes.
    A callback on public hooks: ``ModelCheckpoint`` could only do this through its private methods.

    Args:
        dirpath: the folder of ``last.ckpt``.
        every_n_steps: write every this many training steps; ``None`` or 0: only after validation
            and at the end.
        weights_only: write the weights without optimizer and loop state (such a file cannot resume).
        min_interval_s: skip a write (not the final one) sooner than this many seconds after the
            previous write (0: never skip). Under DDP rank 0's clock decides for every process.

    Raises:
        ValueError: ``every_n_steps`` or ``min_interval_s`` is negative.
    """

    FILENAME = "last.ckpt"

    def __init__(self, dirpath, every_n_steps: Optional[int] = None, weights_only: bool = False,
                 min_interval_s: float = 0.0):
        super().__init__()
        if every_n_steps is not None and every_n_steps < 0:
            raise ValueError(f"every_n_steps must be a positive number of steps, 0 or None, got {every_n_steps}")
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.min_interval_s = float(min_interval_s)
        self.saved_at = time.monotonic()  # the start counts as a write: the first one comes min_interval_s later
        self.dirpath = os.path.realpath(os.path.expanduser(str(dirpath)))  # as ModelCheckpoint resolves it
        self.every_n_steps = every_n_steps or 0
        self.weights_only = weights_only
        self.last_model_path = ""  # last.ckpt once written
        self.step_saved = 0  # the global step last written; none at train end when no step was taken

    @property
    def state_key(self) -> str:
        # the ModelCheckpoint-based LastCheckpoint's key: its checkpoints resume without a missing-callback warning
        key = {"monitor": None, "mode": "min", "every_n_train_steps": self.every_n_steps, "every_n_epochs": 0,
               "train_time_interval": None}
        return f"{type(self).__qualname__}{key!r}"

    def save(self, trainer: L.Trainer, final: bool = False) -> None:
        """Write ``last.ckpt`` (on every process), except in a sanity check, ``fast_dev_run`` or outside ``fit``,
        or (unless ``final``) sooner than ``min_interval_s`` after the previous write."""
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.state.fn != "fit":
            return
        if self.min_interval_s > 0 and not final:
            due = time.monotonic() - self.saved_at >= self.min_interval_s
            if not trainer.strategy.broadcast(due, src=0):  # one decision for every process: the save is collective
                return
        self.last_model_path = os.path.join(self.dirpath, self.FILENAME)  # before the save: it is part of the state
        trainer.save_checkpoint(self.last_model_path, weights_only=self.weights_only)
        self.step_saved = trainer.global_step
        self.saved_at = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps and step % self.every_n_steps == 0 and step != self.step_saved:
            self.save(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self.save(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if trainer.global_step != self.step_saved:
            self.save(trainer, final=True)

    def state_dict(self) -> Dict[str, Any]:
        return {"dirpath": self.dirpath, "last_model_path": self.last_model_path}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores ``last_model_path`` (from ``best_model_path`` in checkpoints written before 0.4.0,
        whose ModelCheckpoint-based callback kept last.ckpt there)."""
        self.last_model_path = state_dict.get("last_model_path") or state_dict.get("best_model_path") or self.last_model_path


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written to a temporary file in their own folder, then renamed into place.

    Lightning's own save goes through fsspec, which stages a local file in the system temporary
    folder (``/tmp``) and moves it: across file systems (node-local ``/tmp``, shared output folder)
    the move is a copy, and a job killed during it leaves a truncated ``last.ckpt``. Remote URLs keep
    Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: Dict[str, Any], path, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None or "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def _with_atomic_checkpoints(plugins: Any) -> list:
    plugins = list(plugins if isinstance(plugins, (list, tuple)) else [plugins] if plugins else [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


def loader_workers(cfg: DictConfig) -> int:
    """``data.num_workers``, with ``auto``: 0 on CPU (the loaders keep ahead of training with the cores
    free for it, docs/performance.md), on a GPU ``min(8, cores per device - 1)``.

    Raises:
        ValueError: neither ``auto`` nor an integer >= 0.
    """
    n = cfg.data.num_workers
    if isinstance(n, str) and n.strip().lower() == "auto":
        from lightning_distill.devices import uses_cuda

        user = OmegaConf.to_container(cfg.trainer)
        if not uses_cuda(user):
            return 0
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        return max(0, min(8, cores // _process_count(user) - 1))
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"data.num_workers must be auto or an integer >= 0, got {n!r}")
    return n


def _process_count(targs: Dict[str, Any]) -> int:
    """Training processes on this node for trainer arguments ``targs`` (1 unless ``devices`` asks for more)."""
    devices = targs.get("devices", 1)
    if isinstance(devices, (list, tuple)):
        return max(1, len(devices))
    return int(devices) if str(devices).isdigit() and int(devices) > 0 else 1


def _trainer_args(cfg: DictConfig, say: bool = True) -> Dict[str, Any]:
    """The run's ``trainer.*`` settings over the defaults chosen for this machine
    (:mod:`lightning_distill.devices`); the choices are printed once (rank 0) when ``say``."""
    from lightning_distill.devices import apply_trainer_defaults

    targs, notes = apply_trainer_defaults(OmegaConf.to_container(cfg.trainer))
    if say and notes and rank_zero_only.rank == 0:
        print("trainer defaults for this machine: " + "; ".join(notes))
    return targs


def _logger(cfg: DictConfig, out: Path, wandb_run_id: Optional[str] = None):
    """The run's logger. W&B runs offline (``<output_dir>/wandb/offline-run-*``) unless the user set
    ``WANDB_MODE`` (e.g. ``online`` with a configured server); the project is ``WANDB_PROJECT`` or
    ``lightning_distill``; the resolved config is the run's config (a plain dict). ``wandb_run_id``
    (a resumed checkpoint's) continues that W&B run, unless ``WANDB_RUN_ID`` says otherwise."""
    if cfg.logger == "none":
        return False
    if cfg.logger == "wandb":
        from lightning.pytorch.loggers import WandbLogger

        os.environ.setdefault("WANDB_MODE", "offline")
        run_id = os.environ.get("WANDB_RUN_ID") or wandb_run_id
        return WandbLogger(save_dir=str(out), project=os.environ.get("WANDB_PROJECT", "lightning_distill"),
                           name=out.name, config=to_dict(cfg), id=run_id)
    if cfg.logger == "tensorboard":
        import importlib.util

        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise ValueError("logger=tensorboard needs the tensorboard package (pip install tensorboard); "
                             "logger=csv and logger=wandb need nothing extra")
        from lightning.pytorch.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=str(out), name="", version="tensorboard")
    from lightning.pytorch.loggers import CSVLogger

    return CSVLogger(save_dir=str(out), name="", version="logs")


def _finish_logger(logger, files: Dict[str, Optional[str]], is_global_zero: bool) -> None:
    """W&B: log ``files`` (``{artifact type: path}``) as artifacts, then close the run (a later
    ``fit`` in the same process starts its own)."""
    from lightning.pytorch.loggers import WandbLogger

    if isinstance(logger, WandbLogger) and is_global_zero:
        from lightning_distill.visuals import log_artifacts

        log_artifacts(logger, files, logger.experiment.name or "run")
        logger.experiment.finish()


def fit(cfg: DictConfig, source: Optional[SubjectSource] = None) -> Dict[str, Any]:
    """Train, test on the held-out split, and write the run's outputs. Returns ``results.json``'s dict.

    Args:
        cfg: a validated run config (:func:`lightning_distill.config.load_config`).
        source: the data source built from ``cfg.data`` (default: built here); benchmarks pass one
            to reuse it across runs on the same data.
    """
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = source or build_source(cfg)
    names = class_names(cfg, source)
    resume, resume_step, resume_meta = resume_checkpoint(cfg, names)  # refused before output_dir is touched
    if rank_zero_only.rank == 0:  # DDP processes re-run this function; one of them writes
        atomic_write(out / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
    dm = build_datamodule(cfg, source)
    module = build_module(cfg, names)
    module.training_data = _training_record(cfg, dm)
    if getattr(dm, "extras", None):
        _set_transfer(cfg, module, dm)
    if cfg.loss.class_balance == "inverse_frequency":
        weights = balanced_class_weights(training_class_voxels(dm, len(names)))
        module.set_ce_class_weights(weights)
        module.training_data["ce_class_weights"] = dict(zip(names, weights))
        if rank_zero_only.rank == 0:
            print("loss.class_balance=inverse_frequency: CE weights " + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, weights)))

    teacher = cfg.stage == "teacher"
    b = cfg.bank
    axial = check_bank_config(cfg, dm)  # refused before training starts
    # a student records its own prototypes at its own temperature (distill.tau), beside the bank's others
    own_tau = b.tau if teacher else float(getattr(module, "tau", b.tau))
    # bank.source=final: no running bank; the teacher's bank is computed after training (_export_teacher_bank)
    bank_cb = None if teacher and b.source == "final" else PrototypeBank(
        names, space=b.space if teacher else "prob", tau=own_tau, taus=b.taus, momentum=b.momentum, start=b.start,
        feature_layer=(b.feature_layer or head_module_name(cfg.model.name)) if b.space == "feature" and teacher else None,
        export_path=str(out / (b.export if teacher else "student_prototypes.pt")),
        metadata={"config": to_dict(cfg), "stage": cfg.stage}, axial_range=axial)
    targs = _trainer_args(cfg)
    from lightning_distill.devices import accel_settings, minutes_setting, uses_cuda

    on_cuda = uses_cuda(targs)
    accel, accel_notes = accel_settings(cfg.accel, on_cuda, len(cfg.data.shape))
    dm.memory_format = module.set_accel(channels_last=accel["channels_last"], compile=accel["compile"])
    if accel["matmul_precision"]:
        torch.set_float32_matmul_precision(accel["matmul_precision"])
    if accel_notes and rank_zero_only.rank == 0:
        print("throughput: " + "; ".join(accel_notes))
    processes = _process_count(targs)
    if (cfg.data.source == "nifti" and cfg.data.nifti.open == "eager" and processes * max(1, dm.num_workers) > 1
            and rank_zero_only.rank == 0):
        print(f"data.nifti.open=eager holds every preprocessed case in memory in each of the {processes} "
              f"process(es), and loader workers copy pages of it as they touch them: for a large dataset use "
              "data.nifti.open=lazy data.nifti.cache_dir=<folder> (bounded memory, each case read from the cache; docs/data.md)")
    fast = bool(targs.get("fast_dev_run"))
    every = cfg.checkpoint.every_n_steps
    if every is not None and every < 1:
        raise ValueError(f"checkpoint.every_n_steps must be a positive number of steps or null, got {every}")
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor="val/dice", mode="max",
                           save_top_k=1, save_last=False, auto_insert_metric_name=False,
                           enable_version_counter=False,  # best.ckpt keeps its name in a re-used output_dir
                           save_weights_only=cfg.checkpoint.weights_only)
    callbacks = [c for c in (bank_cb, ckpt) if c is not None]
    last_cb = None
    ckpt_minutes = minutes_setting(cfg.checkpoint.min_minutes, "checkpoint.min_minutes", on_cuda, 5.0)
    picture_minutes = minutes_setting(cfg.pictures_min_minutes, "pictures_min_minutes", on_cuda, 10.0)
    if on_cuda and rank_zero_only.rank == 0:
        print(f"on a GPU: last.ckpt at most every {ckpt_minutes:g} min (checkpoint.min_minutes), pictures at most every "
              f"{picture_minutes:g} min (pictures_min_minutes)")
    if cfg.checkpoint.save_last and not fast:
        last_cb = LastCheckpoint(out / "checkpoints", every_n_steps=every, weights_only=cfg.checkpoint.weights_only,
                                 min_interval_s=60.0 * ckpt_minutes)
        callbacks.append(last_cb)
    if cfg.pictures > 0:
        from lightning_distill.visuals import RunPictures

        callbacks.append(RunPictures(out, names, num_samples=cfg.pictures, min_interval_s=60.0 * picture_minutes))
    previous_log = _previous_csv_rows(cfg, out, resume_step) if resume else []
    logger = _logger(cfg, out, resume_meta.get("wandb_run_id"))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if previous_log:  # a new CSV logger empties metrics.csv: keep the interrupted run's rows
        for row in previous_log:
            logger.experiment.log_metrics(row, step=int(row.pop("step")))
    targs["plugins"] = _with_atomic_checkpoints(targs.get("plugins"))
    trainer = L.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks, **targs)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    last = (last_cb.last_model_path or None) if last_cb is not None else None
    best = None if fast else (ckpt.best_model_path or None)
    if not fast and best is None:
        _warn_no_best(out, dm, targs, last)
    if teacher:  # reliability (and bank.source=final's bank) from the best weights, then the bank file
        _export_teacher_bank(cfg, trainer, module, dm, bank_cb, out / b.export, best, last, targs.get("fast_dev_run"), axial)
    elif bank_cb.sums is not None:  # re-export now that the final checkpoint exists (records its hash)
        bank_cb.export(trainer, last)
    trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
    figure = None
    if uses_target(cfg) and trainer.is_global_zero and cfg.cmedl.examples > 0:
        from lightning_distill.methods.cmedl import save_translation_figure

        figure = save_translation_figure(module, dm, out / "translations.png", cfg.cmedl.examples)
    extra = {"val": {"dice_best": None if ckpt.best_model_score is None else float(ckpt.best_model_score)},
             "train_subjects": len(dm.train_subject_ids), "checkpoint": best or last,
             "steps": trainer.global_step, "val_curve": module.val_curve,
             "prototypes": str(out / b.export) if teacher else cfg.distill.prototypes,
             "intensity": fingerprint_summary(module.training_data["intensity"])}
    if figure:
        extra["translations"] = str(figure)
    results = _write_results(trainer, module, cfg, out / "results.json", extra, t0,
                             f"{len(dm.train_subject_ids)} training subjects", overlap=0)
    own_bank = str(out / (b.export if teacher else "student_prototypes.pt"))
    _finish_logger(logger, {"prototype-bank": own_bank, "teacher-prototype-bank": None if teacher else cfg.distill.prototypes,
                            "model": best, "results": str(out / "results.json")}, trainer.is_global_zero)
    return results


def _set_transfer(cfg: DictConfig, module: SegmentationModule, dm: SegmentationDataModule) -> None:
    """Switch on the transfer term of ``transfer.slices`` (its temperature: ``transfer.tau``, default the
    folder's) and record the extra slices in the run's checkpoints."""
    t = cfg.transfer
    module.training_data["transfer"] = {name: src.record() for name, (src, _) in dm.extras.items()}
    if "transfer" in dm.extras:
        stored = dm.extras["transfer"][0].meta.get("tau")
        module.set_transfer(mode=t.mode, weight=t.weight, tau=float(t.tau if t.tau is not None else (stored or 1.0)),
                            threshold=t.threshold, target=t.target, stored_tau=stored)


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


def _final_volumes(dm: SegmentationDataModule, split: str):
    """The whole volumes :func:`~lightning_distill.prototypes.final_bank` runs over: the training ones
    without augmentation or crops (sharing the training set's cache of decoded volumes) and/or the
    validation ones. Returns ``(datasets, split)``, ``split`` being what is used (``both`` without
    validation subjects is ``train``)."""
    from lightning_distill.data.datamodules import SubjectDataset

    dm.setup()
    train = dm.datasets["train"]
    plain = SubjectDataset(dm.source, train.ids)
    if train.cache is not None:
        plain.cache = train.cache  # it holds the volumes as decoded, before crops and augmentation
    if split == "both" and not dm.splits["val"]:
        print("bank.final_split=both: there is no validation split, the final bank runs over the training volumes only")
        split = "train"
    return {"train": [plain], "val": [dm.datasets["val"]], "both": [plain, dm.datasets["val"]]}[split], split


def _export_teacher_bank(cfg: DictConfig, trainer: L.Trainer, module: SegmentationModule, dm: SegmentationDataModule,
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
    volumes, split = _final_volumes(dm, b.final_split)
    feature_layer = (b.feature_layer or head_module_name(cfg.model.name)) if b.space == "feature" else None
    bank = final_bank(module, volumes, names, space=b.space, tau=b.tau, taus=list(b.taus), feature_layer=feature_layer,
                      axial_range=axial, device=device, max_batches=limit,
                      metadata={"config": to_dict(cfg), "stage": cfg.stage, "final_split": split, "checkpoint": weights,
                                "checkpoint_sha256": file_sha256(weights) if weights else None, **meta})
    if trainer.is_global_zero:
        save_bank(path, bank)
        print(f"final prototype bank ({bank.meta['volumes']} volumes of bank.final_split={split}, "
              f"{weights or 'the last weights'}) -> {path}")


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


def _training_record(cfg: DictConfig, dm: SegmentationDataModule) -> Dict[str, Any]:
    """What the run's checkpoints record about its training data (:func:`~lightning_distill.fingerprint.training_record`),
    read through the training set's cache (training reuses the decoded samples)."""
    dm.setup()
    train_set = dm.datasets["train"]
    preprocessing = {"source": cfg.data.source, **make_preprocess(cfg).intensity_settings()}
    return training_record(cfg, dm, lambda sid: train_set._load(sid)["image"].numpy(), preprocessing,
                           _raw_profiles(dm.source, dm.train_ids))


class _RawProfiles(abc.Mapping):
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


def _raw_profiles(source, ids) -> Mapping:
    return _RawProfiles(source, ids)


def _warn_no_best(out: Path, dm: SegmentationDataModule, targs: Dict[str, Any], last: Optional[str]) -> None:
    """Why ``best.ckpt`` (chosen by ``val/dice``) was not written, when training ended without one."""
    best = out / "checkpoints" / "best.ckpt"
    if not dm.splits["val"]:
        why = ("there is no validation split (data.val_subjects=0, or data.splits without val subjects), so nothing "
               f"chooses a best checkpoint and {best} was not written")
    else:
        why = (f"no validation ran during training (trainer.max_steps={targs.get('max_steps')} ends before the first "
               f"validation epoch), so {best} was not written")
    warnings.warn(f"{why}: testing the last weights ({last or 'not saved'})", stacklevel=3)


def resume_checkpoint(cfg: DictConfig, names) -> Tuple[Optional[str], int, Dict[str, Any]]:
    """The checkpoint ``fit`` continues from (``cfg.resume``), its step and its ``lightning_distill``
    record (``{}`` without one), checked before training starts.

    ``resume=auto`` takes ``<output_dir>/checkpoints/last.ckpt`` when it exists and starts afresh
    otherwise (so a pre-empted job can be re-submitted with the same command). The checkpoint must be
    readable, hold optimizer state (not ``checkpoint.weights_only``) and segment the same classes;
    config values that differ from the checkpoint's (other than ``trainer``, ``resume``, ``logger``,
    ``pictures``) are listed in a warning.
    """
    from lightning_distill.inference import load_checkpoint
    from lightning_distill.modules import check_checkpoint

    if not cfg.resume:
        return None, 0, {}
    auto = cfg.resume == "auto"
    path = Path(cfg.output_dir) / "checkpoints" / "last.ckpt" if auto else Path(cfg.resume)
    if auto and not path.is_file():
        print(f"resume=auto: no {path} yet, starting from scratch")
        return None, 0, {}
    ckpt, old = load_checkpoint(path)
    check_checkpoint(ckpt, names, f"checkpoint {path}")
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(f"checkpoint {path} holds weights only (checkpoint.weights_only=true) and cannot resume training; "
                         "to start a new run from its weights, use it as a teacher or drop `resume`")
    now, then = _flat(to_dict(cfg)), _flat(to_dict(old))
    changed = sorted(k for k in now.keys() | then.keys()
                     if k.split(".")[0] not in ("trainer", "resume", "logger", "pictures") and now.get(k) != then.get(k))
    if changed:
        warnings.warn(f"resuming from {path} with config values that differ from the checkpoint's: "
                      + ", ".join(f"{k}={now.get(k)!r} (was {then.get(k)!r})" for k in changed), stacklevel=2)
    print(f"resuming from {path} (step {ckpt.get('global_step')}, epoch {ckpt.get('epoch')})")
    return str(path), int(ckpt.get("global_step", 0)), dict(ckpt.get("lightning_distill") or {})


def _flat(d: Any, prefix: str = "") -> Dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    items: Dict[str, Any] = {}
    for k, v in d.items():
        items.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return items


def _previous_csv_rows(cfg: DictConfig, out: Path, step: int) -> list:
    """Rows of ``logs/metrics.csv`` up to the resumed checkpoint's ``step`` (a resumed run re-logs the rest)."""
    csv_path = out / "logs" / "metrics.csv"
    if cfg.logger != "csv" or not csv_path.is_file() or rank_zero_only.rank != 0:
        return []
    import csv

    rows = []
    with csv_path.open(newline="") as f:
        for r in csv.DictReader(f):
            row = {k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in r.items() if v not in (None, "")}
            s = row.get("step")
            if s is not None and (s < step or (s == step and any(k.startswith("val/") for k in row))):
                rows.append(row)
    return rows


def training_subjects_in(record: Mapping[str, Any], cfg: DictConfig, subjects: Sequence[str]) -> Optional[int]:
    """How many of ``subjects`` (of ``cfg``'s data) a checkpoint was trained on, from its
    ``checkpoint["lightning_distill"]`` ``record``: 0 when ``cfg`` reads other data than the
    training's (:func:`~lightning_distill.fingerprint.data_identity`), ``None`` (unknown) when the
    checkpoint has no record of its training subjects (written by an older version)."""
    if "train_subjects" not in record:
        return None
    if record.get("data") != data_identity(cfg):
        return 0
    return len(set(subjects) & set(record["train_subjects"]))


def describe_test_set(num_samples: Optional[int], num_subjects: int, overlap: Optional[int], all_subjects: bool) -> str:
    """The tested samples in words, e.g. ``"128 samples of every subject (12 of the 16 subjects are
    training subjects of this checkpoint)"``, or ``"40 held-out samples"`` (``overlap``: see
    :func:`training_subjects_in`)."""
    if not all_subjects and not overlap:
        return f"{num_samples} held-out samples"
    what = f"{num_samples} samples of every subject" if all_subjects else f"{num_samples} test samples"
    if overlap is None:
        return f"{what}; unknown how many are of training subjects (the checkpoint does not record them)"
    if overlap == 0:
        return f"{what}, none of a training subject of this checkpoint"
    return f"{what} ({overlap} of the {num_subjects} subjects are training subjects of this checkpoint)"


def _write_results(trainer, module, cfg: DictConfig, path: Path, extra: Dict[str, Any], t0: float, note: str,
                   overlap: Optional[int], num_subjects: int = 0, all_subjects: bool = False) -> Dict[str, Any]:
    """Write ``results.json`` and print the test table; ``overlap``, ``num_subjects`` and
    ``all_subjects`` describe the tested subjects (:func:`describe_test_set`)."""
    summary = dict(module.test_summary or {})
    cases = summary.pop("cases", [])
    test_set = describe_test_set(summary.get("num_cases"), num_subjects, overlap, all_subjects)
    results = {"stage": cfg.stage, "test": summary, "test_set": test_set, "training_subjects_in_test": overlap, **extra,
               "test_cases": cases, "wall_time_s": round(time.time() - t0, 1), "version": __version__}
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        print(format_table(summary, f"\n{cfg.stage} test Dice / HD95 ({test_set}, {note}) -> {path}"))
    return results


def _check_test_intensities(fp: Optional[Mapping[str, Any]], dm: SegmentationDataModule) -> None:
    """Warn when test samples' intensities are unlike the training data's (``fp``: the checkpoint's
    fingerprint; ``None``: an older checkpoint, nothing is checked)."""
    if fp is None:
        return
    dm.setup()
    test_set = dm.datasets["test"]
    check_samples(fp, {i: test_set._load(i)["image"].numpy() for i in test_set.ids}, _raw_profiles(dm.source, test_set.ids))


def evaluate(checkpoint: str, overrides=(), out: Optional[str] = None, all_subjects: bool = False,
             device: str = "auto") -> Dict[str, Any]:
    """Test a checkpoint's network on the test split of its config with ``overrides`` applied.

    Use it to evaluate on other data than the run's own test split, e.g. every axial slice of held-out
    volumes (``data.nifti.slice_mode=all``) or a domain-shifted set; ``all_subjects`` tests on every
    subject of the data instead of the test split. Writes ``out`` (default
    ``<output_dir>/results_test.json``), which also says how many tested subjects the checkpoint was
    trained on (``training_subjects_in_test``, ``test_set``). Warns when test samples' intensities
    are unlike the training data's (:mod:`lightning_distill.fingerprint`). ``device``: ``auto`` (the
    trainer defaults: one CUDA device when available), ``cpu``, ``cuda`` or ``cuda:N``.
    """
    from lightning_distill.devices import resolve_device
    from lightning_distill.inference import load_checkpoint, load_network
    from lightning_distill.modules import check_checkpoint

    dev = None if device == "auto" else resolve_device(device)  # an impossible device is refused before any work
    t0 = time.time()
    ckpt, cfg = load_checkpoint(checkpoint, overrides)
    source = build_source(cfg)
    names = class_names(cfg, source)
    check_checkpoint(ckpt, names, f"checkpoint {checkpoint}")
    if all_subjects:
        cfg.data.splits = {"train": [], "val": [], "test": sorted({subject_of(i) for i in source.ids})}
    dm = build_datamodule(cfg, source, training=False)
    record = dict(ckpt.get("lightning_distill") or {})
    _check_test_intensities(record.get("intensity"), dm)
    module = SegmentationModule(load_network(ckpt, cfg), names, input_transform=cfg.input_transform,
                                roi_size=list(cfg.data.patch_size) if cfg.data.patch_size else None, config=to_dict(cfg),
                                surface_tolerance=cfg.surface_tolerance_mm, sw_batch_size=cfg.sw_batch_size)
    targs = {k: v for k, v in _trainer_args(cfg, say=False).items()
             if k in ("accelerator", "devices", "precision", "enable_progress_bar")}
    if dev is not None:  # one device, named: cpu, cuda or cuda:N
        targs.update(accelerator="cpu" if dev.type == "cpu" else "gpu", devices=1 if dev.index is None else [dev.index])
        if dev.type == "cpu" and "precision" not in cfg.trainer:
            targs["precision"] = "32-true"
    trainer = L.Trainer(logger=False, enable_checkpointing=False, **targs)
    trainer.test(module, datamodule=dm, verbose=False)
    path = Path(out) if out else Path(cfg.output_dir) / "results_test.json"
    tested = dm.subject_splits["test"]
    return _write_results(trainer, module, cfg, path, {"checkpoint": str(checkpoint), "overrides": list(overrides)}, t0,
                          f"checkpoint {checkpoint}", training_subjects_in(record, cfg, tested), len(tested), all_subjects)
