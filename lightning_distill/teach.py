"""Teacher-labelled 2D slices (``lightning-distill teach``): a trained model's knowledge as training data.

A prototype bank carries K x K numbers from teacher to student. A 3D teacher's predictions carry a
label per pixel, made with 3D context. This runs a trained model once, offline, over a folder of
volumes (labelled or not) and writes 2D training samples a student learns from beside its own labelled
single slices (:mod:`lightning_distill.data.transfer`, ``transfer.*`` of a run config). The paper's
conditions hold: unpaired data, any contrast, no 3D input when the student trains or predicts, and no
teacher run while it trains.

Per volume (one code path for NIfTI folders and the phantom, whose volumes are rendered on the fly
with an LAS affine, as ``lightning-distill phantom`` writes them):

1. **The model** (every format ``bank build`` loads: :mod:`lightning_distill.teacher_model`) sees the
   volume through its own preprocessing and sliding window; its output channels are mapped to the
   classes (``classes``, ``class_map``, ``unmapped`` as in ``bank build``). The probabilities at
   ``tau`` (renormalised over the classes) and the **confidence** (the highest mapped probability at
   temperature 1 before renormalising: ``bank build``'s pseudo-label rule) are mapped back to the
   volume's own grid through the inverse of its preprocessing (linear).
   A **2D model** (a ``fit`` checkpoint of 2D data: the control of the third dimension) sees each
   chosen plane instead, through its own preprocessing, as a single-slice file would be.
   ``model.format=none`` runs no model: ground-truth slices only (the union route).
2. **Levels**: the volume is put in the student's orientation; ``levels.range`` (fractions of the
   axial axis, 0 = first plane) or ``levels.mode=match`` (the levels of the student's own slices)
   gives the candidate planes; ``levels.per_volume`` of them are drawn (seeded by ``levels.seed`` and
   the volume's id, so a resumed or sharded run draws the same).
3. **Each plane** goes through the student's preprocessing (``student``: its run config) as a
   single-slice file would: the image exactly as the student's loader makes it, the label (mapped to
   the classes, nearest) and the teacher's values through the same spatial steps (linear).

Output: ``<output>/volumes/<id>.npz`` (compressed; per slice ``image`` float32 ``(C, H, W)``, ``prob``
float16 ``(K, H, W)``, ``confidence`` float16 ``(H, W)``, ``label`` uint8 ``(H, W)`` (255 where
ignored) when the volume is labelled, ``plane``, ``level``, ``spacing``) and ``dataset.json``: what
made them (model file and SHA-256, tau, levels, the student's preprocessing, class map) and every
volume with its slices, its attributes (the phantom's contrast ``phase``; NIfTI: ``data.attributes``)
and whether it was labelled.

**Processes and resume** (as ``bank build``): the volumes (sorted by id) are dealt to the processes
(``i % world``); each writes its volumes' files into ``<output>.partial/`` atomically. A killed run
started again with the same config skips the volumes written; another config is refused. At the end
``dataset.json`` is written and the folder renamed to ``output``: it appears whole or not at all.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from lightning_distill import __version__
from lightning_distill.config.load import config_key
from lightning_distill.config.run import load_config
from lightning_distill.data.build import make_preprocess
from lightning_distill.data.labels import LabelMapping
from lightning_distill.data.nifti import (DataError, IGNORE_INDEX, case_header, discover, read_case, reorient,
                                          reoriented_shape, slice_affine)
from lightning_distill.data.phantom import CLASS_NAMES, render_volume
from lightning_distill.data.preprocess import Preprocess
from lightning_distill.data.provenance import write_provenance
from lightning_distill.data.sources import DomainShift, affine_spacing, phantom_affine, phantom_spec
from lightning_distill.data.transfer import FORMAT, FORMAT_VERSION
from lightning_distill.io import atomic_write, listed, write_json
from lightning_distill.teacher_model import (ClassMap, inference_device, list_cases, load_model, model_logits,
                                             model_preprocess)


# ---------------------------------------------------------------------------------------- volumes
class _NiftiVolumes:
    """The volumes of a NIfTI folder (``data.*`` as in ``bank build``), labels mapped to the classes."""

    def __init__(self, cfg: DictConfig, classes: Sequence[str]):
        d = cfg.data
        cases, dataset_labels = list_cases(cfg)
        self.cases = {c.case_id: c for c in cases}
        self.ids = sorted(self.cases)
        self.mapping = LabelMapping.from_config(classes, dataset_labels, d)
        self.require_label = d.labels == "use"
        self.attributes = _read_attributes(d.attributes, self.ids) if d.attributes else {}
        self.describe = {"source": "nifti", "root": str(d.root), "cases": None if d.cases is None else list(d.cases)}

    def read(self, vid: str) -> Tuple[np.ndarray, Optional[np.ndarray], np.ndarray, Dict[str, Any]]:
        case = self.cases[vid]
        image, label, affine, _ = read_case(case, 3, self.mapping, require_foreground=False,
                                            require_label=self.require_label)
        return image, label, affine, dict(self.attributes.get(vid, {}))


def _read_attributes(path: str, ids: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """``{case: {attribute: value}}`` of a CSV with a ``case`` column."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data.attributes {str(p)!r} does not exist (a CSV with a `case` column)")
    with p.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or "case" not in rows[0]:
        raise DataError(f"{p}: needs a header row with a `case` column (and one column per attribute)")
    table = {r["case"]: {k: v for k, v in r.items() if k != "case"} for r in rows}
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataError(f"{p}: no row for volumes {listed(missing)}")
    return table


