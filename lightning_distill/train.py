"""``fit`` and ``evaluate``: a run config → data → module → Trainer → the run's files, and a
checkpoint → its test on other data.

Every run writes into ``output_dir``: the resolved ``config.yaml``, ``checkpoints/`` (``best.ckpt``
by ``val/dice`` and ``last.ckpt``), ``logs/`` (CSV metrics), ``results.json`` and, for a teacher,
the prototype bank (``prototypes.pt``); a student also exports its own prototypes
(``student_prototypes.pt``) for comparison. The pieces are built elsewhere: data in
:mod:`lightning_distill.data.build`, the module in :mod:`lightning_distill.methods.build`, the
callbacks in :mod:`lightning_distill.callbacks` and :mod:`lightning_distill.bank.teacher`, the logger
in :mod:`lightning_distill.loggers`, resuming in :mod:`lightning_distill.resume`, ``results.json`` in
:mod:`lightning_distill.results`. (``build_source``, ``build_datamodule``, ``build_module`` and
``class_names`` are importable from here too, as before.)
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from lightning_distill.bank.teacher import check_bank_config, export_teacher_bank, run_bank_callback
from lightning_distill.callbacks import LastCheckpoint, RunPictures, with_atomic_checkpoints
from lightning_distill.config.load import to_dict
from lightning_distill.data.build import (balanced_class_weights, build_datamodule, build_source, class_names,
                                         process_count, training_class_voxels, training_record_of)
from lightning_distill.data.datamodules import SegmentationDataModule
from lightning_distill.data.provenance import subject_of
from lightning_distill.data.sources import SubjectSource
from lightning_distill.devices import accel_settings, apply_trainer_defaults, minutes_setting, resolve_device, uses_cuda
from lightning_distill.fingerprint import fingerprint_summary
from lightning_distill.checkpoints import load_checkpoint, load_network
from lightning_distill.io import atomic_write
from lightning_distill.loggers import finish_logger, make_logger, quiet_lightning
from lightning_distill.methods import method_figures, target_config
from lightning_distill.methods.build import build_module, set_transfer
from lightning_distill.modules import SegmentationModule, check_checkpoint
from lightning_distill.resume import previous_csv_rows, resume_checkpoint
from lightning_distill.results import (check_test_intensities, training_subjects_in, warn_no_best,
                                       write_results)

__all__ = ["build_datamodule", "build_module", "build_source", "class_names", "evaluate", "fit"]


def _trainer_args(cfg: DictConfig, say: bool = True) -> Dict[str, Any]:
    """The run's ``trainer.*`` settings over the defaults chosen for this machine
    (:mod:`lightning_distill.devices`); the choices are printed once (rank 0) when ``say``."""
    targs, notes = apply_trainer_defaults(OmegaConf.to_container(cfg.trainer))
    if say and notes and rank_zero_only.rank == 0:
        print("trainer defaults for this machine: " + "; ".join(notes))
    return targs


def _say(text: str) -> None:
    if rank_zero_only.rank == 0:
        print(text)


def fit(cfg: DictConfig, source: Optional[SubjectSource] = None) -> Dict[str, Any]:
    """Train, test on the held-out split, and write the run's outputs. Returns ``results.json``'s dict.

    Args:
        cfg: a validated run config (:func:`lightning_distill.config.load_config`).
        source: the data source built from ``cfg.data`` (default: built here); benchmarks pass one
            to reuse it across runs on the same data.
    """
    quiet_lightning()
    t0 = time.time()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source = source or build_source(cfg)
    names = class_names(cfg, source)
    resume, resume_step, resume_meta = resume_checkpoint(cfg, names)  # refused before output_dir is touched
    if rank_zero_only.rank == 0:  # DDP processes re-run this function; one of them writes
        atomic_write(out / "config.yaml", lambda tmp: OmegaConf.save(cfg, tmp, resolve=True))
    dm = build_datamodule(cfg, source, target=target_config(cfg))
    module = build_module(cfg, names)
    module.training_data = training_record_of(cfg, dm)
    if getattr(dm, "extras", None):
        set_transfer(cfg, module, dm)
    if cfg.loss.class_balance == "inverse_frequency":
        _class_balance(module, dm, names)
    teacher = cfg.stage == "teacher"
    b = cfg.bank
    axial = check_bank_config(cfg, dm)  # refused before training starts
    # a student records its own prototypes at its own temperature (distill.tau), beside the bank's others
    own_tau = b.tau if teacher else float(getattr(module, "tau", b.tau))
    bank_cb = run_bank_callback(cfg, names, own_tau, out, axial)  # None with bank.source=final (computed after training)
    targs = _trainer_args(cfg)
    on_cuda = _throughput(cfg, targs, module, dm)
    fast = bool(targs.get("fast_dev_run"))
    ckpt, last_cb, callbacks = _checkpoints(cfg, out, names, on_cuda, fast)
    if bank_cb is not None:
        callbacks.insert(0, bank_cb)
    previous_log = previous_csv_rows(cfg, out, resume_step) if resume else []
    logger = make_logger(cfg, out, resume_meta.get("wandb_run_id"))
    if logger:
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    if previous_log:  # a new CSV logger empties metrics.csv: keep the interrupted run's rows
        for row in previous_log:
            logger.experiment.log_metrics(row, step=int(row.pop("step")))
    targs["plugins"] = with_atomic_checkpoints(targs.get("plugins"))
    trainer = L.Trainer(default_root_dir=str(out), logger=logger, callbacks=callbacks, **targs)
    trainer.fit(module, datamodule=dm, ckpt_path=resume)
    last = (last_cb.last_model_path or None) if last_cb is not None else None
    best = None if fast else (ckpt.best_model_path or None)
    if not fast and best is None:
        warn_no_best(out, dm, targs, last)
    if teacher:  # reliability (and bank.source=final's bank) from the best weights, then the bank file
        export_teacher_bank(cfg, trainer, module, dm, bank_cb, out / b.export, best, last, targs.get("fast_dev_run"), axial)
    elif bank_cb.sums is not None:  # re-export now that the final checkpoint exists (records its hash)
        bank_cb.export(trainer, last)
    trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False)
    figures = method_figures(module, dm, cfg, out) if trainer.is_global_zero else {}
    extra = {"val": {"dice_best": None if ckpt.best_model_score is None else float(ckpt.best_model_score)},
             "train_subjects": len(dm.train_subject_ids), "checkpoint": best or last,
             "steps": trainer.global_step, "val_curve": module.val_curve,
             "prototypes": str(out / b.export) if teacher else cfg.distill.prototypes,
             "intensity": fingerprint_summary(module.training_data["intensity"])}
    extra.update(figures)
    results = write_results(trainer, module, cfg, out / "results.json", extra, t0,
                            f"{len(dm.train_subject_ids)} training subjects",
                            training_subjects_in(module.training_data, cfg, dm.source, dm.subject_splits["test"]))
    own_bank = str(out / (b.export if teacher else "student_prototypes.pt"))
    finish_logger(logger, {"prototype-bank": own_bank, "teacher-prototype-bank": None if teacher else cfg.distill.prototypes,
                           "model": best, "results": str(out / "results.json")}, trainer.is_global_zero)
    return results


def _class_balance(module: SegmentationModule, dm: SegmentationDataModule, names: List[str]) -> None:
    """``loss.class_balance=inverse_frequency``: CE weights from the training labels' class voxels."""
    weights = balanced_class_weights(training_class_voxels(dm, len(names)))
    module.set_ce_class_weights(weights)
    module.training_data["ce_class_weights"] = dict(zip(names, weights))
    _say("loss.class_balance=inverse_frequency: CE weights " + ", ".join(f"{n} {w:.3g}" for n, w in zip(names, weights)))


