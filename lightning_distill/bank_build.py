"""Deprecated (0.5.0): ``lightning-distill bank build`` moved to :mod:`lightning_distill.bank.build`;
this module will be removed in 0.6.0. Its public names are re-exported from there, with a
``DeprecationWarning`` on import."""

import warnings

from lightning_distill.bank.build import ClassMap, build_bank, describe, load_model, pseudo_labels, run_bank_build

__all__ = ["ClassMap", "build_bank", "describe", "load_model", "pseudo_labels", "run_bank_build"]

warnings.warn("lightning_distill.bank_build moved to lightning_distill.bank.build (import from there); the old "
              "module will be removed in 0.6.0", DeprecationWarning, stacklevel=2)