class _PhantomVolumes:
    """Volumes of a phantom population rendered on the fly (HU, or MR units), with the LAS affine and
    spacing of ``lightning-distill phantom``'s export; attribute ``phase``."""

    def __init__(self, cfg: DictConfig, classes: Sequence[str]):
        d, p = cfg.data, cfg.data.phantom
        if list(classes) != list(CLASS_NAMES):
            raise ValueError(f"classes {list(classes)} are not the phantom's {list(CLASS_NAMES)}")
        if not DomainShift(**p.shift).identity:
            raise ValueError("data.phantom.shift is a 2D domain shift of windowed images; teach renders raw volumes "
                             "(leave it at its identity default)")
        if len(d.shape) != 3:
            raise ValueError(f"data.shape must be a volume grid [X, Y, Z], got {list(d.shape)}")
        self.spec = phantom_spec(p)
        self.shape = tuple(int(n) for n in d.shape)
        self.ids = [f"phantom{p.seed}_{i:04d}" for i in range(int(d.num_subjects))]
        if d.cases is not None:
            unknown = [c for c in d.cases if c not in set(self.ids)]
            if unknown:
                raise ValueError(f"data.cases lists volumes that are not in the phantom population: {listed(unknown)}")
            self.ids = sorted(d.cases)
        self.labels = d.labels != "ignore"
        self.describe = {"source": "phantom", "phantom": OmegaConf.to_container(p), "num_subjects": int(d.num_subjects),
                         "shape": list(self.shape), "cases": None if d.cases is None else list(d.cases)}

    def read(self, vid: str):
        s = render_volume(self.spec, int(vid.rsplit("_", 1)[1]), self.shape)
        affine = phantom_affine(self.shape)  # LAS, as the export writes it
        label = s["label"].astype(np.int64) if self.labels else None
        return s["image"][None].astype(np.float32), label, affine, {"phase": s["phase"]}


# ---------------------------------------------------------------------------------------- levels
def check_level_range(rng: Sequence[float]) -> Tuple[float, float]:
    """``levels.range`` as ``(lo, hi)``, checked."""
    if rng is None or len(rng) != 2 or not 0.0 <= float(rng[0]) <= float(rng[1]) <= 1.0:
        raise ValueError(f"levels.range must be [lo, hi] with 0 <= lo <= hi <= 1 (fractions of the axial axis), got "
                         f"{None if rng is None else list(rng)}")
    return float(rng[0]), float(rng[1])


