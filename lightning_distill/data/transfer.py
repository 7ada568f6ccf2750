"""Slices written by ``lightning-distill teach`` as a student's second stream of training samples.

Two routes read a ``teach`` folder (:mod:`lightning_distill.teach`), each beside the student's own
labelled single slices (``transfer.*`` of a run config; docs/methods.md):

* **transfer** (``transfer.slices``): the teacher's probabilities per pixel are a target of their own
  (:mod:`lightning_distill.losses.transfer`); ``transfer.target=truth`` puts the slices' ground truth
  through the same channel instead (the best this channel can carry: a control).
* **union** (``transfer.union``): the slices' ground truth joins the labelled set (Dice + CE as the
  student's own slices): the route that needs no teacher at all.

A sample is ``{"image" (C, H, W), "label" (H, W) int64 (IGNORE_INDEX where unlabelled), "soft" (K + 1,
H, W) float32 (the teacher's K probabilities and its confidence; absent without a model), "spacing"}``;
its id is ``<volume>@<plane>``, its subject the volume.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np

from lightning_distill.data.nifti import IGNORE_INDEX, DataError
from lightning_distill.data.provenance import subject_identity, subject_of
from lightning_distill.data.sources import SubjectSource

FORMAT = "lightning_distill teacher slices"  # dataset.json's "format" of a `teach` folder
FORMAT_VERSION = 1


class TeacherSlices(SubjectSource):
    """The slices of a ``teach`` folder, held in memory as written (float16 probabilities).

    Args:
        root: the folder (``dataset.json`` and ``volumes/``).
        class_names: the student's classes; the folder's must be the same.
        select: keep the slices of volumes whose attribute has one of the values, e.g.
            ``{"phase": ["noncontrast"]}`` (``dataset.json`` lists every volume's attributes).
        need: ``"teacher"`` (probabilities needed) or ``"truth"`` (ground truth needed: a volume without a
            label is left out, with every slice of it counted in :attr:`left_out`).

    Raises:
        DataError: the folder is not a ``teach`` output, its classes differ, a select key is not an
            attribute of its volumes, no slice is left (each names the folder and the problem).
    """

    spatial_dims = 2

    def __init__(self, root: str | Path, class_names: Sequence[str], select: Optional[Mapping[str, Sequence[str]]] = None,
                 need: str = "teacher"):
        if need not in ("teacher", "truth"):
            raise ValueError(f"need must be 'teacher' or 'truth', got {need!r}")
        self.root = Path(root)
        meta_path = self.root / "dataset.json"
        if not meta_path.is_file():
            raise DataError(f"{self.root}: no dataset.json (write the folder with `lightning-distill teach`)")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise DataError(f"{meta_path}: not written by `lightning-distill teach` (format {meta.get('format')!r})")
        if list(meta["classes"]) != list(class_names):
            raise DataError(f"{meta_path}: its classes {meta['classes']} are not the run's {list(class_names)}")
        if need == "teacher" and meta.get("model") is None:
            raise DataError(f"{meta_path}: holds ground truth only (written with model.format=none): use it as "
                            "transfer.union, or as transfer.slices with transfer.target=truth")
        self.meta, self.class_names, self.need = meta, tuple(class_names), need
        select = {k: [str(v) for v in vs] for k, vs in dict(select or {}).items()}
        known = sorted({k for v in meta["volumes"].values() for k in v["attributes"]})
        bad = [k for k in select if k not in known]
        if bad:
            raise DataError(f"{meta_path}: select keys {bad} are not attributes of its volumes (they have: {known or 'none'})")
        self.left_out: Dict[str, int] = {"select": 0, "unlabelled": 0}
        self._arrays: Dict[str, Dict[str, np.ndarray]] = {}
        self.ids: List[str] = []
        for vid, v in sorted(meta["volumes"].items()):
            if any(str(v["attributes"].get(k)) not in vals for k, vals in select.items()):
                self.left_out["select"] += v["slices"]
                continue
            if need == "truth" and not v["labelled"]:
                self.left_out["unlabelled"] += v["slices"]
                continue
            path = self.root / "volumes" / f"{vid}.npz"
            try:
                with np.load(path) as a:
                    arrays = {k: a[k] for k in a.files if k in ("image", "prob", "confidence", "label", "spacing", "plane")}
            except (OSError, ValueError) as e:
                raise DataError(f"{path}: cannot be read ({e})") from None
            if "plane" not in arrays or len(arrays["plane"]) != v["slices"]:
                raise DataError(f"{path}: does not hold the {v['slices']} slices dataset.json lists")
            self._arrays[vid] = arrays
            self.ids += [f"{vid}@{int(z)}" for z in arrays["plane"]]
        if not self.ids:
            raise DataError(f"{self.root}: no slice left (select {select or 'none'}; left out: {self.left_out})")
        self.select = select

    def subject_identity(self, subject_id: str) -> str:
        """The teacher's volume a slice is of, as a subject of the dataset it was read from (``teach`` records it)."""
        return subject_identity(self.root, subject_of(subject_id))

    def load(self, sample_id: str) -> Dict[str, Any]:
        vid, z = sample_id.rsplit("@", 1)
        a = self._arrays[vid]
        i = int(np.flatnonzero(a["plane"] == int(z))[0])
        label = (a["label"][i].astype(np.int64) if "label" in a
                 else np.full(a["image"].shape[1:], IGNORE_INDEX, np.int64))
        out = {"image": a["image"][i], "label": label, "spacing": a["spacing"][i]}
        if "prob" in a:
            out["soft"] = np.concatenate([a["prob"][i], a["confidence"][i][None]]).astype(np.float32)
        return out

    def record(self) -> Dict[str, Any]:
        """What a run's checkpoint records about these slices."""
        m = self.meta
        return {"root": str(self.root), "slices": len(self.ids), "volumes": len(self._arrays), "select": self.select,
                "left_out": dict(self.left_out), "labelled_by": m.get("labelled_by"), "tau": m.get("tau"),
                "model_sha256": (m.get("model") or {}).get("sha256")}
