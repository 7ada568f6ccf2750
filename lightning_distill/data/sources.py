"""Subject sources: where the samples of a data module come from.

A source is a list of subject ids plus a ``load(id)`` that returns numpy arrays. The data modules
do the splitting, caching, augmentation and batching, so a new kind of data (NIfTI folders, another
phantom) only needs a new source.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

from lightning_distill.data.phantom import CLASS_NAMES, PhantomSpec, hu_window, render_slice, render_volume

# Physical extent of the phantom's normalised cube [-1, 1]^3, in mm (x, y, z).
PHANTOM_EXTENT_MM = (400.0, 400.0, 300.0)


class SubjectSource:
    """Base class. Subclasses set ``ids``, ``class_names``, ``spatial_dims`` and implement ``load``."""

    ids: List[str]
    class_names: Tuple[str, ...]
    spatial_dims: int

    def load(self, subject_id: str) -> Dict:
        """Return ``{"image": float32 (C, *spatial), "label": int (*spatial), "spacing": (ndim,) mm}``."""
        raise NotImplementedError

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class PhantomSource(SubjectSource):
    """Subjects of the synthetic abdominal phantom.

    Args:
        spec: population settings (seed, phases, noise).
        num_subjects: size of the population.
        shape: ``(X, Y, Z)`` for volumes, ``(X, Y)`` for single axial slices.
        window: HU window mapped to [0, 1].
    """

    spec: PhantomSpec
    num_subjects: int
    shape: Sequence[int]
    window: Tuple[float, float] = (-175.0, 250.0)

    def __post_init__(self):
        if len(self.shape) not in (2, 3):
            raise ValueError(f"phantom shape must be (X, Y) slices or (X, Y, Z) volumes, got {tuple(self.shape)}")
        self.spatial_dims = len(self.shape)
        self.class_names = CLASS_NAMES
        self.ids = [f"phantom{self.spec.seed}_{i:04d}" for i in range(self.num_subjects)]

    def load(self, subject_id: str) -> Dict:
        idx = int(subject_id.rsplit("_", 1)[1])
        if self.spatial_dims == 3:
            s = render_volume(self.spec, idx, self.shape)
            spacing = [e / n for e, n in zip(PHANTOM_EXTENT_MM, self.shape)]
        else:
            s = render_slice(self.spec, idx, self.shape)
            spacing = [e / n for e, n in zip(PHANTOM_EXTENT_MM[:2], self.shape)]
        image = hu_window(s["image"], *self.window)[None]
        return {"image": image, "label": s["label"].astype(np.int64), "spacing": np.asarray(spacing, np.float32),
                "phase": s["phase"]}