def match_levels(cfg: DictConfig, student_cfg: DictConfig) -> Dict[str, Any]:
    """What ``levels.mode=match`` matches: ``{"range": [lo, hi]}`` (a phantom student's ``slice_z``) or
    ``{"fractions": [...]}`` (the levels of a ``lightning-distill slices`` folder's slices)."""
    m = cfg.levels.match
    if m is None:
        if student_cfg.data.source != "phantom":
            raise ValueError("levels.mode=match without levels.match matches a phantom student's slice_z; this student "
                             "reads NIfTI: set levels.match to its single-slice folder (written by `lightning-distill slices`)")
        z0, z1 = (float(v) for v in student_cfg.data.phantom.slice_z)
        return {"range": [(z0 + 1) / 2, (z1 + 1) / 2], "from": "the student's data.phantom.slice_z"}
    meta_path = Path(m) / "dataset.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"levels.match {m!r}: no dataset.json (a single-slice folder written by `lightning-distill slices`)")
    meta = json.loads(meta_path.read_text())
    if "slices" not in meta or "source" not in meta:
        raise DataError(f"{meta_path}: does not record which slice of which volume each file is (write the folder with "
                        "`lightning-distill slices`)")

    src = discover(meta["source"], require_labels=False)
    by_id = {c.case_id: c for c in src.cases}
    fractions = []
    for cid, z in meta["slices"].items():
        if cid not in by_id:
            raise DataError(f"{meta_path}: its slice of {cid!r} comes from {meta['source']}, which has no such volume")
        shape, affine = case_header(by_id[cid], 3)
        depth = reoriented_shape(shape, affine, "RAS")[-1]  # `slices` counts in RAS from the first plane
        fractions.append(int(z) / max(depth - 1, 1))
    if not fractions:
        raise DataError(f"{meta_path}: lists no slice")
    return {"fractions": sorted(fractions), "from": str(m)}


def choose_planes(vid: str, depth: int, levels: DictConfig, matched: Optional[Dict[str, Any]]) -> List[int]:
    """The planes of volume ``vid`` (``depth`` axial planes) that become slices (sorted).

    Raises:
        ValueError: no plane of the volume lies in the range (names the range and the depth).
    """
    per = int(levels.per_volume)
    rng = np.random.default_rng([int(levels.seed), zlib.crc32(vid.encode())])
    last = max(depth - 1, 1)
    if matched is not None and "fractions" in matched:  # draw levels from the student's own, nearest plane each
        draws = rng.choice(np.asarray(matched["fractions"]), size=per, replace=True)
        return sorted({int(round(f * last)) for f in draws})
    lo, hi = matched["range"] if matched is not None else check_level_range(levels.range)
    planes = [z for z in range(depth) if lo - 1e-9 <= z / last <= hi + 1e-9]
    if not planes:
        raise ValueError(f"levels range [{lo:g}, {hi:g}] holds no plane of volume {vid!r} ({depth} axial planes): widen "
                         "levels.range")
    if len(planes) <= per:
        return planes
    return sorted(int(z) for z in rng.choice(planes, size=per, replace=False))


# ---------------------------------------------------------------------------------------- the run
def _student_config(cfg: DictConfig) -> DictConfig:
    if not cfg.student:
        raise ValueError("student is not set: give the student's run config (e.g. student=experiments/student.yaml); its "
                         "preprocessing, data.shape and classes make the slices")
    s = load_config(cfg.student)
    if len(s.data.shape) != 2:
        raise ValueError(f"student {cfg.student}: data.shape {list(s.data.shape)} is not a 2D student's")
    return s


