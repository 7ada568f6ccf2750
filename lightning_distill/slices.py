"""Single-slice extraction: one axial slice per subject from a dataset of 3D volumes.

This simulates a single-slice cohort (e.g. one CT slice per participant at a vertebral level). Each
volume is reoriented to RAS first, so slice indices count from inferior (0) to superior. Rules:

* ``index``: a fixed axial index (clipped to the volume);
* ``fraction``: ``round(f * (Z - 1))``;
* ``max-area``: the slice where a named organ (a label name of the source dataset) has the largest
  area (ties: the lowest index);
* ``list``: a text file of ``<case> <index>`` lines (cases not listed are skipped, with a warning).

Output: an nnU-Net v2 raw dataset of 2D NIfTI files (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``) whose affines keep the in-plane spacing and the slice's world position,
and a ``dataset.json`` that also records the rule and each case's slice index. Files are written
atomically and ``dataset.json`` last, so an interrupted run never leaves a dataset that looks
complete; an existing non-empty destination is refused unless ``overwrite``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, Optional

import numpy as np

from lightning_distill.data.nifti import DataError, discover, load_nifti, reorient, slice_affine
from lightning_distill.io import new_dataset_dir, save_nifti, write_json


def _canonical(data: np.ndarray, affine: np.ndarray):
    out, aff, _ = reorient(data[None], affine, "RAS")
    return out[0], aff


def choose_slice(label: Optional[np.ndarray], depth: int, rule: str, value, organ_id: Optional[int] = None) -> int:
    if rule == "index":
        return int(min(max(int(value), 0), depth - 1))
    if rule == "fraction":
        f = float(value)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"--fraction must be in [0, 1], got {f}")
        return int(round(f * (depth - 1)))
    if rule == "max-area":
        area = (label == organ_id).reshape(-1, depth).sum(0)
        if area.max() == 0:
            raise DataError(f"organ {value!r} (label {organ_id}) is absent from this volume")
        return int(np.argmax(area))
    raise ValueError(f"unknown rule {rule!r}")


def extract_slices(src: str | Path, dst: str | Path, rule: str, value, layout: str = "auto", overwrite: bool = False,
                   image_pattern: str = "images/*.nii.gz", label_pattern: Optional[str] = "labels/{case}.nii.gz") -> Dict[str, int]:
    """Write one axial slice per case of ``src`` into ``dst`` (see module docstring). Returns ``{case: z}``."""
    import nibabel as nib

    src, dst = Path(src), Path(dst)
    index = discover(src, layout, image_pattern, label_pattern, require_labels=False)
    organ_id = None
    if rule == "max-area":
        by_name = {v: k for k, v in index.labels.items()}
        if value not in by_name:
            raise DataError(f"{src}: --max-area organ {value!r} is not a label of this dataset (labels: {sorted(by_name)})")
        organ_id = by_name[value]
    listed: Dict[str, int] = {}
    if rule == "list":
        lf = Path(value)
        try:
            for n, line in enumerate(lf.read_text().splitlines(), 1):
                if line.strip() and not line.lstrip().startswith("#"):
                    parts = line.split()
                    if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                        raise DataError(f"{lf}:{n}: expected '<case> <slice index>', got {line!r}")
                    listed[parts[0]] = int(parts[1])
        except OSError as e:
            raise DataError(f"{lf}: cannot read slice list ({e.strerror or e})") from None
    new_dataset_dir(dst, overwrite)
    chosen: Dict[str, int] = {}
    for case in index.cases:
        if rule == "list" and case.case_id not in listed:
            warnings.warn(f"{case.case_id}: not in the slice list, skipped", stacklevel=2)
            continue
        chans = []
        for p in case.images:
            data, aff, _ = load_nifti(p, "image")
            if data.ndim != 3:
                raise DataError(f"{p}: expected a 3D volume, got shape {data.shape}")
            chans.append(_canonical(data, aff))
        label = lab_aff = None
        if case.label is not None:
            ldata, laff, _ = load_nifti(case.label, "label")
            if ldata.shape != chans[0][0].shape[:3] and ldata.shape != data.shape:
                raise DataError(f"{case.label}: label shape {ldata.shape} differs from image shape {data.shape}")
            label, lab_aff = _canonical(ldata, laff)
        elif rule == "max-area":
            raise DataError(f"{case.images[0]}: --max-area needs a label file for case {case.case_id!r}")
        depth = chans[0][0].shape[2]
        z = listed[case.case_id] if rule == "list" else choose_slice(label, depth, rule, value, organ_id)
        if not 0 <= z < depth:
            raise DataError(f"{case.images[0]}: slice index {z} is outside 0..{depth - 1}")
        chosen[case.case_id] = z
        for c, (vol, aff) in enumerate(chans):  # the slice keeps its world position
            save_nifti(nib.Nifti1Image(np.ascontiguousarray(vol[:, :, z]), slice_affine(aff, z)),
                         dst / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz")
        if label is not None:
            save_nifti(nib.Nifti1Image(np.ascontiguousarray(label[:, :, z]).astype(np.uint8), slice_affine(lab_aff, z)),
                         dst / "labelsTr" / f"{case.case_id}.nii.gz")
    meta = {
        "name": f"{src.name}_single_slice",
        "description": f"one axial slice per case of {src} (RAS, index from inferior), rule {rule}={value}",
        "channel_names": {str(i): n for i, n in enumerate(index.channels or ["image"])},
        "labels": {name: int(i) for i, name in sorted(index.labels.items())} or {"background": 0},
        "numTraining": len(chosen),
        "file_ending": ".nii.gz",
        "source": str(src),
        "slice_rule": {"rule": rule, "value": value},
        "slices": chosen,
    }
    write_json(dst / "dataset.json", meta)
    return chosen
