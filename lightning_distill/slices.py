"""Single-slice extraction: one axial slice per subject from a dataset of 3D volumes.

This simulates a single-slice cohort (e.g. one CT slice per participant at a vertebral level). Each
volume is reoriented to RAS first, so slice indices count from inferior (0) to superior. Rules:

* ``index``: a fixed axial index (clipped to the volume);
* ``fraction``: ``round(f * (Z - 1))``;
* ``max-area``: the slice where a named class has the largest area (ties: the lowest index); the name
  is one of ``classes`` when a label mapping is given, else a label name of the source dataset;
* ``list``: a text file of ``<case> <index>`` lines (cases not listed are skipped, with a warning).

Labels: with ``classes`` (and optionally ``label_map``, ``unmapped``, ``on_missing``: the same
options and the same rule as ``data.nifti``, see :class:`~lightning_distill.data.labels.LabelMapping`)
the written labels are the experiment's class indices and ``dataset.json`` names those classes;
without, the source's label ids are copied unchanged. A label pattern that finds no label file, or
finds only some, is an error (``labels=False`` writes an image-only dataset on purpose).

Output: an nnU-Net v2 raw dataset of 2D NIfTI files (``imagesTr/<case>_0000.nii.gz``,
``labelsTr/<case>.nii.gz``) whose affines keep the in-plane spacing and the slice's world position,
and a ``dataset.json`` that also records the rule, the label mapping and each case's slice index.
Whole or nothing: every input is checked first (headers, complete data, shapes and affines), the
dataset is written into a temporary folder beside ``dst`` and moved into place only when complete,
so a failure names the file and leaves ``dst`` as it was. An existing non-empty destination is
refused unless ``overwrite``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import nibabel as nib
import numpy as np

from lightning_distill.data.labels import LabelMapping
from lightning_distill.data.nifti import (Case, DataError, IGNORE_INDEX, check_nifti_file, discover, load_nifti,
                                          reorient, slice_affine)
from lightning_distill.data.provenance import write_provenance
from lightning_distill.io import listed, nnunet_dirs, save_nifti, staged_dir, write_json


def to_ras(data: np.ndarray, affine: np.ndarray):
    """``(data, affine)`` of a 3D array reoriented to RAS (the axis order ``slices`` cuts axial slices in)."""
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


def _read_list(path: Path) -> Dict[str, int]:
    listed: Dict[str, int] = {}
    try:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip() and not line.lstrip().startswith("#"):
                parts = line.split()
                if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
                    raise DataError(f"{path}:{n}: expected '<case> <slice index>', got {line!r}")
                listed[parts[0]] = int(parts[1])
    except OSError as e:
        raise DataError(f"{path}: cannot read slice list ({e.strerror or e})") from None
    return listed


def _check_labels_found(cases: List[Case], src: Path, labels: bool) -> None:
    """Every case has a label file, or (``labels=False``) none is used."""
    missing = [c for c in cases if c.label is None]
    if not labels or not missing:
        return
    where = missing[0].expected_label or "labelsTr/"
    if len(missing) == len(cases):
        raise DataError(f"{src}: no label file found for any of the {len(cases)} images (e.g. {where}); check the "
                        "label pattern (folder layout: --label-pattern, {case} = the case id), or pass --no-labels "
                        "to write images only")
    raise DataError(f"{where}: label file is missing ({len(missing)} of {len(cases)} cases have none: "
                    f"{listed([c.case_id for c in missing])})")


def _check_case(case: Case) -> None:
    """Headers readable, data complete, 3D, image channels and label on one grid."""
    shape0 = affine0 = None
    for p, what in [(p, "image") for p in case.images] + ([(case.label, "label")] if case.label is not None else []):
        shape, affine = check_nifti_file(p, what)
        if len(shape) != 3:
            raise DataError(f"{p}: expected a 3D volume, got shape {shape}")
        if shape0 is None:
            shape0, affine0 = shape, affine
        elif shape != shape0:
            raise DataError(f"{p}: {what} shape {shape} differs from image shape {shape0} ({case.images[0]})")
        elif not np.allclose(affine, affine0, atol=1e-3):
            raise DataError(f"{p}: {what} affine differs from the image's ({case.images[0]})")


def _organ_id(rule: str, value, mapping: Optional[LabelMapping], dataset_labels: Mapping[int, str], src: Path) -> Optional[int]:
    """The label value whose area ``max-area`` maximises (a class index after mapping, else a dataset id)."""
    if rule != "max-area":
        return None
    if mapping is not None:
        names = list(mapping.class_names)
        if value not in names[1:]:
            raise DataError(f"{src}: --max-area {value!r} is not one of the classes {names[1:]}")
        return names.index(value)
    by_name = {v: k for k, v in dataset_labels.items()}
    if not by_name:
        raise DataError(f"{src}: --max-area {value!r}: this dataset has no label names (no dataset.json); "
                        "name its labels with classes=[background,...] and data.nifti.label_map={id: class, ...}")
    if value not in by_name:
        raise DataError(f"{src}: --max-area organ {value!r} is not a label of this dataset (labels: {sorted(by_name)}); "
                        "with classes=[...] it names a class after mapping")
    return by_name[value]


def extract_slices(src: str | Path, dst: str | Path, rule: str, value, layout: str = "auto", overwrite: bool = False,
                   image_pattern: str = "images/*.nii.gz", label_pattern: Optional[str] = "labels/{case}.nii.gz",
                   classes: Optional[Sequence[str]] = None, label_map: Optional[Mapping] = None,
                   unmapped: str = "background", on_missing: str = "error", labels: bool = True) -> Dict[str, int]:
    """Write one axial slice per case of ``src`` into ``dst`` (see module docstring). Returns ``{case: z}``.

    Args:
        src: dataset folder of 3D volumes (nnU-Net v2, MSD or plain folder layout).
        dst: output folder.
        rule, value: ``index`` N, ``fraction`` F, ``max-area`` NAME or ``list`` FILE.
        layout, image_pattern, label_pattern: see :func:`lightning_distill.data.nifti.discover`.
        overwrite: replace a non-empty ``dst`` (only once the new dataset is complete).
        classes, label_map, unmapped, on_missing: map the labels to these classes (background
            first), as ``data.nifti`` does; ``None`` copies the source's label ids.
        labels: ``False`` writes images only (label files are not read).
    """

    src, dst = Path(src), Path(dst)
    index = discover(src, layout, image_pattern, label_pattern, require_labels=False)
    if label_map and not classes:
        raise ValueError("a label map needs the classes it maps to: give classes=[background,...]")
    if not labels:
        if rule == "max-area":
            raise ValueError("--max-area needs labels; drop --no-labels")
        index.cases = [Case(c.case_id, c.images) for c in index.cases]
    mapping = LabelMapping(list(classes), index.labels, dict(label_map or {}), unmapped, source=str(src),
                           on_missing=on_missing) if classes and labels else None
    organ = _organ_id(rule, value, mapping, index.labels, src)
    listed = _read_list(Path(value)) if rule == "list" else {}
    cases = []
    for case in index.cases:
        if rule == "list" and case.case_id not in listed:
            warnings.warn(f"{case.case_id}: not in the slice list, skipped", stacklevel=2)
            continue
        cases.append(case)
    _check_labels_found(cases, src, labels)
    for case in cases:  # every input checked before anything is written
        _check_case(case)
    chosen: Dict[str, int] = {}
    pixels: Dict[int, int] = {}
    with staged_dir(dst, overwrite) as tmp:
        nnunet_dirs(tmp)
        for case in cases:
            chans = [to_ras(*load_nifti(p, "image")[:2]) for p in case.images]
            label = lab_aff = None
            if case.label is not None:
                ldata, laff, _ = load_nifti(case.label, "label")
                if mapping is not None:
                    ldata = mapping.apply(ldata, case.label)
                label, lab_aff = to_ras(ldata, laff)
            depth = chans[0][0].shape[2]
            z = listed[case.case_id] if rule == "list" else choose_slice(label, depth, rule, value, organ)
            if not 0 <= z < depth:
                raise DataError(f"{case.images[0]}: slice index {z} is outside 0..{depth - 1}")
            chosen[case.case_id] = z
            for c, (vol, aff) in enumerate(chans):  # the slice keeps its world position
                plane = np.ascontiguousarray(vol[:, :, z])
                if not np.all(np.isfinite(plane)):
                    raise DataError(f"{case.images[c]}: slice {z} contains NaN or Inf voxels")
                save_nifti(nib.Nifti1Image(plane, slice_affine(aff, z)), tmp / "imagesTr" / f"{case.case_id}_{c:04d}.nii.gz")
            if label is not None:
                plane = np.ascontiguousarray(label[:, :, z])
                for v, n in zip(*np.unique(plane, return_counts=True)):
                    pixels[int(v)] = pixels.get(int(v), 0) + int(n)
                save_nifti(nib.Nifti1Image(plane.astype(np.uint8 if plane.max(initial=0) <= 255 else np.int16),
                                           slice_affine(lab_aff, z)), tmp / "labelsTr" / f"{case.case_id}.nii.gz")
        if mapping is not None:
            print(mapping.summary(), flush=True)
            mapping.check_coverage()
        write_json(tmp / "dataset.json", _dataset_json(src, index, rule, value, chosen, mapping, pixels, labels))
        write_provenance(tmp, "lightning-distill slices", {c: c for c in chosen}, root=src)
    _warn_absent(mapping, pixels, dst)
    return chosen


def _dataset_json(src: Path, index, rule: str, value, chosen: Dict[str, int], mapping: Optional[LabelMapping],
                  pixels: Dict[int, int], labels: bool) -> dict:
    if mapping is not None:
        names = {name: i for i, name in enumerate(mapping.class_names)}
        if IGNORE_INDEX in pixels:
            names["ignore"] = IGNORE_INDEX  # nnU-Net's convention: the highest label, named "ignore"
    else:
        names = {name: int(i) for i, name in sorted(index.labels.items())} or {"background": 0}
    meta = {
        "name": f"{src.name}_single_slice",
        "description": f"one axial slice per case of {src} (RAS, index from inferior), rule {rule}={value}",
        "channel_names": {str(i): n for i, n in enumerate(index.channels or ["image"])},
        "labels": names,
        "numTraining": len(chosen),
        "file_ending": ".nii.gz",
        "source": str(src),
        "slice_rule": {"rule": rule, "value": value},
        "slices": chosen,
    }
    if mapping is not None:
        meta["label_mapping"] = {"classes": list(mapping.class_names), "unmapped": mapping.unmapped,
                                 "source_ids": {str(k): c for k, c in mapping.resolved().items()}}
    if not labels:
        meta["images_only"] = True
    return meta


def _warn_absent(mapping: Optional[LabelMapping], pixels: Dict[int, int], dst: Path) -> None:
    """Classes present in the volumes but in none of the chosen slices."""
    if mapping is None:
        return
    absent = [n for i, n in enumerate(mapping.class_names) if i and not pixels.get(i)]
    if absent:
        warnings.warn(f"{dst}: classes {absent} appear in none of the extracted slices", stacklevel=3)