class _Teach:
    """One process's part of a ``teach`` run."""

    def __init__(self, cfg: DictConfig, rank: int = 0, world: int = 1):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.student = _student_config(cfg)
        student_classes = list(self.student.classes) if self.student.classes else list(CLASS_NAMES)
        self.classes = list(cfg.classes) if cfg.classes else student_classes
        if self.classes != student_classes:
            raise ValueError(f"classes {self.classes} differ from the student's {student_classes} ({cfg.student})")
        self.spre = make_preprocess(self.student)  # the student's preprocessing of one slice (Z = 1)
        self.tau = float(cfg.tau)
        if self.tau <= 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        if cfg.levels.per_volume < 1:
            raise ValueError(f"levels.per_volume must be at least 1, got {cfg.levels.per_volume}")
        self.matched = match_levels(cfg, self.student) if cfg.levels.mode == "match" else None
        if self.matched is None:
            check_level_range(cfg.levels.range)
        self.model = None
        if cfg.model.format != "none":
            self.model = load_model(cfg.model, dims=(2, 3))
            self.map = ClassMap(self.model.labels, self.classes, dict(cfg.class_map), cfg.unmapped)
            self.mpre = model_preprocess(cfg, self.model)
            self.roi = list(cfg.inference.roi_size) if cfg.inference.roi_size else self.model.roi_size
            self.device = inference_device(cfg.inference.device, int(os.environ.get("LOCAL_RANK", rank)))
            self.net = self.model.net.to(self.device)
            if self.model.spatial_dims == 2 and list(self.model.preprocess.shape or [])[:2] != list(self.student.data.shape):
                raise ValueError(f"{cfg.model.path}: a 2D model of data.shape {list(self.model.preprocess.shape)[:2]}; it "
                                 f"labels the student's slices, whose data.shape is {list(self.student.data.shape)}")
        self.volumes = (_PhantomVolumes(cfg, self.classes) if cfg.data.source == "phantom"
                        else _NiftiVolumes(cfg, self.classes))
        self.key = config_key(cfg, ignore=("processes", "overwrite"))  # what determines the slices

    # --------------------------------------------------------------- files
    @property
    def partial(self) -> Path:
        return Path(str(self.cfg.output) + ".partial")

    def volume_path(self, vid: str) -> Path:
        return self.partial / "volumes" / f"{vid}.npz"

    def start(self) -> None:
        """Create (or check) the partial folder: a run of another config is refused."""
        key_file = self.partial / "key.json"
        written = any(not p.name.startswith(".") for p in (self.partial / "volumes").glob("*.npz"))
        if key_file.is_file() and written:  # (a run that failed before its first volume holds nothing to keep)
            if json.loads(key_file.read_text()).get("key") != self.key:
                raise ValueError(f"{self.partial}: was written by a teach run with another config (model, data, levels, "
                                 "tau or student differ); delete it to start over, or set output to another path")
            return
        (self.partial / "volumes").mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            write_json(key_file, {"key": self.key})

    # --------------------------------------------------------------- one volume
    def _values_3d(self, image: np.ndarray, affine: np.ndarray, where: str) -> torch.Tensor:
        """``(K + 1, X, Y, Z)`` probabilities at tau and confidence, on the volume's own grid."""
        img, _, chain = self.mpre(image, affine)
        logits = model_logits(self.net, img.as_tensor()[None].to(self.device), self.roi, self.cfg.inference, where)
        values = self._values(logits)[0].cpu()
        return Preprocess.invert(values, img, chain)

    def _values(self, logits: torch.Tensor) -> torch.Tensor:
        mapped, renorm = self.map.probabilities(logits, 1.0)
        if self.tau != 1.0:
            renorm = self.map.probabilities(logits, self.tau)[1]
        return torch.cat([renorm, mapped.max(dim=1, keepdim=True).values], dim=1)

    def _values_2d(self, plane: np.ndarray, affine: np.ndarray, where: str) -> torch.Tensor:
        """A 2D model's values ``(K + 1, X, Y, 1)`` of one plane ``(C, X, Y, 1)``, on the plane's grid."""
        img, _, chain = self.mpre(plane, affine)
        logits = model_logits(self.net, img.as_tensor()[None, ..., 0].to(self.device), None, self.cfg.inference, where)
        values = self._values(logits)[0].cpu()[..., None]
        return Preprocess.invert(values, img, chain)

    def volume(self, vid: str) -> Dict[str, np.ndarray]:
        """The slices of one volume (the arrays of its ``.npz``)."""
        image, label, affine, attrs = self.volumes.read(vid)
        where = f"volume {vid}"
        if self.model is not None and self.model.in_channels is not None and image.shape[0] != self.model.in_channels:
            raise DataError(f"{where}: {image.shape[0]} image channel(s); the model takes {self.model.in_channels}")
        values = None
        if self.model is not None and self.model.spatial_dims == 3:
            values = self._values_3d(image, affine, where).numpy()
        orient = self.spre.orientation
        s_img, s_aff, _ = reorient(image, affine, orient)
        s_lbl = reorient(label[None], affine, orient)[0][0] if label is not None else None
        s_val = reorient(values, affine, orient)[0] if values is not None else None
        planes = choose_planes(vid, s_img.shape[-1], self.cfg.levels, self.matched)
        out: Dict[str, List[np.ndarray]] = {k: [] for k in ("image", "prob", "confidence", "label", "spacing")}
        for z in planes:
            aff_z = slice_affine(s_aff, z)
            plane = s_img[..., z:z + 1]
            val_z = s_val[..., z:z + 1] if s_val is not None else None
            if self.model is not None and self.model.spatial_dims == 2:
                val_z = self._values_2d(plane, aff_z, f"{where} plane {z}").numpy()
            img, lbl, _, val = self.spre.with_values(plane, aff_z, None if s_lbl is None else s_lbl[..., z:z + 1], val_z)
            out["image"].append(img.as_tensor()[..., 0].numpy().astype(np.float32))
            out["spacing"].append(affine_spacing(img.affine)[:2])
            if lbl is not None:
                out["label"].append(lbl.as_tensor()[0, ..., 0].numpy().astype(np.uint8))
            if val is not None:
                v = val[..., 0]
                prob = v[:-1] / v[:-1].sum(0, keepdim=True).clamp_min(1e-12)  # interpolation keeps sums only to rounding
                out["prob"].append(prob.numpy().astype(np.float16))
                out["confidence"].append(v[-1].clamp(0, 1).numpy().astype(np.float16))
        arrays = {k: np.stack(v) for k, v in out.items() if v}
        arrays["plane"] = np.asarray(planes, np.int64)
        arrays["level"] = np.asarray([z / max(s_img.shape[-1] - 1, 1) for z in planes], np.float64)
        arrays["depth"] = np.asarray(s_img.shape[-1], np.int64)
        arrays["attributes"] = np.asarray(json.dumps(attrs, sort_keys=True))
        return arrays

    # --------------------------------------------------------------- all
    def mine(self) -> List[str]:
        return [v for i, v in enumerate(self.volumes.ids) if i % self.world == self.rank]

    def run(self, stop_after: Optional[int] = None) -> bool:
        """Write this process's volumes; ``False`` when stopped after ``stop_after`` volumes (tests: what a
        kill after the last write leaves)."""
        self.start()
        mine = self.mine()
        todo = [v for v in mine if not self.volume_path(v).is_file()]
        if len(todo) < len(mine):
            print(f"[teach] rank {self.rank}: resuming: {len(mine) - len(todo)} of {len(mine)} volumes done", flush=True)
        for n, vid in enumerate(todo):
            if stop_after is not None and n >= stop_after:
                return False
            arrays = self.volume(vid)
            atomic_write(self.volume_path(vid), lambda tmp, a=arrays: _savez(tmp, a))
        return True

    def finish(self, seconds: float) -> Dict[str, Any]:
        """Rank 0, every process done: ``dataset.json``, then the folder moved into place."""
        meta = self.metadata(seconds)
        for tmp in (self.partial / "volumes").glob(".*"):  # a killed run's unfinished write (every process is done now)
            tmp.unlink(missing_ok=True)
        write_json(self.partial / "dataset.json", meta)
        d = self.volumes.describe
        if d["source"] == "phantom":
            write_provenance(self.partial, "lightning-distill teach", {v: v for v in meta["volumes"]}, phantom=True)
        else:
            write_provenance(self.partial, "lightning-distill teach", {v: v for v in meta["volumes"]}, root=d["root"])
        out = Path(self.cfg.output)
        (self.partial / "key.json").unlink(missing_ok=True)
        if out.exists():
            if not self.cfg.overwrite:
                raise FileExistsError(f"{out} exists; set overwrite=true to replace it")
            old = Path(str(out) + ".old")
            os.replace(out, old)
            os.replace(self.partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.partial, out)
        return meta

    def metadata(self, seconds: float) -> Dict[str, Any]:
        vols: Dict[str, Any] = {}
        truth = np.zeros(len(self.classes), np.int64)
        taught = np.zeros(len(self.classes), np.int64)
        slices = 0
        for vid in self.volumes.ids:
            with np.load(self.volume_path(vid)) as a:
                n = int(a["plane"].shape[0])
                slices += n
                vols[vid] = {"slices": n, "planes": a["plane"].tolist(), "depth": int(a["depth"]),
                             "labelled": "label" in a.files, "attributes": json.loads(str(a["attributes"]))}
                if "label" in a.files:
                    lbl = a["label"]
                    truth += np.bincount(lbl[lbl != IGNORE_INDEX].ravel(), minlength=len(self.classes))[:len(self.classes)]
                if "prob" in a.files:
                    taught += np.bincount(a["prob"].argmax(1).ravel(), minlength=len(self.classes))
        m = self.model
        labelled_by = "none" if m is None else f"{m.spatial_dims}D model"
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "package_version": __version__,
            "classes": list(self.classes), "labelled_by": labelled_by, "tau": self.tau if m is not None else None,
            "model": None if m is None else m.source, "model_labels": None if m is None else list(m.labels),
            "class_map": None if m is None else self.map.how,
            "model_preprocess": None if m is None else preprocess_record(self.mpre),
            "student": {"config": str(self.cfg.student), "data.shape": list(self.student.data.shape),
                        "preprocess": preprocess_record(self.spre)},
            "levels": {**OmegaConf.to_container(self.cfg.levels), **({"matched": self.matched} if self.matched else {})},
            "data": self.volumes.describe, "num_volumes": len(vols), "num_slices": slices,
            "truth_pixels": dict(zip(self.classes, truth.tolist())) if truth.any() else None,
            "teacher_argmax_pixels": dict(zip(self.classes, taught.tolist())) if m is not None else None,
            "processes": self.world, "seconds": round(seconds, 3), "volumes": vols,
            "config": OmegaConf.to_container(self.cfg),
        }


