"""Which subject a sample is, across the datasets derived from one another.

A test that calls its subjects held out has to know which subjects the checkpoint trained on, also when
the two read different folders: a student trained on ``lightning-distill slices`` of some volumes and
tested on those volumes saw some of its test subjects. So every dataset the package writes from another
one (``slices``, ``teach``, ``phantom``) records, in ``provenance.json`` beside its files, the dataset it
came from and which case there each of its cases is; :func:`subject_identity` follows those records back
to the first dataset and names a subject there:

* ``phantom:<subject id>`` for a phantom subject (the generator is deterministic: the id is the subject);
* ``data:<absolute folder>::<case id>`` for a case of a dataset (NIfTI, or a ``teach`` folder) no record
  leads further back from.

Two samples are of the same subject when their identities are equal. Two identities of different
folders say nothing about each other (the same scans may have been copied): :func:`compare_subjects`
reports that as unknown, never as none.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Mapping, Optional

from lightning_distill.io import write_json

PROVENANCE_FILE = "provenance.json"
FORMAT = 1
PHANTOM = "phantom"


def subject_of(sample_id: str) -> str:
    """The subject of a sample id (``"<subject>@<z>"`` for one slice of a volume)."""
    return sample_id.split("@", 1)[0]


def phantom_identity(subject: str) -> str:
    """The identity of a phantom subject (``phantom<seed>_<index>``)."""
    return f"{PHANTOM}:{subject}"


def write_provenance(dst: str | Path, written_by: str, cases: Mapping[str, str], root: Optional[str | Path] = None,
                     phantom: bool = False) -> None:
    """Record where the cases of the dataset in ``dst`` came from.

    Args:
        dst: the derived dataset's folder (``provenance.json`` is written in it).
        written_by: the command that wrote it (e.g. ``"lightning-distill slices"``).
        cases: ``{case id in dst: case id in the source}``.
        root: the source NIfTI dataset's folder (stored absolute).
        phantom: the source is the phantom (``cases`` map to phantom subject ids).
    """
    if (root is None) == (not phantom):
        raise ValueError("give the source folder (root) or phantom=True, not both")
    origin: Dict[str, Any] = {PHANTOM: True} if phantom else {"root": str(Path(root).expanduser().resolve())}
    write_json(Path(dst) / PROVENANCE_FILE, {"format": FORMAT, "written_by": written_by, "from": origin,
                                             "cases": {str(k): str(v) for k, v in cases.items()}})


@dataclass(frozen=True)
class Link:
    """One dataset's record of its source: ``root`` (a NIfTI folder) or ``phantom``, and its cases' ids there."""

    root: Optional[Path]
    phantom: bool
    cases: Mapping[str, str]


def read_link(root: str | Path) -> Optional[Link]:
    """The record of where the dataset in ``root`` came from, or ``None`` (a dataset of its own); read once per
    version of the files (:func:`_read_link`)."""
    root = Path(root)
    stamp = tuple(p.stat().st_mtime_ns if p.is_file() else None for p in (root / PROVENANCE_FILE, root / "dataset.json"))
    return _cached_link(str(root), stamp)


@functools.lru_cache(maxsize=64)
def _cached_link(root: str, stamp) -> Optional[Link]:
    return _read_link(Path(root))


def _read_link(root: Path) -> Optional[Link]:
    """The record of where the dataset in ``root`` came from, or ``None`` (a dataset of its own).

    Reads ``provenance.json``; a ``slices`` or ``teach`` folder written before it existed links through its
    ``dataset.json`` (``source`` and ``slices``; ``data`` and ``volumes``) where that names an absolute folder.

    Raises:
        ValueError: a ``provenance.json`` that is not JSON or not of this format (naming the file).
    """
    path = root / PROVENANCE_FILE
    if path.is_file():
        try:
            rec = json.loads(path.read_text())
            origin, cases = rec["from"], rec["cases"]
            if rec.get("format") != FORMAT or not isinstance(cases, dict):
                raise KeyError("format")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a provenance record of this package (format {FORMAT}): {e}") from None
        return Link(None if origin.get(PHANTOM) else Path(origin["root"]), bool(origin.get(PHANTOM)), dict(cases))
    meta_path = root / "dataset.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None  # not ours to judge here: the dataset reader reports a broken dataset.json
    # records written before provenance.json: followed only where they name an absolute folder (a relative one was
    # relative to a working directory nobody recorded, so following it could name the wrong subjects)
    src, data = meta.get("source"), meta.get("data")
    if isinstance(src, str) and isinstance(meta.get("slices"), dict) and Path(src).is_absolute():  # `slices`
        return Link(Path(src), False, {c: c for c in meta["slices"]})
    if isinstance(data, dict) and isinstance(meta.get("volumes"), dict):  # `teach`: its volumes by source id
        if data.get("source") == "phantom":
            return Link(None, True, {v: v for v in meta["volumes"]})
        if data.get("source") == "nifti" and data.get("root") and Path(data["root"]).is_absolute():
            return Link(Path(data["root"]), False, {v: v for v in meta["volumes"]})
    return None


def subject_identity(root: str | Path, case: str) -> str:
    """The identity of case ``case`` of the dataset in ``root`` (a NIfTI folder or a ``teach`` folder), through every
    record back to the first dataset (module docstring). A case its dataset's record does not list is that
    dataset's own."""
    root, seen = Path(root).expanduser().resolve(), set()
    while True:
        if root in seen:
            raise ValueError(f"{root / PROVENANCE_FILE}: the records of where the data came from form a loop")
        seen.add(root)
        link = read_link(root)
        if link is None or case not in link.cases:
            return f"data:{root}::{case}"
        case = link.cases[case]
        if link.phantom:
            return phantom_identity(case)
        root = link.root.expanduser().resolve()


