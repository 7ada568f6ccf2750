"""The bank's axial range: only voxels at given fractions of a volume's axial extent contribute.

The coordinate is the **fraction of the volume's axial extent**: volumes are ``(X, Y, Z)`` arrays
whose last spatial axis is axial (``(B, C, X, Y, Z)`` batches), and slice ``i`` of ``Z`` lies at
``i / (Z - 1)``: 0 is the first slice, 1 the last. The phantom's arrays are oriented ``LAS``
(``PHANTOM_ORIENTATION``) and NIfTI volumes are reoriented to ``data.nifti.orientation`` (``RAS`` by
default), so 0 is the most inferior slice and 1 the most superior one of the volume (of its field of
view, after ``crop_foreground`` if set; not of its labels). For the phantom the map is exact: a
volume samples the normalised ``z in [-1, 1]`` linearly along its last axis (``np.linspace(-1, 1,
Z)``), the same ``z`` in which a student's slices are drawn (``data.phantom.slice_z``), so a slice at
``z`` lies at fraction ``(z + 1) / 2``: :func:`phantom_axial_range` converts ``slice_z = [-0.6, 0.0]``
(the student's default) into ``[0.2, 0.5]``. Voxels outside the range are masked out of the class
sums (their labels set to an ignore value in a copy: the labels the loss sees are never changed); a
class with no voxel in the range keeps a zero row and count 0 (the student leaves such rows out), and
a warning lists it. With training crops (``data.patch_size``) a patch does not know where it lies in
its volume, so ``fit`` refuses an axial range with a running bank when the patches crop the axial axis.
"""

from __future__ import annotations

import math
import warnings
from typing import List, Optional, Sequence, Tuple

import torch

AXIAL_IGNORE = -1  # the label voxels outside the axial range get in the copy the bank reads


def check_axial_range(axial_range: Optional[Sequence[float]], key: str = "bank.axial_range") -> Optional[Tuple[float, float]]:
    """``(lo, hi)`` of a valid axial range (``None``: whole volumes).

    Raises:
        ValueError: not two finite numbers with ``0 <= lo < hi <= 1`` (the message names ``key``).
    """
    if axial_range is None:
        return None
    try:
        values = [float(v) for v in axial_range]
    except (TypeError, ValueError):
        values = []
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or not 0.0 <= values[0] < values[1] <= 1.0:
        raise ValueError(f"{key} must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the volume's axial extent: "
                         f"0 = its first, most inferior slice, 1 = its last), got {axial_range!r}"
                         + ("; for phantom z coordinates in [-1, 1] use (z + 1) / 2 (phantom_axial_range)"
                            if len(values) == 2 and min(values) < 0 else ""))
    return values[0], values[1]


def phantom_axial_range(slice_z: Sequence[float]) -> List[float]:
    """The ``bank.axial_range`` of the phantom's normalised z range ``[z_lo, z_hi]`` (in ``[-1, 1]``).

    A phantom volume samples ``z`` linearly along its last axis (``np.linspace(-1, 1, Z)``), so a
    slice at ``z`` lies at fraction ``(z + 1) / 2`` of the volume's axial extent: the student's
    ``data.phantom.slice_z = [-0.6, 0.0]`` is ``[0.2, 0.5]``.
    """
    if len(slice_z) != 2 or not -1.0 <= float(slice_z[0]) < float(slice_z[1]) <= 1.0:
        raise ValueError(f"a phantom z range must be [z_lo, z_hi] with -1 <= z_lo < z_hi <= 1, got {list(slice_z)}")
    return [(float(z) + 1.0) / 2.0 for z in slice_z]


def axial_fractions(depth: int) -> torch.Tensor:
    """Axial position of each of ``depth`` slices as a fraction of the extent: ``i / (depth - 1)`` (float64)."""
    return torch.arange(depth, dtype=torch.float64) / max(depth - 1, 1)


def axial_masked_labels(label: torch.Tensor, axial_range: Optional[Tuple[float, float]], spatial_dims: int) -> torch.Tensor:
    """``label`` (``(B, 1, X, Y, Z)`` or ``(B, X, Y, Z)``) with the voxels outside ``axial_range`` set
    to :data:`AXIAL_IGNORE` (a new tensor; ``label`` itself is not changed). ``None``: ``label``."""
    if axial_range is None:
        return label
    if spatial_dims != 3:
        raise ValueError(f"bank.axial_range needs 3D volumes (the axial axis is the last of X, Y, Z); these data are {spatial_dims}D")
    lo, hi = axial_range
    f = axial_fractions(label.shape[-1])
    keep = ((f >= lo - 1e-9) & (f <= hi + 1e-9)).to(label.device)
    return label if bool(keep.all()) else label.masked_fill(~keep, AXIAL_IGNORE)


def warn_empty_classes(counts: torch.Tensor, class_names: Sequence[str], axial_range: Optional[Sequence[float]],
                       what: str = "prototype bank") -> List[str]:
    """Warn (and return them) when classes have no voxel in the bank: their rows are 0, not prototypes."""
    empty = [n for n, c in zip(class_names, counts.tolist()) if c <= 0]
    if empty:
        where = (f"in bank.axial_range={list(axial_range)} (fractions of the volumes' axial extent)"
                 if axial_range is not None else "in the accumulated voxels")
        warnings.warn(f"{what}: no voxel of the classes {empty} {where}: their rows are 0 with count 0, and a student "
                      "leaves them out; widen the range (or check the data) if they should be distilled", stacklevel=3)
    return empty
