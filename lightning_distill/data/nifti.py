"""NIfTI datasets: discovery (nnU-Net v2, MSD, plain folders), validated reading and label maps.

Every problem with an input file raises :class:`DataError` (a ``ValueError``) whose message starts
with the offending path and says what is wrong: missing label file, unreadable or truncated file,
image/label shape or affine mismatch, label values outside the dataset's label map, NaN/Inf voxels,
an all-background label where organs are required, a wrong number of dimensions, a malformed
``dataset.json``, an unreadable directory, an unknown organ name in a label map.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lightning_distill.config.load import ON_MISSING, UNMAPPED

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
        raise DataError(f"{root}: several images map to the same case id {dup[:5]}; make image_pattern more specific")
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
    import nibabel as nib

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
    import gzip
    import zlib

    import nibabel as nib

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




def _map_key(key, by_name: Mapping[str, int], source: str) -> int:
    """A label map key as a dataset label id: an integer, a string of digits, or a dataset label name."""
    if isinstance(key, bool):
        raise DataError(f"{source}: label map key {key!r} is not a label id or name")
    if isinstance(key, int):
        return key
    text = str(key).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if text in by_name:
        return by_name[text]
    if not by_name:
        raise DataError(f"{source}: label map names dataset label {text!r}, but this dataset has no label names "
                        "(no dataset.json): write its label id instead, e.g. {5: liver}")
    raise DataError(f"{source}: label map names dataset label {text!r}, which the dataset does not have "
                    f"(its labels: {sorted(by_name)})")


@dataclass
class LabelMapping:
    """Maps a dataset's label ids to the experiment's class indices, and counts what it mapped.

    One rule for every layout: a label id goes to the class the map gives it; **every label id that
    nothing maps follows** ``unmapped``. What maps an id, in order of precedence:

    1. ``label_map``: ``{dataset label id or name: class name | "ignore"}``; ids may be integers or
       strings of digits (``{5: liver}`` = ``{"5": liver}``), names are the dataset's own label names
       (``dataset.json``);
    2. a dataset label whose name is an experiment class name maps to it (``dataset.json`` layouts),
       and a dataset label named ``ignore`` (nnU-Net's convention) to the ignore index;
    3. id 0 is background;
    4. only when the dataset has no label names (plain folders) **and** no ``label_map`` is given:
       id k is class k for k < the number of classes.

    Args:
        class_names: the experiment's classes, background first.
        dataset_labels: the dataset's ``{id: name}`` (from ``dataset.json``; may be empty).
        label_map: see above.
        unmapped: what a label id that nothing maps becomes: ``background``, ``ignore`` (skipped by
            losses and metrics) or ``error``.
        on_missing: after all files are read (:meth:`check_coverage`), a label map entry that occurs
            in no file, or a class that gets no voxel, is an ``error`` or a ``warn``-ing.
        source: the dataset, for messages.

    Attributes:
        lut: ``{dataset id: class index or IGNORE_INDEX}`` of the ids that something maps.
        voxels, files: per dataset id, the voxels and files seen by :meth:`apply` (raw label space).
    """

    class_names: Sequence[str]
    dataset_labels: Mapping[int, str] = field(default_factory=dict)
    label_map: Mapping = field(default_factory=dict)
    unmapped: str = "background"
    source: str = ""
    on_missing: str = "error"

    @classmethod
    def from_config(cls, class_names: Sequence[str], dataset_labels: Mapping[int, str], section: Any,
                    on_missing: str = "error") -> "LabelMapping":
        """The mapping a config section describes with its ``label_map`` and ``unmapped`` (a run's
        ``data.nifti``, ``data`` of ``bank build`` and ``teach``); its ``root`` names the dataset in messages."""
        label_map = section.label_map
        label_map = dict(OmegaConf.to_container(label_map) if isinstance(label_map, DictConfig) else label_map or {})
        return cls(list(class_names), dataset_labels, label_map, section.unmapped, source=str(section.root),
                   on_missing=on_missing)

    def __post_init__(self):
        if self.unmapped not in UNMAPPED:
            raise DataError(f"{self.source}: unmapped must be one of {list(UNMAPPED)}, got {self.unmapped!r}")
        if self.on_missing not in ON_MISSING:
            raise DataError(f"{self.source}: on_missing must be one of {list(ON_MISSING)}, got {self.on_missing!r}")
        names = list(self.class_names)
        index = {n: i for i, n in enumerate(names)}
        by_name = {v: k for k, v in self.dataset_labels.items()}
        lut: Dict[int, int] = {0: 0}
        how: Dict[int, str] = {0: "background"}
        if self.dataset_labels:
            for k, v in self.dataset_labels.items():  # identical names map by default
                if v in index:
                    lut[k], how[k] = index[v], "same name"
                elif v == "ignore":
                    lut[k], how[k] = IGNORE_INDEX, "named ignore"
        elif not self.label_map:  # no names and no map: label ids are the experiment's class indices
            for i in range(1, len(names)):
                lut[i], how[i] = i, "id = class index (no label map)"
        self.map_ids: Dict[int, Any] = {}  # dataset id -> the key it was listed under
        for key, target in dict(self.label_map or {}).items():
            src = _map_key(key, by_name, self.source)
            if src in self.map_ids:
                raise DataError(f"{self.source}: label map lists dataset label {src} twice "
                                f"(as {self.map_ids[src]!r} and {key!r})")
            if target == "ignore":
                lut[src] = IGNORE_INDEX
            elif target in index:
                lut[src] = index[target]
            else:
                raise DataError(f"{self.source}: label map sends {key!r} to unknown organ {target!r}; "
                                f"the experiment's classes are {names} (or 'ignore')")
            self.map_ids[src] = key
            how[src] = "label map"
        self.lut, self.how = lut, how
        self.voxels: Dict[int, int] = {}
        self.files: Dict[int, int] = {}

    def target(self, dataset_id: int) -> int:
        """The class index (or IGNORE_INDEX) of a dataset id; unmapped ids give their policy's value."""
        if dataset_id in self.lut:
            return self.lut[dataset_id]
        return IGNORE_INDEX if self.unmapped == "ignore" else 0

    def apply(self, label: np.ndarray, path: Path) -> np.ndarray:
        """Remap ``label`` (any shape) and count its ids; values outside ``dataset.json``'s labels raise,
        ids that nothing maps follow ``unmapped``."""
        if not np.issubdtype(label.dtype, np.integer):
            if not np.all(np.isfinite(label)):
                raise DataError(f"{path}: label contains NaN or Inf values")
            if not np.all(label == np.round(label)):
                raise DataError(f"{path}: label contains non-integer values (is this an image, not a label?)")
            label = label.astype(np.int64)
        values, inverse, counts = np.unique(label, return_inverse=True, return_counts=True)
        if self.dataset_labels:
            bad = [int(v) for v in values if int(v) not in self.dataset_labels]
            if bad:
                raise DataError(f"{path}: label values {bad[:10]} are not in the dataset's label map {dict(self.dataset_labels)}")
        if self.unmapped == "error":
            bad = [int(v) for v in values if int(v) not in self.lut]
            if bad:
                raise DataError(f"{path}: label values {bad[:10]} have no mapping to the experiment's classes "
                                f"{list(self.class_names)} (data.nifti.unmapped=error); map them in data.nifti.label_map "
                                "(to a class or 'ignore'), or set data.nifti.unmapped=background|ignore")
        out = np.array([self.target(int(v)) for v in values], np.int64)[inverse].reshape(label.shape)
        self.add_counts(values.tolist(), counts.tolist())
        return out

    def add_counts(self, ids, counts) -> None:
        """Count one file's raw label ids and their voxels (what :meth:`apply` counts; also for labels read
        from a cache, or counted in another process)."""
        for v, n in zip(ids, counts):
            self.voxels[int(v)] = self.voxels.get(int(v), 0) + int(n)
            self.files[int(v)] = self.files.get(int(v), 0) + 1

    def class_voxels(self) -> Dict[str, int]:
        """Voxels counted so far per class name (``ignore`` for the ignore index)."""
        out = {n: 0 for n in self.class_names}
        out["ignore"] = 0
        for v, n in self.voxels.items():
            t = self.target(v)
            out["ignore" if t == IGNORE_INDEX else self.class_names[t]] += n
        return out

    def resolved(self) -> Dict[int, str]:
        """``{dataset id: class name or "ignore"}`` for every id mapped or seen so far."""
        return {v: "ignore" if self.target(v) == IGNORE_INDEX else self.class_names[self.target(v)]
                for v in sorted(set(self.voxels) | set(self.lut))}

    def summary(self) -> str:
        """The resolved mapping and the voxel counts so far, as printed at the start of a run."""
        rows = [f"label map of {self.source} (unmapped ids -> {self.unmapped}):"]
        for v, cls in self.resolved().items():
            name = self.dataset_labels.get(v, "")
            why = self.how.get(v, f"unmapped -> {self.unmapped}")
            rows.append(f"  id {v:>4} {name:<16.16} -> {cls:<16.16} {self.voxels.get(v, 0):>12,} voxels in "
                        f"{self.files.get(v, 0):>4} files  ({why})")
        counts = self.class_voxels()
        if not counts["ignore"]:
            counts.pop("ignore")
        rows.append("  per class: " + ", ".join(f"{k} {n:,}" for k, n in counts.items()))
        return "\n".join(rows)

    def check_coverage(self) -> List[str]:
        """After every file was read: label map entries that occur in no file, and classes that got no
        voxel. Raises ``DataError`` (``on_missing=error``) or warns (``warn``); returns the problems."""
        if not self.voxels:  # no label was read (image-only data)
            return []
        problems = [f"label map entry {key} (dataset label {v}) occurs in no label file"
                    for v, key in self.map_ids.items() if self.voxels.get(v, 0) == 0]
        counts = self.class_voxels()
        problems += [f"class {c!r} gets no voxel in any label file" for c in self.class_names[1:] if counts[c] == 0]
        if problems:
            present = sorted(self.voxels)
            msg = (f"{self.source}: " + "; ".join(problems) + f". Label ids present in the files: {present[:40]}"
                   + ("..." if len(present) > 40 else "") + ". Voxels per class: "
                   + ", ".join(f"{k} {n:,}" for k, n in counts.items() if k != "ignore" or n))
            if self.on_missing == "error":
                raise DataError(msg + " (set data.nifti.on_missing=warn to go on anyway)")
            import warnings

            warnings.warn(msg, stacklevel=3)
        return problems


def read_case(case: Case, ndim: int, mapping: LabelMapping, require_foreground: bool = True, atol: float = 1e-3,
              require_label: bool = True):
    """Read and check one case.

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
    import nibabel as nib

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
    import nibabel.orientations as no

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
    import nibabel.orientations as no

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
