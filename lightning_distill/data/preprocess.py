"""MONAI preprocessing of NIfTI cases, invertible so predictions map back to the input grid.

Every case is handled as a 3D array ``(C, X, Y, Z)`` (a 2D file is a volume with ``Z = 1``), so one
code path serves volumes and single slices. The steps, each optional and configured per dataset:
orientation (to ``RAS`` by default), resampling to a target spacing (images linear, labels nearest;
a non-positive entry keeps that axis's spacing), intensity (CT: HU window scaled to [0, 1]; MR:
percentile clip scaled to [0, 1], or z-score over the non-zero voxels), foreground crop (image
above a threshold, with a margin), and resizing to the model size (``pad_crop`` or ``resize``).
The spatial steps, the CT window, the crop and the inversion are MONAI transforms; the MR
normalisations are ours (:meth:`Preprocess.intensity` says why). ``tests/data/test_preprocess.py``
checks every option against a frozen copy of the former hand-written code.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np
import torch


@dataclass
class Preprocess:
    """Settings (see module docstring). ``shape`` is ``(X, Y, Z)``; for 2D data ``Z`` is 1."""

    orientation: Optional[str] = "RAS"
    spacing: Optional[Sequence[float]] = None
    modality: str = "CT"  # CT | MR | none
    ct_window: Tuple[float, float] = (-175.0, 250.0)
    mr_norm: str = "percentile"  # percentile | zscore
    percentiles: Tuple[float, float] = (0.5, 99.5)
    crop_foreground: bool = False
    crop_threshold: float = 0.05
    crop_margin: int = 4
    shape: Optional[Sequence[int]] = None
    resize: str = "resize"  # resize | pad_crop

    def __post_init__(self):
        if self.modality not in ("CT", "MR", "none"):
            raise ValueError(f"modality must be CT, MR or none, got {self.modality!r}")
        if self.mr_norm not in ("percentile", "zscore"):
            raise ValueError(f"mr_norm must be percentile or zscore, got {self.mr_norm!r}")
        if self.resize not in ("resize", "pad_crop"):
            raise ValueError(f"resize must be resize or pad_crop, got {self.resize!r}")

    def intensity_settings(self) -> Dict[str, Any]:
        """The intensity step as plain values: ``modality`` and its ``ct_window`` (CT) or ``mr_norm``
        and ``percentiles`` (MR); recorded in checkpoints (:mod:`lightning_distill.fingerprint`)."""
        if self.modality == "CT":
            return {"modality": "CT", "ct_window": [float(v) for v in self.ct_window]}
        if self.modality == "MR":
            return {"modality": "MR", "mr_norm": self.mr_norm, "percentiles": [float(v) for v in self.percentiles]}
        return {"modality": self.modality}

    # ------------------------------------------------------------------ spatial
    def spatial(self, mode: str):
        """The invertible spatial transforms (``mode``: interpolation for Spacing/Resize)."""
        # deferred: MONAI takes seconds to import; only preprocessing needs it
        from monai.transforms import Compose, Orientation, Resize, ResizeWithPadOrCrop, Spacing

        ts = []
        if self.orientation:
            ts.append(Orientation(axcodes=self.orientation, labels=(("L", "R"), ("P", "A"), ("I", "S"))))
        if self.spacing is not None:
            pix = list(self.spacing) + [-1.0] * (3 - len(self.spacing))
            ts.append(Spacing(pixdim=pix, mode=mode, padding_mode="border" if mode != "nearest" else "zeros"))
        return Compose(ts), (
            None if self.shape is None else
            (Resize(spatial_size=list(self.shape), mode="nearest" if mode == "nearest" else ("trilinear" if mode == "bilinear" else mode))
             if self.resize == "resize" else ResizeWithPadOrCrop(spatial_size=list(self.shape)))
        )

    def intensity(self, image: torch.Tensor) -> torch.Tensor:
        """The intensity step on a ``(C, ...)`` tensor; returns a float32 tensor of the same shape.

        CT is MONAI's ``ScaleIntensityRange`` (window clipped and scaled to [0, 1]; bit-identical to
        the former code). The MR steps stay ours, per channel, because MONAI's differ:
        percentile: MONAI's ScaleIntensityRangePercentiles gives ``x - lo`` unscaled, unclipped at tied percentiles (500, not 0).
        zscore: MONAI's NormalizeIntensity(nonzero=True) keeps zeros at 0 and uses the population std (up to 2.0 apart).

        Raises:
            ValueError: a CT window whose lower end is not below its upper end (it gave NaN or
                constant images).
        """
        # deferred: MONAI takes seconds to import; only preprocessing needs it
        from monai.transforms import ScaleIntensityRange
        # deferred: MONAI takes seconds to import; only preprocessing needs it
        from monai.utils import convert_to_tensor

        if self.modality == "CT":
            lo, hi = (float(v) for v in self.ct_window)
            if not lo < hi:
                raise ValueError(f"ct_window must be [lo, hi] with lo < hi, got {list(self.ct_window)}")
            scaled = ScaleIntensityRange(a_min=lo, a_max=hi, b_min=0.0, b_max=1.0, clip=True)(image)
            return convert_to_tensor(scaled, track_meta=False)
        if self.modality == "MR":
            out = []
            for c in image:  # per channel
                if self.mr_norm == "percentile":
                    lo, hi = np.percentile(c.numpy(), self.percentiles)
                    out.append(((c.clamp(float(lo), float(hi)) - lo) / max(float(hi - lo), 1e-6)))
                else:
                    nz = c[c != 0]
                    mu, sd = (nz.mean(), nz.std()) if nz.numel() > 1 else (c.mean(), c.std())
                    out.append((c - mu) / max(float(sd), 1e-6))
            return torch.stack(out).float()
        return image.float()

    def _foreground_crop(self, image: torch.Tensor):
        """``(cropper, start, end)``: MONAI's ``CropForeground`` and its box around the voxels where any
        channel is above ``crop_threshold``, widened by ``crop_margin`` and kept inside the image;
        ``None`` when no voxel is above the threshold (the case is then not cropped)."""
        # deferred: MONAI takes seconds to import; only preprocessing needs it
        from monai.transforms import CropForeground

        cropper = CropForeground(select_fn=functools.partial(torch.gt, other=float(self.crop_threshold)),
                                 margin=self.crop_margin, allow_smaller=True)
        start, end = cropper.compute_bounding_box(image)
        if not (end > start).all():  # MONAI's box for an image without foreground is empty
            return None
        return cropper, start, end

    def __call__(self, image: np.ndarray, affine: np.ndarray, label: Optional[np.ndarray] = None):
        """Preprocess one case (see :meth:`with_values` for the arguments and the first three results)."""
        return self.with_values(image, affine, label)[:3]

    def with_values(self, image: np.ndarray, affine: np.ndarray, label: Optional[np.ndarray] = None,
                    values: Optional[np.ndarray] = None):
        """Preprocess one case, and carry ``values`` along.

        Args:
            image: ``(C, X, Y, Z)`` float array.
            affine: ``(4, 4)`` voxel-to-world matrix.
            label: ``(X, Y, Z)`` int array or ``None``.
            values: ``(V, X, Y, Z)`` float array (e.g. a teacher's probabilities on the input grid) or
                ``None``: through the image's spatial steps (linear interpolation, the image's crop
                box), not the intensity step.

        Returns:
            ``(image, label, chain, values)``: the image MetaTensor ``(C, *shape)`` (it carries MONAI's
            record of the applied spatial operations), the label MetaTensor ``(1, *shape)`` int64 or
            ``None``, the list of spatial transforms applied to the image, which :meth:`invert`
            undoes, and the values tensor ``(V, *shape)`` float32 or ``None``.
        """
        from monai.data import MetaTensor  # deferred: MONAI takes seconds to import; only preprocessing needs it

        aff = torch.as_tensor(affine, dtype=torch.float64)
        img = MetaTensor(torch.as_tensor(image, dtype=torch.float32), affine=aff)
        pre, size = self.spatial("bilinear")
        chain = list(pre.transforms)
        img = pre(img)
        img = MetaTensor(self.intensity(img.as_tensor()), affine=img.affine, applied_operations=img.applied_operations)
        lbl = None
        if label is not None:
            pre_l, size_l = self.spatial("nearest")
            lbl = pre_l(MetaTensor(torch.as_tensor(label[None], dtype=torch.float32), affine=aff.clone()))
        val = None
        if values is not None:
            pre_v, size_v = self.spatial("bilinear")
            val = pre_v(MetaTensor(torch.as_tensor(values, dtype=torch.float32), affine=aff.clone()))
        if self.crop_foreground:
            found = self._foreground_crop(img)
            if found is not None:
                crop, start, end = found
                img = crop.crop_pad(img, start, end)
                chain.append(crop)
                if lbl is not None:
                    lbl = crop.crop_pad(lbl, start, end)
                if val is not None:
                    val = crop.crop_pad(val, start, end)
        if size is not None:
            img = size(img)
            chain.append(size)
            if lbl is not None:
                lbl = size_l(lbl)
            if val is not None:
                val = size_v(val)
        if lbl is not None:
            lbl = MetaTensor(lbl.as_tensor().round().long(), affine=lbl.affine)
        return img, lbl, chain, (None if val is None else val.as_tensor().float())

    @staticmethod
    def invert(probs: torch.Tensor, reference, chain) -> torch.Tensor:
        """Map ``(K, *shape)`` probabilities on the preprocessed grid back to the input grid.

        Args:
            probs: per-class probabilities on the preprocessed grid.
            reference: the preprocessed image MetaTensor returned by :meth:`__call__`.
            chain: the transforms returned with it; undone in reverse order. Probabilities are
                interpolated linearly; take the argmax afterwards.
        """
        from monai.data import MetaTensor  # deferred: MONAI takes seconds to import; only preprocessing needs it
        # deferred: MONAI takes seconds to import; only preprocessing needs it
        from monai.transforms import Compose, Invert

        p = MetaTensor(probs.float(), affine=reference.affine.clone())
        # a deep copy: inverting a crop edits its record, and ``reference`` may be inverted again
        p.applied_operations = copy.deepcopy(reference.applied_operations)
        # nearest_interp=False: probabilities are interpolated as the image was, not nearest
        return Invert(Compose(list(chain)), nearest_interp=False)(p).as_tensor()
