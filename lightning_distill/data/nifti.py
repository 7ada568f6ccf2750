"""NIfTI datasets: discovery (nnU-Net v2, MSD, plain folders), validated reading and label maps.

Every problem with an input file raises :class:`DataError` (a ``ValueError``) whose message starts
with the offending path and says what is wrong: missing label file, unreadable or truncated file,
image/label shape or affine mismatch, label values outside the dataset's label map, NaN/Inf voxels,
an all-background label where organs are required, a wrong number of dimensions, a malformed
``dataset.json``, an unreadable directory, an unknown organ name in a label map.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import nibabel.orientations as no
import numpy as np

from lightning_distill.io import listed

NIFTI_ENDINGS = (".nii.gz", ".nii")
IGNORE_INDEX = 255


class DataError(ValueError):
    """A dataset file or folder is unusable; the message names it and the problem."""


@dataclass
class Case:
    """One subject: image file(s) (one per channel) and an optional label file."""

    case_id: str
    images: List[Path]
    label: Optional[Path] = None
    expected_label: Optional[Path] = None  # where the layout says the label should be (if missing)


@dataclass
class DatasetIndex:
    """What discovery found: the cases and the dataset's own label names (id -> name)."""

    root: Path
    layout: str
    cases: List[Case]
    labels: Dict[int, str] = field(default_factory=dict)
    channels: List[str] = field(default_factory=list)


def _strip_ending(name: str) -> str:
    for e in NIFTI_ENDINGS:
        if name.endswith(e):
            return name[: -len(e)]
    return name


def _listdir(path: Path) -> List[str]:
    if not path.exists():
        raise DataError(f"{path}: directory does not exist")
    if not path.is_dir():
        raise DataError(f"{path}: is not a directory")
    try:
        return sorted(os.listdir(path))
    except OSError as e:
        raise DataError(f"{path}: directory cannot be read ({e.strerror or e})") from e


def _read_json(path: Path) -> dict:
    try:
        with path.open() as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: dataset.json is missing") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: malformed dataset.json (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{path}: malformed dataset.json (expected a JSON object, got {type(obj).__name__})")
    return obj


