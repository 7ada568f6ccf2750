"""``lightning-distill convert``: DICOM cases with their masks into an nnU-Net dataset the package trains on.

A case is a subfolder of the source: one DICOM image series (read by :mod:`lightning_distill.data.dicom`: HU,
geometry, the checks of every DICOM input) and its masks, either

* a DICOM Segmentation (``Modality`` SEG) that references the series (read with highdicom; each segment's label
  becomes a label name), or
* per-organ masks: a folder (``--masks``, default ``MASKS_DICOM``) with one subfolder per organ holding a DICOM
  series of that organ's mask (voxels > 0), on the image's grid (3D-IRCADb's layout); the subfolder's name is the
  label name.

The dataset gets ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` and a ``dataset.json`` naming every
label found (ids in order of first appearance over the sorted cases, background 0), so the run config maps them to
its classes with ``data.nifti.label_map`` as for any dataset. Masks that overlap, masks off the image's grid, a case
without masks or with two image series are refused with the case and files named; nothing is written then.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Tuple

import nibabel as nib
import numpy as np

from lightning_distill.data.dicom import NOT_AN_IMAGE, Series, find_series, highdicom, read_series
from lightning_distill.data.nifti import DataError
from lightning_distill.io import listed, save_nifti, staged_dir, write_json


def _split(case: Path, masks: Path) -> Tuple[Series, Dict[Path, List[Series]], List[Path]]:
    """One reading of a case's DICOM headers: its image series, the mask series under ``masks`` by organ folder, and
    its DICOM-SEG files (left out of the image series by :func:`~lightning_distill.data.dicom.find_series`)."""
    found = find_series(case)
    images = [s for s in found if masks not in s.files[0].parents]
    if len(images) != 1:
        raise DataError(f"{case}: {len(images)} image series outside {masks.name}/ "
                        f"({listed([s.uid for s in images], 3)}); a case holds exactly one")
    organs: Dict[Path, List[Series]] = {}
    for s in found:
        if masks in s.files[0].parents:
            organs.setdefault(masks / s.files[0].relative_to(masks).parts[0], []).append(s)
    return images[0], organs, found[0].skipped.get(NOT_AN_IMAGE.format("SEG"), [])


def _from_seg(case: Path, series: Series, seg_path: Path) -> Tuple[np.ndarray, List[str]]:
    hd = highdicom()
    import pydicom

    seg = hd.seg.segread(str(seg_path))
    sop = [str(pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID) for f in series.files]
    numbers = list(seg.segment_numbers)
    names = [str(seg.get_segment_description(n).segment_label) for n in numbers]
    try:
        frames = seg.get_pixels_by_source_instance(source_sop_instance_uids=sop, segment_numbers=numbers,
                                                   combine_segments=True, relabel=True)
    except (ValueError, KeyError, RuntimeError) as e:
        raise DataError(f"{seg_path}: its segments cannot be placed on the series {series.uid} of {case.name} "
                        f"(overlapping segments, or frames of other images): {e}") from None
    return np.asarray(frames).transpose(2, 1, 0).astype(np.uint8), names  # (slice, row, column) -> (x, y, z)


def _from_organs(case: Path, masks: Path, series_of: Dict[Path, List[Series]], affine: np.ndarray,
                 shape: Tuple[int, ...]) -> Tuple[np.ndarray, List[str]]:
    organs = sorted(d for d in masks.iterdir() if d.is_dir())
    if not organs:
        raise DataError(f"{masks}: no organ subfolder (one DICOM mask series per organ)")
    label = np.zeros(shape, dtype=np.uint8)
    owner: Dict[int, str] = {}
    for k, organ in enumerate(organs, start=1):
        found = series_of.get(organ, [])
        if len(found) != 1:
            raise DataError(f"{organ}: {len(found)} series; an organ's folder holds its one mask series")
        data, aff = read_series(found[0])
        if data.shape != shape or not np.allclose(aff, affine, atol=1e-3):
            raise DataError(f"{organ}: the mask is not on the image's grid (shape {data.shape} vs {shape}, or another "
                            "affine); masks must be cut like their image")
        inside = data > 0
        clash = inside & (label > 0)
        if clash.any():
            other = owner[int(label[clash][0])]
            raise DataError(f"{case.name}: {int(clash.sum())} voxels are in both {organ.name} and {other}; a voxel has "
                            "one label (no label is changed silently)")
        label[inside] = k
        owner[k] = organ.name
    return label, [d.name for d in organs]


def convert(src: str | Path, dst: str | Path, masks: str = "MASKS_DICOM", overwrite: bool = False) -> Dict[str, List[str]]:
    """Convert every case (subfolder) of ``src`` into the nnU-Net dataset ``dst`` (module docstring); returns
    ``{case: the label names found in it}``. ``dst`` appears whole or not at all."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"{src}: not a folder of DICOM cases")
    cases = sorted(d for d in src.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not cases:
        raise DataError(f"{src}: no case subfolder")
    ids: Dict[str, int] = {"background": 0}
    found: Dict[str, List[str]] = {}
    with staged_dir(dst, overwrite) as tmp:
        for case in cases:
            mask_dir = case / masks
            series, organs, segs = _split(case, mask_dir)
            image, affine = read_series(series)
            if segs and mask_dir.is_dir():
                raise DataError(f"{case}: both a DICOM-SEG ({segs[0].name}) and {masks}/; keep one source of masks")
            if len(segs) > 1:
                raise DataError(f"{case}: {len(segs)} DICOM-SEG files ({listed([s.name for s in segs], 3)}); keep one")
            if segs:
                local, names = _from_seg(case, series, segs[0])
            elif mask_dir.is_dir():
                local, names = _from_organs(case, mask_dir, organs, affine, image.shape)
            else:
                raise DataError(f"{case}: no masks (no DICOM-SEG and no {masks}/ folder)")
            label = np.zeros_like(local)
            for k, name in enumerate(names, start=1):
                label[local == k] = ids.setdefault(name, len(ids))
            found[case.name] = names
            whole = np.array_equal(image, np.round(image)) and image.min() >= -32768 and image.max() <= 32767
            stored = image.astype(np.int16) if whole else image.astype(np.float32)  # HU stay integers, as in DICOM
            save_nifti(nib.Nifti1Image(stored, affine), tmp / "imagesTr" / f"{case.name}_0000.nii.gz")
            save_nifti(nib.Nifti1Image(label, affine), tmp / "labelsTr" / f"{case.name}.nii.gz")
        write_json(tmp / "dataset.json", {
            "name": src.name, "description": f"converted from the DICOM cases of {src} by lightning-distill convert",
            "channel_names": {"0": series.modality or "image"}, "labels": ids, "numTraining": len(cases), "file_ending": ".nii.gz",
            "source": str(src.resolve()), "cases": found})
    return found


def describe(found: Dict[str, List[str]]) -> str:
    """One line per case: its labels."""
    return "\n".join(f"{case}: {', '.join(names)}" for case, names in found.items())

