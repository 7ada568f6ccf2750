"""The Lightning callbacks of a run: ``last.ckpt`` (:class:`LastCheckpoint`), atomic checkpoint
files (:class:`AtomicCheckpointIO`) and the run's pictures (:class:`RunPictures`).

:class:`RunPictures` (on in every ``fit`` with ``pictures > 0``) writes after each validation, on
rank 0, whatever the logger:

* ``<output_dir>/images/overlays.png``: image, ground truth and prediction of the first
  ``num_samples`` validation samples (for 3D volumes: the axial slice with the most foreground);
* ``<output_dir>/images/prototypes.png``: heatmaps of the teacher's prototype bank and of the
  student's prototypes on its last training batch (a teacher run: its bank accumulated so far);

and, with ``logger: wandb``, logs the same as ``val/overlays`` (``wandb.Image`` with ground-truth
and prediction masks, class names as mask labels) and ``prototypes/heatmaps``. A copy of each PNG
per validation step is kept in ``images/steps/``. The bank's own callback is
:class:`lightning_distill.bank.callback.PrototypeBank`.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import lightning as L
import numpy as np
import torch
from lightning.fabric.plugins import CheckpointIO, TorchCheckpointIO
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.loggers import WandbLogger

from lightning_distill.bank.callback import PrototypeBank
from lightning_distill.data.class_mean import class_mean_image
from lightning_distill.io import atomic_write
from lightning_distill.visuals import save_overlays, save_prototype_heatmaps, to_2d


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


def with_atomic_checkpoints(plugins: Any) -> list:
    """``plugins`` (a trainer's ``plugins`` argument) with an :class:`AtomicCheckpointIO` unless one of them is a ``CheckpointIO``."""
    plugins = list(plugins if isinstance(plugins, (list, tuple)) else [plugins] if plugins else [])
    if not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins


class RunPictures(Callback):
    """Overlays of fixed validation samples and prototype heatmaps after every validation.

    Args:
        out_dir: the run's output folder (pictures go to ``out_dir/images``).
        class_names: the K class names.
        num_samples: validation samples shown (the first ones of the validation set: fixed across
            validations and runs with the same split).
        min_interval_s: draw after a validation only when this many seconds have passed since the last
            drawing (0: after every validation); a validation skipped so is drawn when training ends.
    """

    def __init__(self, out_dir: str | Path, class_names: Sequence[str], num_samples: int = 4, min_interval_s: float = 0.0):
        if min_interval_s < 0:
            raise ValueError(f"min_interval_s must be >= 0, got {min_interval_s}")
        self.dir = Path(out_dir) / "images"
        self.class_names = list(class_names)
        self.num_samples = num_samples
        self.min_interval_s = float(min_interval_s)
        self.written: List[Path] = []
        self._drawn_at: Optional[float] = None
        self._skipped = False

    # ------------------------------------------------------------------ pieces
    def _samples(self, trainer: Trainer):
        dm = trainer.datamodule
        ds = getattr(dm, "datasets", {}).get("val") if dm is not None else None
        if ds is None or len(ds) == 0:
            return []
        return [ds[i] for i in range(min(self.num_samples, len(ds)))]

    @staticmethod
    def _bank_matrices(trainer: Trainer, pl_module: LightningModule) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        teacher = getattr(pl_module, "teacher_prototypes", None)
        if teacher is not None:
            out["teacher bank"] = teacher
        bank_cb = next((c for c in trainer.callbacks if isinstance(c, PrototypeBank)), None)
        stage = (pl_module.hparams.get("config") or {}).get("stage")
        if bank_cb is not None and bank_cb.prototypes is not None and stage == "teacher":
            out[f"bank so far ({bank_cb.space})"] = bank_cb.prototypes
        student = getattr(pl_module, "student_batch_prototypes", None)
        if student is not None:
            out["student, last training batch"] = student
        return out

    @torch.no_grad()
    def draw(self, trainer: Trainer, pl_module: LightningModule) -> List[Path]:
        """Write the pictures (and log them to W&B); returns the PNG paths."""
        step = trainer.global_step
        paths: List[Path] = []
        samples = self._samples(trainer)
        if samples:
            x = torch.stack([s["image"] for s in samples]).to(pl_module.device)
            y = torch.stack([s["label"] for s in samples])
            if pl_module.hparams.get("input_transform", "none") == "class_mean":
                x = class_mean_image(x, y.to(x.device), len(self.class_names))
            was = pl_module.training
            pl_module.eval()
            pred = pl_module.predict_logits(x).argmax(1).cpu()
            pl_module.train(was)
            triples = [to_2d(x[i], y[i], pred[i]) for i in range(len(samples))]
            ids = [s["id"] for s in samples]
            p = save_overlays(self.dir / "overlays.png", *zip(*triples), ids=ids, class_names=self.class_names,
                              title=f"validation samples at step {step}")
            paths.append(p)
            self._log_overlays(trainer, triples, ids, step)
        mats = self._bank_matrices(trainer, pl_module)
        if mats:
            p = save_prototype_heatmaps(self.dir / "prototypes.png", mats, self.class_names, title=f"prototypes at step {step}")
            paths.append(p)
            self._log_images(trainer, "prototypes/heatmaps", [str(p)], step)
        steps = self.dir / "steps"
        if paths:
            steps.mkdir(parents=True, exist_ok=True)
        for p in paths:
            shutil.copyfile(p, steps / f"{p.stem}_step{step:06d}.png")
        self.written = paths
        return paths

    def _wandb(self, trainer: Trainer):
        return next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)

    def _log_overlays(self, trainer: Trainer, triples, ids, step: int) -> None:
        logger = self._wandb(trainer)
        if logger is None:
            return
        labels = {i: n for i, n in enumerate(self.class_names)}
        images, masks = [], []
        for img, y, p in triples:
            lo, hi = np.percentile(img, [0.5, 99.5])
            images.append((np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1) * 255).astype(np.uint8).T[::-1])
            masks.append({"ground_truth": {"mask_data": y.astype(np.uint8).T[::-1], "class_labels": labels},
                          "predictions": {"mask_data": p.astype(np.uint8).T[::-1], "class_labels": labels}})
        logger.log_image(key="val/overlays", images=images, step=step, masks=masks, caption=list(ids))

    def _log_images(self, trainer: Trainer, key: str, paths: Sequence[str], step: int) -> None:
        logger = self._wandb(trainer)
        if logger is not None:
            logger.log_image(key=key, images=list(paths), step=step)

    # ------------------------------------------------------------------ hooks
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking or not trainer.is_global_zero or trainer.fast_dev_run:
            return
        now = time.monotonic()
        if self._drawn_at is not None and now - self._drawn_at < self.min_interval_s:
            self._skipped = True
            return
        self.draw(trainer, pl_module)
        self._drawn_at, self._skipped = now, False

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._skipped and trainer.is_global_zero:  # the last validation's pictures, skipped by the interval
            self.draw(trainer, pl_module)
            self._skipped = False
