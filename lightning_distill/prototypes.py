"""Deprecated (0.5.0): the prototype bank moved to :mod:`lightning_distill.bank`; this module will be
removed in 0.6.0. Its names are re-exported from there, with a ``DeprecationWarning`` on import
(``file_sha256`` is now :func:`lightning_distill.io.file_sha256`)."""

import warnings

from lightning_distill.bank import (AXIAL_IGNORE, BANK_CONTROLS, BANK_FORMAT, Bank, ClassSums, PrototypeBank,
                                    axial_fractions, axial_masked_labels, bank_record, check_axial_range,
                                    class_reliability, control_bank, final_bank, format_reliability, load_bank,
                                    phantom_axial_range, save_bank, warn_empty_classes)
from lightning_distill.io import file_sha256

__all__ = ["AXIAL_IGNORE", "BANK_CONTROLS", "BANK_FORMAT", "Bank", "ClassSums", "PrototypeBank", "axial_fractions",
           "axial_masked_labels", "bank_record", "check_axial_range", "class_reliability", "control_bank", "final_bank",
           "file_sha256", "format_reliability", "load_bank", "phantom_axial_range", "save_bank", "warn_empty_classes"]
warnings.warn("lightning_distill.prototypes moved to lightning_distill.bank (import from there); the old module "
              "will be removed in 0.6.0", DeprecationWarning, stacklevel=2)