def _parse_labels(path: Path, raw, name_to_id: bool) -> Dict[int, str]:
    if not isinstance(raw, dict) or not raw:
        raise DataError(f"{path}: malformed dataset.json: 'labels' must be a non-empty mapping")
    out: Dict[int, str] = {}
    try:
        for k, v in raw.items():
            if name_to_id:  # nnU-Net v2: {"liver": 1} (region lists are not supported)
                if isinstance(v, (list, tuple)):
                    raise DataError(f"{path}: region-based label {k!r}: {v} is not supported; use integer labels")
                out[int(v)] = str(k)
            else:  # MSD: {"1": "liver"}
                out[int(k)] = str(v)
    except (TypeError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: malformed dataset.json: label entry {k!r}: {v!r} is not an integer label ({e})") from None
    if 0 not in out:
        raise DataError(f"{path}: malformed dataset.json: 'labels' has no background (0) entry")
    return out


def detect_layout(root: Path) -> str:
    ds = root / "dataset.json"
    if ds.is_file():
        obj = _read_json(ds)
        if "channel_names" in obj or "file_ending" in obj:
            return "nnunet"
        if "training" in obj:
            return "msd"
        raise DataError(f"{ds}: malformed dataset.json: neither nnU-Net v2 ('channel_names', 'file_ending') nor MSD ('training') keys")
    return "folder"


def discover(root: str | Path, layout: str = "auto", image_pattern: str = "images/*.nii.gz",
             label_pattern: Optional[str] = "labels/{case}.nii.gz", require_labels: bool = True) -> DatasetIndex:
    """Find the cases of a dataset.

    Args:
        root: dataset folder.
        layout: ``auto``, ``nnunet`` (``dataset.json`` + ``imagesTr/<case>_<XXXX><ending>`` +
            ``labelsTr/<case><ending>``), ``msd`` (``dataset.json`` with a ``training`` list) or
            ``folder`` (images matched by ``image_pattern``, a glob relative to ``root``; labels found
            by ``label_pattern`` with ``{case}`` replaced by the case id). The case id is the part of
            the file name at ``{case}`` in ``image_pattern`` (``images/image_{case}.nii.gz`` with
            ``labels/label_{case}.nii.gz``), or without ``{case}`` the file name without its ending
            and a trailing ``_0000``. A ``label_pattern`` that matches no file at all is an error.
        require_labels: raise if a case has no label file.
    """
    root = Path(root)
    _listdir(root)
    if layout == "auto":
        layout = detect_layout(root)
    if layout == "nnunet":
        return _discover_nnunet(root, require_labels)
    if layout == "msd":
        return _discover_msd(root, require_labels)
    if layout == "folder":
        return _discover_folder(root, image_pattern, label_pattern, require_labels)
    raise DataError(f"{root}: unknown layout {layout!r}; valid: auto, nnunet, msd, folder")


def _discover_nnunet(root: Path, require_labels: bool) -> DatasetIndex:
    ds = root / "dataset.json"
    obj = _read_json(ds)
    for key in ("channel_names", "labels", "file_ending"):
        if key not in obj:
            raise DataError(f"{ds}: malformed nnU-Net dataset.json: missing {key!r}")
    ending = str(obj["file_ending"])
    if ending not in NIFTI_ENDINGS:
        raise DataError(f"{ds}: file_ending {ending!r} is not NIfTI ({', '.join(NIFTI_ENDINGS)})")
    try:
        channels = [str(obj["channel_names"][k]) for k in sorted(obj["channel_names"], key=int)]
    except (TypeError, ValueError, AttributeError):
        raise DataError(f"{ds}: malformed dataset.json: 'channel_names' must map '0', '1', ... to names") from None
    labels = _parse_labels(ds, obj["labels"], name_to_id=True)
    img_dir, lbl_dir = root / "imagesTr", root / "labelsTr"
    pat = re.compile(r"^(.*)_(\d{4})" + re.escape(ending) + "$")
    found: Dict[str, Dict[int, Path]] = {}
    for name in _listdir(img_dir):
        m = pat.match(name)
        if m:
            found.setdefault(m.group(1), {})[int(m.group(2))] = img_dir / name
    if not found:
        raise DataError(f"{img_dir}: no images named <case>_0000{ending}")
    cases = []
    for cid in sorted(found):
        chans = found[cid]
        missing = [c for c in range(len(channels)) if c not in chans]
        if missing:
            raise DataError(f"{img_dir / (cid + '_%04d' % missing[0] + ending)}: missing channel {missing[0]} of case {cid!r} "
                            f"(dataset.json declares {len(channels)} channels)")
        label = lbl_dir / f"{cid}{ending}"
        cases.append(Case(cid, [chans[c] for c in range(len(channels))], _label_or_fail(label, require_labels), label))
    return DatasetIndex(root, "nnunet", cases, labels, channels)


def _label_or_fail(path: Path, required: bool) -> Optional[Path]:
    if path.is_file():
        return path
    if required:
        raise DataError(f"{path}: label file is missing")
    return None


def _discover_msd(root: Path, require_labels: bool) -> DatasetIndex:
    ds = root / "dataset.json"
    obj = _read_json(ds)
    if not isinstance(obj.get("training"), list) or not obj["training"]:
        raise DataError(f"{ds}: malformed MSD dataset.json: 'training' must be a non-empty list")
    labels = _parse_labels(ds, obj.get("labels"), name_to_id=False)
    channels = [str(v) for _, v in sorted((obj.get("modality") or {"0": "image"}).items(), key=lambda kv: int(kv[0]))]
    cases = []
    for i, entry in enumerate(obj["training"]):
        if not isinstance(entry, dict) or "image" not in entry:
            raise DataError(f"{ds}: malformed MSD dataset.json: training[{i}] needs an 'image' entry")
        img = (root / entry["image"]).resolve()
        if not img.is_file():
            raise DataError(f"{img}: image file listed in {ds} is missing")
        label = (root / entry["label"]).resolve() if entry.get("label") else None
        if label is None and require_labels:
            raise DataError(f"{ds}: training[{i}] ({img.name}) has no 'label' entry")
        cases.append(Case(_strip_ending(img.name), [img], _label_or_fail(label, require_labels) if label else None, label))
    return DatasetIndex(root, "msd", cases, labels, channels)


def _case_pattern(image_pattern: str):
    """``(glob, regex or None)`` of a folder layout's image pattern; ``{case}`` marks the case id."""
    if "{case}" not in image_pattern:
        return image_pattern, None
    if image_pattern.count("{case}") > 1:
        raise DataError(f"image pattern {image_pattern!r}: {{case}} may appear only once")
    name = image_pattern.rsplit("/", 1)[-1]
    if "{case}" not in name:
        raise DataError(f"image pattern {image_pattern!r}: {{case}} must be in the file name, not a folder")
    glob = image_pattern.replace("{case}", "*")
    head, tail = name.split("{case}")
    to_re = lambda part: "".join(".*" if ch == "*" else "." if ch == "?" else re.escape(ch) for ch in part)  # noqa: E731
    return glob, re.compile("^" + to_re(head) + "(?P<case>.+?)" + to_re(tail) + "$")


def _discover_folder(root: Path, image_pattern: str, label_pattern: Optional[str], require_labels: bool) -> DatasetIndex:
    glob, capture = _case_pattern(image_pattern)
    images = sorted(p for p in root.glob(glob) if p.name.endswith(NIFTI_ENDINGS) and not p.name.startswith("."))
    if not images:
        raise DataError(f"{root}: no NIfTI file matches {image_pattern!r}")
    cases = []
    for img in images:
        if capture is not None:
            m = capture.match(img.name)
            if m is None:
                raise DataError(f"{img}: matches {glob!r} but not {image_pattern!r}")
            cid = m.group("case")
        else:
            cid = re.sub(r"_0000$", "", _strip_ending(img.name))
        label = root / label_pattern.format(case=cid) if label_pattern else None
        if label is None and require_labels:
            raise DataError(f"{root}: folder layout needs label_pattern to find labels")
        cases.append(Case(cid, [img], _label_or_fail(label, require_labels) if label else None, label))
    ids = [c.case_id for c in cases]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise DataError(f"{root}: several images map to the same case id {listed(dup, 5)}; make image_pattern more specific")
    if label_pattern and images and not any(c.label for c in cases):
        raise DataError(f"{root}: no label file matches {label_pattern!r} for any of the {len(cases)} images "
                        f"(e.g. {cases[0].expected_label} does not exist); check data.nifti.label_pattern "
                        "(use {case} for the case id, and {case} in image_pattern to say which part of the image "
                        "name it is), or set it to null for images without labels")
    return DatasetIndex(root, "folder", cases, {}, ["image"])


# --------------------------------------------------------------------------------------------
# reading


def load_nifti(path: Path, what: str = "image"):
    """``(array, affine, header)`` of a NIfTI file, with every failure turned into a DataError."""

    if not path.is_file():
        raise DataError(f"{path}: {what} file is missing")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj)
    except Exception as e:  # noqa: BLE001 - nibabel, gzip, zlib and EOF errors all mean the same
        raise DataError(f"{path}: cannot read {what} as NIfTI ({type(e).__name__}: {e}); the file is corrupt, truncated or not NIfTI") from None
    return data, np.asarray(img.affine, dtype=np.float64), img.header


