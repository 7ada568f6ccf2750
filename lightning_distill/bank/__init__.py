"""The prototype bank: class-wise prediction-distribution centroids (Yu et al. 2024), one concept a file.

For each class k, the mean over the voxels labelled k of the network's softmax (a K x K matrix) or of
its penultimate features (K x D). A teacher's bank is what a 2D student distils from, without a
teacher forward pass (:mod:`lightning_distill.methods.prototype`).

* :mod:`~lightning_distill.bank.format`: :class:`Bank`, the file format (:func:`save_bank`,
  :func:`load_bank`);
* :mod:`~lightning_distill.bank.controls`: the identity / flat / shuffled controls (:func:`control_bank`);
* :mod:`~lightning_distill.bank.axial`: the axial range (only voxels at given fractions of a volume's
  axial extent);
* :mod:`~lightning_distill.bank.accumulate`: what a bank averages and the per-class sums
  (:class:`ClassSums`, a torchmetrics metric);
* :mod:`~lightning_distill.bank.callback`: :class:`PrototypeBank`, the Lightning callback that
  accumulates a bank while a teacher trains (``bank.source=running``);
* :mod:`~lightning_distill.bank.scan`: a trained module over whole volumes, offline: :func:`final_bank`
  (``bank.source=final``) and :func:`class_reliability`;
* :mod:`~lightning_distill.bank.build`: ``lightning-distill bank build``, a bank from any trained 3D
  model over a folder of volumes (not re-exported here: it loads the data stack).

The names below are re-exported for notebooks and scripts (``from lightning_distill.bank import
load_bank``); the package's own modules import from the submodules.
"""

from lightning_distill.bank.accumulate import ClassSums
from lightning_distill.bank.axial import (AXIAL_IGNORE, axial_fractions, axial_masked_labels, check_axial_range,
                                          phantom_axial_range, warn_empty_classes)
from lightning_distill.bank.callback import PrototypeBank
from lightning_distill.bank.controls import BANK_CONTROLS, control_bank
from lightning_distill.bank.format import BANK_FORMAT, Bank, bank_record, load_bank, save_bank
from lightning_distill.bank.scan import class_reliability, final_bank, format_reliability

__all__ = ["AXIAL_IGNORE", "BANK_CONTROLS", "BANK_FORMAT", "Bank", "ClassSums", "PrototypeBank", "axial_fractions",
           "axial_masked_labels", "bank_record", "check_axial_range", "class_reliability", "control_bank", "final_bank",
           "format_reliability", "load_bank", "phantom_axial_range", "save_bank", "warn_empty_classes"]
