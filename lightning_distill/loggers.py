"""The run's logger (CSV, W&B offline by default, TensorBoard, none) and its end (W&B artifacts)."""

from __future__ import annotations

import importlib.util
import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Optional

from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from omegaconf import DictConfig

from lightning_distill.config.load import to_dict
from lightning_distill.visuals import log_artifacts


class _DropTips(logging.Filter):
    """Lightning's tips that advertise a service (``litlogger``): nothing a user of this package acts on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence Lightning's messages that carry nothing for a user of this package, on every run: the tip
    advertising a logging service, and the warning that an epoch has fewer batches than ``log_every_n_steps``
    (metrics are logged by global step, so short epochs lose no log line). Other warnings stay."""
    warnings.filterwarnings("ignore", message=r".*is smaller than the logging interval.*")
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in log.filters):
        log.addFilter(_DropTips())


def make_logger(cfg: DictConfig, out: Path, wandb_run_id: Optional[str] = None):
    """The run's logger. W&B runs offline (``<output_dir>/wandb/offline-run-*``) unless the user set
    ``WANDB_MODE`` (e.g. ``online`` with a configured server); the project is ``WANDB_PROJECT`` or
    ``lightning_distill``; the resolved config is the run's config (a plain dict). ``wandb_run_id``
    (a resumed checkpoint's) continues that W&B run, unless ``WANDB_RUN_ID`` says otherwise."""
    if cfg.logger == "none":
        return False
    if cfg.logger == "wandb":
        os.environ.setdefault("WANDB_MODE", "offline")
        run_id = os.environ.get("WANDB_RUN_ID") or wandb_run_id
        return WandbLogger(save_dir=str(out), project=os.environ.get("WANDB_PROJECT", "lightning_distill"),
                           name=out.name, config=to_dict(cfg), id=run_id)
    if cfg.logger == "tensorboard":
        if not any(importlib.util.find_spec(m) for m in ("tensorboard", "tensorboardX")):
            raise ValueError("logger=tensorboard needs the tensorboard package (pip install tensorboard); "
                             "logger=csv and logger=wandb need nothing extra")
        return TensorBoardLogger(save_dir=str(out), name="", version="tensorboard")
    return CSVLogger(save_dir=str(out), name="", version="logs")


def finish_logger(logger, files: Dict[str, Optional[str]], is_global_zero: bool) -> None:
    """W&B: log ``files`` (``{artifact type: path}``) as artifacts, then close the run (a later
    ``fit`` in the same process starts its own)."""
    if isinstance(logger, WandbLogger) and is_global_zero:
        log_artifacts(logger, files, logger.experiment.name or "run")
        logger.experiment.finish()