def check_nifti_file(path: Path, what: str = "image"):
    """Cheap up-front check of a NIfTI file without decoding its voxels: the header reads and the data
    are complete (a ``.nii.gz`` stream is decompressed through to its end in chunks; a ``.nii`` file's
    size is compared with the header's data size).

    Returns:
        ``(shape, affine (4, 4))`` from the header. Raises :class:`DataError` naming the file.
    """


    if not path.is_file():
        raise DataError(f"{path}: {what} file is missing")
    try:
        img = nib.load(str(path))
        hdr = img.header
        shape = tuple(int(n) for n in img.shape)
        need = int(hdr.get_data_offset()) + int(np.prod(shape)) * np.dtype(hdr.get_data_dtype()).itemsize
    except Exception as e:  # noqa: BLE001 - nibabel, gzip and EOF errors all mean the same
        raise DataError(f"{path}: cannot read {what} as NIfTI ({type(e).__name__}: {e}); the file is corrupt, truncated or not NIfTI") from None
    try:
        if path.name.endswith(".gz"):
            size = 0
            with gzip.open(path, "rb") as f:
                while chunk := f.read(1 << 22):
                    size += len(chunk)
        else:
            size = path.stat().st_size
    except (OSError, EOFError, zlib.error) as e:
        raise DataError(f"{path}: {what} file is corrupt or truncated ({type(e).__name__}: {e})") from None
    if size < need:
        raise DataError(f"{path}: {what} file is truncated ({size} bytes of data where the header needs {need})")
    return shape, np.asarray(img.affine, dtype=np.float64)


