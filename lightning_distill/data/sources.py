"""Subject sources: where the samples of a data module come from.

A source is a list of subject ids plus a ``load(id)`` that returns numpy arrays. The data modules
do the splitting, caching, augmentation and batching, so a new kind of data (NIfTI folders, another
phantom) only needs a new source.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import nibabel as nib
import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from scipy.ndimage import zoom

from lightning_distill.config.run import ShiftConfig
from lightning_distill.data.case_cache import CaseCache, case_key
from lightning_distill.data.labels import LabelMapping
from lightning_distill.data.nifti import (DataError, case_header, discover, read_case, reorient, reoriented_shape,
                                          slice_affine)
from lightning_distill.data.phantom import CLASS_NAMES, PhantomSpec, hu_window, render_slice, render_volume
from lightning_distill.data.preprocess import Preprocess
from lightning_distill.data.provenance import phantom_identity, subject_identity, subject_of, write_provenance
from lightning_distill.fingerprint import quantile_profile
from lightning_distill.io import listed, save_nifti, staged_dir, write_json

# Physical extent of the phantom's normalised cube [-1, 1]^3, in mm (x, y, z).
PHANTOM_EXTENT_MM = (400.0, 400.0, 300.0)
# The phantom's array axes point to the patient's left, anterior and superior.
PHANTOM_ORIENTATION = "LAS"


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

    def subject_identity(self, subject_id: str) -> str:
        """Which subject the sample ``subject_id`` is of, across the datasets derived from one another
        (:func:`lightning_distill.data.provenance.subject_identity`)."""
        raise NotImplementedError


@dataclass
class DomainShift(ShiftConfig):
    """The domain shift of ``data.phantom.shift`` (:class:`~lightning_distill.config.ShiftConfig`: its five
    fields, their defaults and their order of application), validated and applied to windowed phantom
    images in [0, 1]. The identity by default."""

    def __post_init__(self):
        if self.resolution < 1.0 or self.gamma <= 0 or self.contrast <= 0 or self.noise < 0:
            raise ValueError(f"invalid domain shift {self}: resolution >= 1, gamma > 0, contrast > 0, noise >= 0")

    @property
    def identity(self) -> bool:
        return self == DomainShift()

    def apply(self, image: np.ndarray, seed: int) -> np.ndarray:
        """``image``: ``(C, *spatial)`` in [0, 1]."""
        if self.identity:
            return image

        x = image.astype(np.float32)
        if self.resolution > 1.0:
            out = np.empty_like(x)
            for c in range(x.shape[0]):
                small = zoom(x[c], 1.0 / self.resolution, order=1)
                out[c] = zoom(small, [n / m for n, m in zip(x.shape[1:], small.shape)], order=1)[tuple(slice(0, n) for n in x.shape[1:])]
            x = out
        x = np.clip(x, 0.0, 1.0) ** self.gamma
        x = (x - 0.5) * self.contrast + 0.5 + self.brightness
        if self.noise > 0:
            x = x + np.random.default_rng(seed).normal(0.0, self.noise, x.shape).astype(np.float32)
        return np.clip(x, 0.0, 1.0).astype(np.float32)


def mr_percentile_normalise(image: np.ndarray, percentiles: Tuple[float, float] = (0.5, 99.5)) -> np.ndarray:
    """Map one MR image's ``percentiles`` to 0 and 1, clipped (float32, same shape), exactly as
    :class:`~lightning_distill.data.preprocess.Preprocess` (``modality="MR"``) does for NIfTI files."""

    pre = Preprocess(modality="MR", mr_norm="percentile", percentiles=tuple(percentiles))
    return pre.intensity(torch.from_numpy(np.ascontiguousarray(image, np.float32))[None])[0].numpy()


@dataclass
class PhantomSource(SubjectSource):
    """Subjects of the synthetic abdominal phantom.

    Args:
        spec: population settings (seed, phases, noise).
        num_subjects: size of the population.
        shape: ``(X, Y, Z)`` for volumes, ``(X, Y)`` for single axial slices.
        window: HU window mapped to [0, 1] (CT only).
        shift: a domain shift applied after windowing (identity by default).

    ``spec.modality == "MR"`` images are normalised per image instead of windowed: the 0.5 and
    99.5 percentiles map to 0 and 1, clipped (:func:`mr_percentile_normalise`, the MR path of
    :class:`~lightning_distill.data.preprocess.Preprocess`); the shift applies after it.
    """

    spec: PhantomSpec
    num_subjects: int
    shape: Sequence[int]
    window: Tuple[float, float] = (-175.0, 250.0)
    shift: DomainShift = field(default_factory=DomainShift)

    def __post_init__(self):
        if len(self.shape) not in (2, 3):
            raise ValueError(f"phantom shape must be (X, Y) slices or (X, Y, Z) volumes, got {tuple(self.shape)}")
        self.spatial_dims = len(self.shape)
        self.class_names = CLASS_NAMES
        self.ids = [f"phantom{self.spec.seed}_{i:04d}" for i in range(self.num_subjects)]

    def subject_identity(self, subject_id: str) -> str:
        """``phantom:<id>``: the generator is deterministic, so the id is the subject (any modality or version)."""
        return phantom_identity(subject_of(subject_id))

    def load(self, subject_id: str) -> Dict:
        idx = int(subject_id.rsplit("_", 1)[1])
        if self.spatial_dims == 3:
            s = render_volume(self.spec, idx, self.shape)
            spacing = [e / n for e, n in zip(PHANTOM_EXTENT_MM, self.shape)]
        else:
            s = render_slice(self.spec, idx, self.shape)
            spacing = [e / n for e, n in zip(PHANTOM_EXTENT_MM[:2], self.shape)]
        image = mr_percentile_normalise(s["image"]) if self.spec.modality == "MR" else hu_window(s["image"], *self.window)
        image = self.shift.apply(image[None], seed=self.spec.seed * 100003 + idx)
        return {"image": image, "label": s["label"].astype(np.int64), "spacing": np.asarray(spacing, np.float32),
                "phase": s["phase"]}


def phantom_spec(p) -> PhantomSpec:
    """The :class:`PhantomSpec` of a ``data.phantom`` config node (:class:`~lightning_distill.config.PhantomConfig`)."""
    return PhantomSpec(seed=p.seed, phases=tuple(p.phases), noise_hu=tuple(p.noise_hu), blur=p.blur, slice_z=tuple(p.slice_z),
                       modality=p.modality, version=p.version)


def phantom_affine(shape: Sequence[int]) -> np.ndarray:
    """The LAS voxel-to-world matrix of a phantom grid ``(X, Y, Z)`` (a single slice ``(X, Y)``: 1/48 of the axial
    extent thick), as ``lightning-distill phantom`` exports it."""
    spacing = [e / n for e, n in zip(PHANTOM_EXTENT_MM, shape)] + ([PHANTOM_EXTENT_MM[2] / 48] if len(shape) == 2 else [])
    return np.diag([-spacing[0], spacing[1], spacing[2], 1.0])


def affine_spacing(affine) -> np.ndarray:
    """The voxel spacing (mm per axis) of a voxel-to-world matrix (numpy array or tensor)."""
    a = affine.numpy() if hasattr(affine, "numpy") else np.asarray(affine)
    return np.sqrt((a[:3, :3] ** 2).sum(0)).astype(np.float32)


class NiftiSource(SubjectSource):
    """Subjects read from NIfTI files (nnU-Net v2, MSD or plain folder layouts).

    Args:
        root: dataset folder.
        class_names: the experiment's classes (background first).
        spatial_dims: 3 for volumes (teacher) or 2 for single slices (student).
        preprocess: MONAI preprocessing (its ``shape`` is ``(X, Y, Z)``; ``Z = 1`` for 2D).
        layout, image_pattern, label_pattern: see :func:`lightning_distill.data.nifti.discover`.
        label_map, unmapped, on_missing: see :class:`lightning_distill.data.labels.LabelMapping`. The
            resolved mapping and the voxels per class are printed once every case has been read.
        cases: keep only these case ids (e.g. one patient group); ``None`` keeps all.
        slice_mode: for ``spatial_dims=2``: ``file`` (each file is one sample: a 2D NIfTI or a 3D
            file with one slice) or ``all`` (every axial slice of 3D files is a sample, id
            ``<case>@<z>``).
        on_bad_case: ``error`` stops at the first bad case; ``skip`` leaves bad cases out and logs
            one warning listing every skipped case and why.
        require_foreground: a label with no organ voxel is a bad case.
        open_mode: ``eager`` reads and checks every case before the first batch (and prints the
            label map with every class's voxels, checks that every class occurs); ``lazy`` lists the
            cases and checks their headers only (:func:`~lightning_distill.data.nifti.case_header`),
            reads and fully checks a case when it is first used, and keeps nothing in memory (memory
            stays bounded whatever the dataset size; pair it with ``cache_dir``). ``lazy`` needs
            ``on_bad_case=error``: a bad case then stops the run when it is reached (``lightning-distill
            check-data`` finds them all up front).
        cache_dir: a folder for a persistent cache of preprocessed cases
            (:mod:`lightning_distill.data.case_cache`); ``None``: none.
    """

    def __init__(self, root, class_names: Sequence[str], spatial_dims: int, preprocess, layout: str = "auto",
                 image_pattern: str = "images/*.nii.gz", label_pattern: Optional[str] = "labels/{case}.nii.gz",
                 label_map: Optional[Dict] = None, unmapped: str = "background", cases: Optional[Sequence[str]] = None,
                 slice_mode: str = "file", on_bad_case: str = "error", require_foreground: bool = True,
                 on_missing: str = "error", open_mode: str = "eager", cache_dir: Optional[str] = None):

        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if slice_mode not in ("file", "all"):
            raise ValueError(f"slice_mode must be 'file' or 'all', got {slice_mode!r}")
        if on_bad_case not in ("error", "skip"):
            raise ValueError(f"on_bad_case must be 'error' or 'skip', got {on_bad_case!r}")
        if open_mode not in ("eager", "lazy"):
            raise ValueError(f"open_mode must be 'eager' or 'lazy', got {open_mode!r}")
        if open_mode == "lazy" and on_bad_case == "skip":
            raise ValueError("data.nifti.open=lazy reads a case only when it is used, so it cannot leave bad cases out "
                             "beforehand (data.on_bad_case=skip): run `lightning-distill check-data` and list the good "
                             "cases in data.nifti.cases, or open eagerly")
        self.lazy = open_mode == "lazy"
        self.disk = CaseCache(cache_dir) if cache_dir else None
        self.spatial_dims, self.class_names = spatial_dims, tuple(class_names)
        self.preprocess, self.slice_mode, self.require_foreground = preprocess, slice_mode, require_foreground
        self.index = discover(root, layout, image_pattern, label_pattern, require_labels=False)  # checked per case
        self.mapping = LabelMapping(self.class_names, self.index.labels, label_map or {}, unmapped, source=str(root),
                                    on_missing=on_missing)
        by_id = {c.case_id: c for c in self.index.cases}
        if cases is not None:
            unknown = [c for c in cases if c not in by_id]
            if unknown:
                raise DataError(f"{root}: cases {listed(unknown)} are not in the dataset (it has {listed(sorted(by_id))})")
            by_id = {c: by_id[c] for c in cases}
        self.cases = by_id
        self._cache: Dict[str, Dict] = {}
        self.raw_quantiles: Dict[str, np.ndarray] = {}  # case id -> quantile profile of the raw image
        self.skipped: Dict[str, str] = {}
        if self.lazy:
            self._open_lazily(root)
            return
        for cid in list(by_id):  # read and check every case once (results are cached)
            counted = dict(self.mapping.voxels), dict(self.mapping.files)
            try:
                self._load_case(cid)
            except DataError as e:
                if on_bad_case == "error":
                    raise
                self.skipped[cid] = str(e)
                del self.cases[cid]
                self.mapping.voxels, self.mapping.files = counted  # a skipped case's labels are not counted
        if self.skipped:

            warnings.warn(f"{root}: skipped {len(self.skipped)} bad case(s) (data.on_bad_case=skip):\n"
                          + "\n".join(f"  {k}: {v}" for k, v in self.skipped.items()), stacklevel=2)
        if not self.cases:
            raise DataError(f"{root}: no usable case left")

        if self.mapping.voxels and rank_zero_only.rank == 0:  # DDP processes build the source too; one prints
            print(f"{self.mapping.summary()}\n  ({len(self.cases)} cases, {self.index.layout} layout)", flush=True)
        self.mapping.check_coverage()
        if spatial_dims == 3 or slice_mode == "file":
            self.ids = sorted(self.cases)
        else:
            self.ids = [f"{cid}@{z}" for cid in sorted(self.cases) for z in range(self._cache[cid]["label"].shape[-1])]

    def _open_lazily(self, root) -> None:
        """Header checks only; the ids (slice mode ``all``: the depth after reorientation, from the header)."""

        if not self.cases:
            raise DataError(f"{root}: no case")
        self.ids = []
        for cid in sorted(self.cases):
            shape, affine = case_header(self.cases[cid], 3)
            if self.spatial_dims == 2 and self.slice_mode == "all":
                depth = reoriented_shape(shape, affine, self.preprocess.orientation)[-1]
                self.ids += [f"{cid}@{z}" for z in range(depth)]
            else:
                if self.spatial_dims == 2 and shape[-1] != 1:
                    raise DataError(f"{self.cases[cid].images[0]}: a single-slice sample must be 2D (or 3D with one slice), "
                                    f"got shape {shape}; use data.nifti.slice_mode=all to take every axial slice of volumes")
                self.ids.append(cid)
        if rank_zero_only.rank == 0:
            print(f"{root}: {len(self.cases)} cases opened lazily ({self.index.layout} layout; headers checked, each case "
                  f"is read and checked when first used{'; cache ' + str(self.disk.folder) if self.disk else ''})",
                  flush=True)

    def _cache_key(self, case) -> str:
        settings = {"preprocess": asdict(self.preprocess), "lut": sorted(self.mapping.lut.items()),
                    "unmapped": self.mapping.unmapped, "dims": self.spatial_dims, "slice_mode": self.slice_mode,
                    "require_foreground": self.require_foreground}
        return case_key(list(case.images) + ([case.label] if case.label is not None else []), settings)

    def _load_case(self, cid: str) -> Dict:
        if cid in self._cache:
            return self._cache[cid]
        case = self.cases[cid]
        key = self._cache_key(case) if self.disk is not None else None
        stored = self.disk.get(cid, key) if self.disk is not None else None
        if stored is not None:
            self.mapping.add_counts(stored["label_ids"].tolist(), stored["label_counts"].tolist())  # as reading the label would
            self.raw_quantiles[cid] = stored["raw_quantiles"]
            item = {"image": stored["image"], "label": stored["label"] if "label" in stored else None,
                    "spacing": stored["spacing"]}
        else:
            before = dict(self.mapping.voxels)
            item = self._read_case(cid, case)
            if self.disk is not None:
                ids = sorted(v for v in self.mapping.voxels if self.mapping.voxels[v] != before.get(v, 0))
                counts = [self.mapping.voxels[v] - before.get(v, 0) for v in ids]
                arrays = {"image": item["image"], "spacing": np.asarray(item["spacing"]),
                          "raw_quantiles": np.asarray(self.raw_quantiles[cid]),
                          "label_ids": np.asarray(ids, np.int64), "label_counts": np.asarray(counts, np.int64)}
                if item["label"] is not None:
                    arrays["label"] = item["label"]
                self.disk.put(cid, key, arrays)
        if not self.lazy:
            self._cache[cid] = item
        return item

    def _read_case(self, cid: str, case) -> Dict:
        image, label, affine, _ = read_case(case, 3, self.mapping, self.require_foreground)
        if self.spatial_dims == 2 and self.slice_mode == "file" and image.shape[-1] != 1:
            raise DataError(f"{case.images[0]}: a single-slice sample must be 2D (or 3D with one slice), got shape {image.shape[1:]}; "
                            "use data.nifti.slice_mode=all to take every axial slice of volumes")
        self.raw_quantiles[cid] = quantile_profile(image)
        if self.spatial_dims == 2 and self.slice_mode == "all":
            item = self._per_slice(image, label, affine)
        else:
            img, lbl, _ = self.preprocess(image, affine, label)
            item = {"image": img.as_tensor().numpy(), "label": lbl.as_tensor()[0].numpy() if lbl is not None else None,
                    "spacing": affine_spacing(img.affine)}
        return item

    def _per_slice(self, image: np.ndarray, label: np.ndarray, affine: np.ndarray) -> Dict:
        """Every axial slice preprocessed on its own, as a single-slice file would be."""
        image, new_affine, _ = reorient(image, affine, self.preprocess.orientation)
        label = reorient(label[None], affine, self.preprocess.orientation)[0][0] if label is not None else None
        imgs, lbls, spacings = [], [], []
        for z in range(image.shape[-1]):
            img, lbl, _ = self.preprocess(image[..., z:z + 1], slice_affine(new_affine, z),
                                          None if label is None else label[..., z:z + 1])
            imgs.append(img.as_tensor().numpy())
            lbls.append(lbl.as_tensor()[0].numpy())
            spacings.append(affine_spacing(img.affine))
        return {"image": np.concatenate(imgs, -1), "label": np.concatenate(lbls, -1), "spacing": np.stack(spacings)}

    def subject_identity(self, subject_id: str) -> str:
        """``data:<first dataset>::<case>``, through the records of the datasets this one was derived from."""
        return subject_identity(self.index.root, subject_of(subject_id))

    def load(self, subject_id: str) -> Dict:
        if "@" in subject_id and self.spatial_dims == 2 and self.slice_mode == "all":
            cid, z = subject_id.rsplit("@", 1)
            item = self._load_case(cid)
            z = int(z)
            return {"image": item["image"][..., z], "label": item["label"][..., z], "spacing": item["spacing"][z][:2]}
        item = self._load_case(subject_id)
        if self.spatial_dims == 2:
            return {"image": item["image"][..., 0], "label": item["label"][..., 0], "spacing": item["spacing"][:2]}
        return item


def export_phantom(source: PhantomSource, dst, overwrite: bool = False, layout: str = "nnunet") -> int:
    """Write a phantom population as a NIfTI dataset (CT: HU as int16; MR: arbitrary units as float32).

    ``layout="nnunet"``: an nnU-Net v2 raw dataset (``imagesTr/<case>_0000.nii.gz``,
    ``labelsTr/<case>.nii.gz``, ``dataset.json`` with the label names and channel ``CT`` or ``MR``).
    ``layout="folder"``: a plain folder as many public sets come, ``images/image_<case>.nii.gz`` and
    ``labels/label_<case>.nii.gz`` with bare label ids (:data:`CLASS_NAMES` order) and no names.

    Volumes (or single slices, as 2D files) get an LAS affine with the phantom's spacing, so they
    behave like any scanner export: use them to try the NIfTI path end to end without real data.
    Returns the number of cases written. The dataset is written into a temporary folder and moved
    into place when complete (a failure leaves ``dst`` as it was).
    """
    if layout not in ("nnunet", "folder"):
        raise ValueError(f"phantom export layout must be nnunet or folder, got {layout!r}")
    with staged_dir(dst, overwrite) as tmp:
        _write_phantom(source, tmp, layout)
        write_provenance(tmp, "lightning-distill phantom", {sid: sid for sid in source.ids}, phantom=True)
    return len(source.ids)


def _write_phantom(source: PhantomSource, dst, layout: str) -> None:
    shape = tuple(source.shape)
    affine = phantom_affine(shape)
    mr = source.spec.modality == "MR"
    for sid in source.ids:
        idx = int(sid.rsplit("_", 1)[1])
        s = render_volume(source.spec, idx, shape) if len(shape) == 3 else render_slice(source.spec, idx, shape)
        a = affine.copy()
        if len(shape) == 2:  # place the slice at its z position
            a[2, 3] = s["z"] * PHANTOM_EXTENT_MM[2] / 2
        img = s["image"].astype(np.float32) if mr else np.round(s["image"]).astype(np.int16)
        names = (f"imagesTr/{sid}_0000", f"labelsTr/{sid}") if layout == "nnunet" else (f"images/image_{sid}", f"labels/label_{sid}")
        save_nifti(nib.Nifti1Image(img, a), dst / f"{names[0]}.nii.gz")
        save_nifti(nib.Nifti1Image(s["label"].astype(np.uint8), a), dst / f"{names[1]}.nii.gz")
    if layout == "folder":
        return
    desc = "MRI-like (T2-weighted-like)" if mr else "CT"
    meta = {"name": f"phantom_seed{source.spec.seed}", "description": f"lightning_distill synthetic abdominal {desc} phantom, version {source.spec.version}",
            "channel_names": {"0": "MR" if mr else "CT"}, "labels": {n: i for i, n in enumerate(CLASS_NAMES)},
            "numTraining": len(source.ids), "file_ending": ".nii.gz"}
    write_json(dst / "dataset.json", meta)