def dataset_of(identity: str) -> str:
    """The first dataset an identity belongs to: ``phantom`` or ``data:<folder>``."""
    return PHANTOM if identity.startswith(f"{PHANTOM}:") else identity.rsplit("::", 1)[0]


def case_of(identity: str) -> str:
    """The case id within :func:`dataset_of`."""
    return identity.split(":", 1)[1] if identity.startswith(f"{PHANTOM}:") else identity.rsplit("::", 1)[1]


@dataclass(frozen=True)
class SubjectOverlap:
    """How many tested subjects a checkpoint trained on: ``count`` (``None``: unknown) and ``why`` in words."""

    count: Optional[int]
    why: str


def compare_subjects(tested: Iterable[str], trained: Iterable[str]) -> SubjectOverlap:
    """Tested against training subject identities (:func:`subject_identity`).

    The count is exact when the tested subjects come from the datasets the training subjects came from
    (a subject there is either one of them or not). Tested subjects of another dataset, which no record
    links to the training data, are unknown: they may be copies of training scans. Their case ids are
    compared with the training cases' anyway, and equal ids are named as a warning sign.
    """
    tested, trained = set(tested), set(trained)
    known = {dataset_of(i) for i in trained}
    common = len(tested & trained)
    foreign = sorted(i for i in tested if dataset_of(i) not in known)
    if not foreign:
        return SubjectOverlap(common, f"{common} of the {len(tested)} subjects are training subjects of this checkpoint"
                              if common else "none of a training subject of this checkpoint")
    same_ids = sorted({case_of(i) for i in foreign} & {case_of(i) for i in trained})
    where = ", ".join(sorted({dataset_of(i) for i in foreign}))
    what = (f"unknown how many are of training subjects: {len(foreign)} of the {len(tested)} tested subjects are of "
            f"{where}, which no record links to the training data ({', '.join(sorted(known))})")
    if same_ids:
        shown = ", ".join(same_ids[:10]) + (f" and {len(same_ids) - 10} more" if len(same_ids) > 10 else "")
        what += f"; {len(same_ids)} of their case ids are training case ids ({shown})"
    if common:
        what += f"; {common} tested subjects are training subjects for certain"
    return SubjectOverlap(None, what)
