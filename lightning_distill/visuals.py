"""Pictures of a run: prediction overlays of fixed validation samples and prototype heatmaps.

:class:`RunPictures` (a Lightning callback, on in every ``fit``) writes after each validation, on
rank 0, whatever the logger:

* ``<output_dir>/images/overlays.png``: image, ground truth and prediction of the first
  ``num_samples`` validation samples (for 3D volumes: the axial slice with the most foreground);
* ``<output_dir>/images/prototypes.png``: heatmaps of the teacher's prototype bank and of the
  student's prototypes on its last training batch (a teacher run: its bank accumulated so far);

and, with ``logger: wandb``, logs the same as ``val/overlays`` (``wandb.Image`` with ground-truth
and prediction masks, class names as mask labels) and ``prototypes/heatmaps``. A copy of each PNG
per validation step is kept in ``images/steps/``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_distill.io import atomic_write


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` as ``pyplot.subplots`` would return, but a bare ``matplotlib.figure.Figure``:
    the package never imports pyplot or switches matplotlib's backend, so plotting from a notebook
    (inline figures) or a GUI session keeps working, and nothing needs closing. Save with
    ``fig.savefig``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def to_2d(image: torch.Tensor, truth: torch.Tensor, pred: torch.Tensor):
    """``image (C, *S)``, ``truth (1, *S)`` or ``(*S)``, ``pred (*S)`` -> three 2D numpy arrays.

    A 3D sample is cut at the axial slice (last axis) with the most ground-truth foreground.
    """
    img = image[0].float().cpu().numpy()
    y = (truth[0] if truth.ndim == image.ndim else truth).cpu().numpy()
    p = pred.cpu().numpy()
    if img.ndim == 3:
        z = int(np.argmax((y > 0).reshape(-1, y.shape[-1]).sum(0)))
        img, y, p = img[..., z], y[..., z], p[..., z]
    return img, y, p


def _label_cmap(num_classes: int):
    import matplotlib
    from matplotlib.colors import ListedColormap

    colours = matplotlib.colormaps["tab10" if num_classes <= 11 else "tab20"](np.arange(1, num_classes) % 20)
    return ListedColormap(colours)


def save_overlays(path: str | Path, images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                  preds: Sequence[np.ndarray], ids: Sequence[str], class_names: Sequence[str], title: str = "") -> Path:
    """One row per sample: the image, the ground truth over it, the prediction over it (PNG)."""
    k = len(class_names)
    cmap = _label_cmap(k)
    n = len(images)
    fig, axes = new_figure(n, 3, figsize=(7.5, 2.5 * n + 0.6), squeeze=False)
    for r, (img, y, p, sid) in enumerate(zip(images, truths, preds, ids)):
        for c, (lab, name) in enumerate([(None, str(sid)), (y, "ground truth"), (p, "prediction")]):
            ax = axes[r][c]
            lo, hi = np.percentile(img, [0.5, 99.5]) if img.size else (0, 1)
            ax.imshow(img.T, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1, origin="lower")
            if lab is not None:
                fg = np.ma.masked_where((lab <= 0) | (lab >= k), lab)
                ax.imshow(fg.T, cmap=cmap, vmin=1, vmax=max(k - 1, 1), alpha=0.55, interpolation="nearest", origin="lower")
            ax.set_title(name, fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    from matplotlib.patches import Rectangle

    handles = [Rectangle((0, 0), 1, 1, color=cmap((i - 1) / max(k - 2, 1))) for i in range(1, k)]
    fig.legend(handles, class_names[1:], loc="lower center", ncol=min(k - 1, 5), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 if n < 3 else 0.03, 1, 0.97 if title else 1))
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return Path(path)


def save_prototype_heatmaps(path: str | Path, matrices: Dict[str, torch.Tensor], class_names: Sequence[str],
                            title: str = "") -> Path:
    """Side-by-side heatmaps of ``(K, C)`` prototype matrices (rows: ground-truth classes).

    K x K probability matrices share a log10 colour scale; other (feature) matrices get their own.
    """
    n = len(matrices)
    fig, axes = new_figure(1, n, figsize=(4.6 * n, 4.2), squeeze=False)
    k = len(class_names)
    for ax, (name, m) in zip(axes[0], matrices.items()):
        m = m.detach().float().cpu()
        if m.shape == (k, k):
            im = ax.imshow(m.clamp_min(1e-4).log10().numpy(), cmap="viridis", vmin=-4, vmax=0)
            fig.colorbar(im, ax=ax, fraction=0.046, label="log10 mean probability")
            ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
            ax.set_xlabel("predicted class", fontsize=8)
        else:
            im = ax.imshow(m.numpy(), cmap="coolwarm", aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.046, label="mean feature")
            ax.set_xlabel("feature channel", fontsize=8)
        ax.set_yticks(range(k), class_names, fontsize=7)
        ax.set_ylabel("ground-truth class", fontsize=8)
        ax.set_title(name, fontsize=9)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=90, format="png"))
    return Path(path)


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
        from lightning_distill.prototypes import PrototypeBank

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
                from lightning_distill.data.class_mean import class_mean_image

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
        from lightning.pytorch.loggers import WandbLogger

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


def log_artifacts(logger, files: Dict[str, Optional[str]], run_name: str) -> List[str]:
    """Log files as W&B artifacts (``{type: path}``; missing paths are skipped). Returns the types logged."""
    import wandb

    logged = []
    for kind, path in files.items():
        if path and Path(path).is_file():
            art = wandb.Artifact(f"{run_name}-{kind}", type=kind)
            art.add_file(str(path))
            logger.experiment.log_artifact(art)
            logged.append(kind)
    return logged
