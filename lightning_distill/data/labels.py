"""A dataset's label ids mapped to an experiment's classes (:class:`LabelMapping`): one rule for every
layout, with the counts of what it mapped and the check that every map entry and class was seen."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

from lightning_distill.config.load import ON_MISSING, UNMAPPED
from lightning_distill.data.nifti import DataError, IGNORE_INDEX
from lightning_distill.io import listed


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
                raise DataError(f"{path}: label values {listed(bad)} are not in the dataset's label map {dict(self.dataset_labels)}")
        if self.unmapped == "error":
            bad = [int(v) for v in values if int(v) not in self.lut]
            if bad:
                raise DataError(f"{path}: label values {listed(bad)} have no mapping to the experiment's classes "
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

            warnings.warn(msg, stacklevel=3)
        return problems
