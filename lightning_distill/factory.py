"""The network and the preprocessing a run config describes.

Below both :mod:`lightning_distill.train` (which trains them) and :mod:`lightning_distill.inference`
(which rebuilds them from a checkpoint), so that neither imports the other for them.
"""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from lightning_distill.data.preprocess import Preprocess
from lightning_distill.data.sources import PHANTOM_ORIENTATION
from lightning_distill.networks import build_network


def build_net(cfg: DictConfig, num_classes: int):
    """The run's network (2D or 3D by ``len(data.shape)``), one input channel."""
    return build_network(cfg.model.name, len(cfg.data.shape), 1, num_classes, encoder=cfg.model.encoder,
                         kwargs=OmegaConf.to_container(cfg.model.kwargs), skip_connections=cfg.model.skip_connections)


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