def _squeeze_to(data: np.ndarray, ndim: int, path: Path, what: str) -> np.ndarray:
    while data.ndim > ndim and data.shape[-1] == 1:  # trailing singleton dims (e.g. X, Y, 1)
        data = data[..., 0]
    if data.ndim == ndim - 1 and ndim == 3:  # 2D file where 3D is expected: one slice
        data = data[..., None]
    if data.ndim != ndim:
        raise DataError(f"{path}: {what} has {data.ndim} dimensions {tuple(data.shape)}, expected {ndim}")
    return data


def read_case(case: Case, ndim: int, mapping: Any, require_foreground: bool = True, atol: float = 1e-3,
              require_label: bool = True):
    """Read and check one case; ``mapping`` (a :class:`~lightning_distill.data.labels.LabelMapping`) maps its labels.

    Returns:
        ``(image (C, *spatial) float32, label (*spatial) int64 or None, affine (4, 4), header)``.
    """
    chans, affine, header = [], None, None
    for p in case.images:
        data, aff, hdr = load_nifti(p, "image")
        data = _squeeze_to(data, ndim, p, "image")
        if affine is None:
            affine, header, shape0 = aff, hdr, data.shape
        elif data.shape != shape0 or not np.allclose(aff, affine, atol=atol):
            raise DataError(f"{p}: channel does not match {case.images[0].name} in shape or affine")
        if not np.all(np.isfinite(data)):
            n = int((~np.isfinite(data)).sum())
            raise DataError(f"{p}: image contains {n} NaN or Inf voxels")
        chans.append(data.astype(np.float32))
    image = np.stack(chans)
    label = None
    if case.label is None and case.expected_label is not None and require_label:
        raise DataError(f"{case.expected_label}: label file is missing")
    if case.label is not None:
        ldata, laff, _ = load_nifti(case.label, "label")
        ldata = _squeeze_to(ldata, ndim, case.label, "label")
        if ldata.shape != image.shape[1:]:
            raise DataError(f"{case.label}: label shape {tuple(ldata.shape)} differs from image shape {tuple(image.shape[1:])} ({case.images[0]})")
        if not np.allclose(laff, affine, atol=atol):
            raise DataError(f"{case.label}: label affine differs from the image's ({case.images[0]}):\n{laff}\nvs\n{affine}")
        label = mapping.apply(ldata, case.label)
        if require_foreground and not np.any((label > 0) & (label != IGNORE_INDEX)):
            raise DataError(f"{case.label}: label is empty (only background) after mapping to {list(mapping.class_names)}")
    return image, label, affine, header


