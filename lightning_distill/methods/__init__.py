"""Distillation methods, one small file each, found by the name ``distill.method`` gives.

``METHODS`` maps a method's name to ``"module:function"``: a builder
``build(cfg, net, class_names, common) -> LightningModule`` that makes the student's module from the
run config, the student network built by :func:`lightning_distill.networks.build_net`, the K class names,
and ``common`` (the :class:`~lightning_distill.modules.SegmentationModule` keyword arguments every
method passes on: optimiser, segmentation loss, metrics, config). The module is imported only when
the method is used (``config`` validates the names against :mod:`lightning_distill.registry`, below it).

Adding a method: write ``lightning_distill/methods/mine.py`` with a module subclassing
``SegmentationModule`` (extra loss terms in ``extra_terms``, their weights in ``term_weights``) and a
``build`` function, then add one line to :data:`lightning_distill.registry.METHODS`
(docs/architecture.md). A method's file may also define these hooks, which ``fit`` calls for a student
of that method (and no other code names the method):

* ``target_config(cfg) -> DictConfig``: a run config whose ``data`` is a second, unpaired modality;
  training batches then also carry its ``image_b`` (:func:`target_config` below);
* ``figures(module, datamodule, cfg, output_dir) -> {results key: path}``: pictures written after the
  test, on rank 0, recorded in ``results.json`` (:func:`method_figures` below).

The methods:

* ``prototype`` — the core 3D->2D method: prototype-bank DIST, no teacher network (:mod:`.prototype`).
* ``sikd`` — shape-intensity KD from a class-mean-image teacher (:mod:`.sikd`).
* ``pixel`` — pixel-wise DIST with a paired 2D teacher, the classic comparison (:mod:`.pixel_dist`).
* ``cmedl`` — cross-modality educed distillation, translator + teacher + student at once (:mod:`.cmedl`).
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, Dict, Optional

from lightning_distill.registry import METHODS  # the names (below the config, which validates them)

# names this package re-exports, imported on first use
_EXPORTS = {"CMEDLModule": "cmedl", "hint_loss": "cmedl", "FrozenTeacher": "frozen", "load_teacher_network": "frozen",
            "PixelDistModule": "pixel_dist", "SIKDModule": "sikd", "class_mean_image": "sikd",
            "StudentModule": "prototype", "row_weights": "prototype"}

__all__ = ["METHODS", "method_builder", "method_figures", "target_config", *_EXPORTS]


def method_builder(name: str) -> Callable[..., Any]:
    """The ``build`` function of method ``name``.

    Raises:
        KeyError: ``name`` is not a registered method (the message lists the valid ones).
    """
    if name not in METHODS:
        raise KeyError(f"unknown distillation method {name!r}; valid: {sorted(METHODS)}")
    module, _, function = METHODS[name].partition(":")
    return getattr(importlib.import_module(module), function)


def _hook(cfg: Any, hook: str) -> Optional[Callable[..., Any]]:
    """The run's method's hook ``hook``, or ``None`` (a teacher run, or a method without it)."""
    if cfg.stage != "student":
        return None
    method_builder(cfg.distill.method)  # an unknown name: the KeyError that lists the valid ones
    return getattr(importlib.import_module(METHODS[cfg.distill.method].partition(":")[0]), hook, None)


def target_config(cfg: Any) -> Optional[Any]:
    """The second, unpaired modality a student's method trains on (its ``target_config`` hook: a run
    config whose ``data`` describes it), or ``None`` (one modality: every method but CMEDL, and teachers)."""
    hook = _hook(cfg, "target_config")
    return hook(cfg) if hook is not None else None


def method_figures(module: Any, datamodule: Any, cfg: Any, out: Any) -> Dict[str, str]:
    """The pictures a student's method draws after its test (its ``figures`` hook), as ``{results key: path}``;
    ``{}`` without the hook. Call it on rank 0."""
    hook = _hook(cfg, "figures")
    return dict(hook(module, datamodule, cfg, out)) if hook is not None else {}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