def _throughput(cfg: DictConfig, targs: Dict[str, Any], module: SegmentationModule, dm: SegmentationDataModule) -> bool:
    """Apply the run's throughput options (``accel.*``) for its device; returns whether it trains on CUDA."""
    on_cuda = uses_cuda(targs)
    accel, accel_notes = accel_settings(cfg.accel, on_cuda, len(cfg.data.shape))
    dm.memory_format = module.set_accel(channels_last=accel["channels_last"], compile=accel["compile"])
    if accel["matmul_precision"]:
        torch.set_float32_matmul_precision(accel["matmul_precision"])
    if accel_notes:
        _say("throughput: " + "; ".join(accel_notes))
    processes = process_count(targs)
    if cfg.data.source == "nifti" and cfg.data.nifti.open == "eager" and processes * max(1, dm.num_workers) > 1:
        _say(f"data.nifti.open=eager holds every preprocessed case in memory in each of the {processes} "
             f"process(es), and loader workers copy pages of it as they touch them: for a large dataset use "
             "data.nifti.open=lazy data.nifti.cache_dir=<folder> (bounded memory, each case read from the cache; docs/data.md)")
    return on_cuda


def _checkpoints(cfg: DictConfig, out: Path, names: List[str], on_cuda: bool,
                 fast: bool) -> Tuple[ModelCheckpoint, Optional[LastCheckpoint], list]:
    """``best.ckpt`` (by ``val/dice``), ``last.ckpt`` (unless ``fast_dev_run``) and the pictures, as callbacks."""
    every = cfg.checkpoint.every_n_steps
    if every is not None and every < 1:
        raise ValueError(f"checkpoint.every_n_steps must be a positive number of steps or null, got {every}")
    ckpt = ModelCheckpoint(dirpath=str(out / "checkpoints"), filename="best", monitor="val/dice", mode="max",
                           save_top_k=1, save_last=False, auto_insert_metric_name=False,
                           enable_version_counter=False,  # best.ckpt keeps its name in a re-used output_dir
                           save_weights_only=cfg.checkpoint.weights_only)
    callbacks: list = [ckpt]
    last_cb = None
    ckpt_minutes = minutes_setting(cfg.checkpoint.min_minutes, "checkpoint.min_minutes", on_cuda, 5.0)
    picture_minutes = minutes_setting(cfg.pictures_min_minutes, "pictures_min_minutes", on_cuda, 10.0)
    if on_cuda:
        _say(f"on a GPU: last.ckpt at most every {ckpt_minutes:g} min (checkpoint.min_minutes), pictures at most every "
             f"{picture_minutes:g} min (pictures_min_minutes)")
    if cfg.checkpoint.save_last and not fast:
        last_cb = LastCheckpoint(out / "checkpoints", every_n_steps=every, weights_only=cfg.checkpoint.weights_only,
                                 min_interval_s=60.0 * ckpt_minutes)
        callbacks.append(last_cb)
    if cfg.pictures > 0:
        callbacks.append(RunPictures(out, names, num_samples=cfg.pictures, min_interval_s=60.0 * picture_minutes))
    return ckpt, last_cb, callbacks


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
    quiet_lightning()
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
    check_test_intensities(record.get("intensity"), dm, cfg)
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
    return write_results(trainer, module, cfg, path, {"checkpoint": str(checkpoint), "overrides": list(overrides)}, t0,
                         f"checkpoint {checkpoint}", training_subjects_in(record, cfg, source, tested), all_subjects)