def case_header(case: Case, ndim: int, atol: float = 1e-3) -> Tuple[Tuple[int, ...], np.ndarray]:
    """Light check of a case from its files' headers only (no voxel is decoded): every file reads as
    NIfTI, the channels and the label have the same grid. Returns ``(spatial shape, affine)``; the
    full check (:func:`read_case`) runs when the case is first read.

    Raises:
        DataError: naming the file and the problem.
    """

    def header(path: Path, what: str):
        if not path.is_file():
            raise DataError(f"{path}: {what} file is missing")
        try:
            img = nib.load(str(path))
            shape = tuple(int(n) for n in img.shape)
        except Exception as e:  # noqa: BLE001 - nibabel and gzip errors all mean the same
            raise DataError(f"{path}: cannot read {what} as NIfTI (its header: {type(e).__name__}: {e})") from None
        while len(shape) > ndim and shape[-1] == 1:
            shape = shape[:-1]
        if len(shape) == ndim - 1 and ndim == 3:
            shape = shape + (1,)
        if len(shape) != ndim:
            raise DataError(f"{path}: {what} has {len(shape)} dimensions {shape}, expected {ndim}")
        return shape, np.asarray(img.affine, dtype=np.float64)

    shape, affine = header(case.images[0], "image")
    for p in case.images[1:]:
        s, a = header(p, "image")
        if s != shape or not np.allclose(a, affine, atol=atol):
            raise DataError(f"{p}: channel does not match {case.images[0].name} in shape or affine")
    if case.label is not None:
        s, a = header(case.label, "label")
        if s != shape:
            raise DataError(f"{case.label}: label shape {s} differs from image shape {shape} ({case.images[0]})")
        if not np.allclose(a, affine, atol=atol):
            raise DataError(f"{case.label}: label affine differs from the image's ({case.images[0]})")
    return shape, affine


def reoriented_shape(shape: Sequence[int], affine: np.ndarray, axcodes: Optional[str]) -> Tuple[int, ...]:
    """The spatial shape of a ``shape`` array after :func:`reorient` to ``axcodes`` (no data needed)."""

    if not axcodes:
        return tuple(shape)
    fwd = no.ornt_transform(no.io_orientation(affine), no.axcodes2ornt(tuple(axcodes)))
    out = [0] * len(shape)
    for i, n in enumerate(shape):  # input axis i becomes output axis fwd[i, 0]
        out[int(fwd[i, 0])] = int(n)
    return tuple(out)


def reorient(data: np.ndarray, affine: np.ndarray, axcodes: Optional[str]):
    """Reorder/flip the spatial axes of ``data`` ``(C, X, Y, Z)`` to ``axcodes`` (e.g. ``"RAS"``).

    Returns:
        ``(data, affine, undo)`` where ``undo(array (X, Y, Z))`` maps an array on the new grid back
        to the input's axis order (for writing predictions in the input's orientation).
    """

    if not axcodes:
        return data, affine, (lambda a: a)
    src = no.io_orientation(affine)
    dst = no.axcodes2ornt(tuple(axcodes))
    fwd = no.ornt_transform(src, dst)
    shape = data.shape[1:]
    out = np.stack([no.apply_orientation(c, fwd) for c in data])
    new_affine = affine @ no.inv_ornt_aff(fwd, shape)
    back = no.ornt_transform(dst, src)
    return out, new_affine, (lambda a: no.apply_orientation(a, back))


def slice_affine(affine: np.ndarray, z: int) -> np.ndarray:
    """The affine of axial slice ``z`` of a volume (same axes, origin moved to the slice)."""
    a = affine.copy()
    a[:3, 3] = affine[:3, :3] @ np.array([0.0, 0.0, float(z)]) + affine[:3, 3]
    return a
