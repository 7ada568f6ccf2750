"""Pictures: prediction overlays, prototype heatmaps and W&B artifacts, drawn without pyplot.

The callback that draws them during a run is :class:`lightning_distill.callbacks.RunPictures`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Optional, Sequence

import matplotlib
import numpy as np
import torch
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from lightning_distill.io import atomic_write


def new_figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """``(figure, axes)`` as ``pyplot.subplots`` would return, but a bare ``matplotlib.figure.Figure``:
    the package never imports pyplot or switches matplotlib's backend, so plotting from a notebook
    (inline figures) or a GUI session keeps working, and nothing needs closing. Save with
    ``fig.savefig``."""

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


def log_artifacts(logger, files: Dict[str, Optional[str]], run_name: str) -> List[str]:
    """Log files as W&B artifacts (``{type: path}``; missing paths are skipped). Returns the types logged."""
    import wandb  # deferred: only logger=wandb needs W&B

    logged = []
    for kind, path in files.items():
        if path and Path(path).is_file():
            art = wandb.Artifact(f"{run_name}-{kind}", type=kind)
            art.add_file(str(path))
            logger.experiment.log_artifact(art)
            logged.append(kind)
    return logged