def preprocess_record(pre: Preprocess) -> Dict[str, Any]:
    """A preprocessing's settings as plain values (``dataset.json``; a benchmark's slices record)."""
    return {"orientation": pre.orientation, "spacing": None if pre.spacing is None else list(pre.spacing),
            "shape": None if pre.shape is None else list(pre.shape), "resize": pre.resize,
            "crop_foreground": pre.crop_foreground, **pre.intensity_settings()}


def _savez(path: str, arrays: Dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:
        np.savez_compressed(f, **arrays)


def teach(cfg: DictConfig, rank: int = 0, world: int = 1, stop_after: Optional[int] = None) -> Optional[Dict[str, Any]]:
    """This process's part of the ``teach`` run of ``cfg`` (see the module docstring). With ``world == 1``
    the whole run: returns the written ``dataset.json`` (``None`` when stopped by ``stop_after``).

    Raises:
        FileExistsError: ``output`` exists and ``overwrite`` is false (before any work).
        ValueError: a config that cannot make slices (names the key), a partial folder of another config.
        DataError: a volume that cannot be read (names the file).
    """
    out = Path(cfg.output)
    if rank == 0 and out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; set overwrite=true to replace it")
    t0 = time.perf_counter()
    run = _Teach(cfg, rank, world)
    if not run.run(stop_after):
        return None
    if world > 1:
        return None  # the launcher finishes once every process is done
    return run.finish(time.perf_counter() - t0)


def _worker(rank: int, world: int, cfg_dict: Dict[str, Any], threads: int) -> None:
    torch.set_num_threads(threads)
    teach(OmegaConf.create(cfg_dict), rank, world)


def run_teach(cfg: DictConfig) -> Dict[str, Any]:
    """Run ``teach`` in this process, in ``processes`` local processes, or as one process of ``torchrun``'s
    world (rank 0 finishes after a barrier); returns the ``dataset.json`` written (other ranks: ``{}``)."""
    out = Path(cfg.output)
    t0 = time.perf_counter()
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1:

        if not dist.is_initialized():
            dist.init_process_group("gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if rank == 0 and out.exists() and not cfg.overwrite:
            raise FileExistsError(f"{out} exists; set overwrite=true to replace it")
        run = _Teach(cfg, rank, world)
        run.run()
        dist.barrier()
        meta = run.finish(time.perf_counter() - t0) if rank == 0 else {}
        dist.barrier()
        return meta
    n = int(cfg.processes)
    if n < 1:
        raise ValueError(f"processes must be at least 1, got {n}")
    if n == 1:
        return teach(cfg)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; set overwrite=true to replace it")
    run = _Teach(cfg, 0, n)  # checks the config before any process starts
    run.start()

    threads = max(1, torch.get_num_threads() // n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_worker, args=(n, OmegaConf.to_container(cfg), threads), nprocs=n, join=True)
    return run.finish(time.perf_counter() - t0)


def describe(meta: Dict[str, Any]) -> str:
    """A few lines about a written folder (printed by the CLI)."""
    m = meta["model"]
    by = ("ground truth only (no model)" if m is None else
          f"{meta['labelled_by']} {m['format']} {m['path']} (sha256 {str(m['sha256'])[:12]}...), tau {meta['tau']:g}")
    labelled = sum(1 for v in meta["volumes"].values() if v["labelled"])
    return (f"{meta['num_slices']} slices of {meta['num_volumes']} volumes ({labelled} labelled) labelled by {by}\n"
            f"levels: {meta['levels']['mode']} {meta['levels'].get('matched', {}).get('from', meta['levels']['range'])}, "
            f"{meta['levels']['per_volume']} per volume; {meta['seconds']:.1f} s")
