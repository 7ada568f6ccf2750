"""``lightning-distill check-data``: every case of a NIfTI dataset read and checked up front, in parallel.

What a run with ``data.nifti.open=eager`` does before its first batch, for datasets too large to do
it at every start (``open=lazy``): each case is read, checked (:func:`~lightning_distill.data.nifti.read_case`:
files readable and complete, channels and label on one grid, no NaN, label values mapped, a
foreground) and preprocessed as the config says, in ``jobs`` worker processes. The report lists every
bad case with the file and the problem, the good cases (ready for ``data.nifti.cases``), the resolved
label map with the voxels of every class, and the label-map entries or classes found in no file.
Written atomically as ``data_check.json`` and ``data_check.md``; nothing in the dataset is touched.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from lightning_distill.data.build import make_preprocess
from lightning_distill.data.labels import LabelMapping
from lightning_distill.data.nifti import DataError, discover, read_case
from lightning_distill.io import write_json, write_text

_CTX: Dict[str, Any] = {}


def _mapping(cfg: DictConfig, labels: Dict[int, str]) -> LabelMapping:
    return LabelMapping.from_config(cfg.classes, labels, cfg.data.nifti, on_missing="warn")


def _init(cfg_dict: Dict[str, Any], labels: Dict[int, str]) -> None:
    torch.set_num_threads(1)
    cfg = OmegaConf.create(cfg_dict)
    _CTX.update(cfg=cfg, labels=labels, pre=make_preprocess(cfg), dims=len(cfg.data.shape))


def _check(case) -> Dict[str, Any]:
    """One case: ``{"case", "ok", "error"?, "shape", "spacing", "label_ids", "label_counts", "raw_p1_p50_p99"}``."""
    cfg = _CTX["cfg"]
    mapping = _mapping(cfg, _CTX["labels"])  # per case: its own label counts
    rec: Dict[str, Any] = {"case": case.case_id, "files": [str(p) for p in case.images] + ([str(case.label)] if case.label else [])}
    try:
        image, label, affine, _ = read_case(case, 3, mapping, cfg.data.nifti.require_foreground)
        if _CTX["dims"] == 2 and cfg.data.nifti.slice_mode == "file" and image.shape[-1] != 1:
            raise DataError(f"{case.images[0]}: a single-slice sample must be 2D (or 3D with one slice), got shape "
                            f"{image.shape[1:]}; use data.nifti.slice_mode=all to take every axial slice of volumes")
        if not (_CTX["dims"] == 2 and cfg.data.nifti.slice_mode == "all"):
            _CTX["pre"](image, affine, label)  # the preprocessing must run too
        rec.update(ok=True, shape=list(image.shape[1:]), spacing=[float(v) for v in np.linalg.norm(affine[:3, :3], axis=0)],
                   raw_p1_p50_p99=[float(v) for v in np.percentile(image, [1, 50, 99])])
    except DataError as e:
        rec.update(ok=False, error=str(e))
    except Exception as e:  # noqa: BLE001 - preprocessing failures are reported per case too
        rec.update(ok=False, error=f"{case.images[0]}: preprocessing failed ({type(e).__name__}: {e})")
    rec["label_ids"], rec["label_counts"] = [int(v) for v in mapping.voxels], [int(n) for n in mapping.voxels.values()]
    return rec


def check_data(cfg: DictConfig, out: str | Path, jobs: int = 1, root: Optional[str] = None) -> Dict[str, Any]:
    """Check every case of ``cfg.data.nifti`` (``root`` replaces its folder) and write the report to ``out``.

    Returns:
        The report: ``{"root", "cases", "good", "bad": {case: problem}, "good_cases", "class_voxels",
        "coverage_problems", "seconds", "jobs"}``.
    """

    n = cfg.data.nifti
    if cfg.data.source != "nifti":
        raise ValueError("check-data checks NIfTI data: set data.source=nifti and data.nifti.root")
    root = root or n.root
    if not root:
        raise ValueError("data.nifti.root is not set: give the dataset folder")
    if not cfg.classes:
        raise ValueError("check-data needs `classes` (the experiment's class names, background first) to map the labels")
    cfg = cfg.copy()
    cfg.data.nifti.root = str(root)
    index = discover(root, n.layout, n.image_pattern, n.label_pattern, require_labels=False)
    cases = index.cases
    if n.cases:
        keep = set(n.cases)
        cases = [c for c in cases if c.case_id in keep]
    t0 = time.time()
    args = (OmegaConf.to_container(cfg), dict(index.labels))
    if jobs <= 1:
        _init(*args)
        records = [_check(c) for c in cases]
    else:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=_init, initargs=args) as pool:
            records = list(pool.map(_check, cases, chunksize=max(1, len(cases) // (4 * jobs))))
    total = _mapping(cfg, dict(index.labels))
    for r in records:
        if r["ok"]:
            total.add_counts(r["label_ids"], r["label_counts"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        problems = total.check_coverage()
    bad = {r["case"]: r["error"] for r in records if not r["ok"]}
    report = {"root": str(root), "layout": index.layout, "cases": len(records), "good": len(records) - len(bad),
              "bad": bad, "good_cases": [r["case"] for r in records if r["ok"]], "class_voxels": total.class_voxels(),
              "coverage_problems": problems, "seconds": round(time.time() - t0, 1), "jobs": jobs, "records": records}
    out = Path(out)
    write_json(out / "data_check.json", report)
    write_text(out / "data_check.md", render(report, total.summary()))
    return report


def render(report: Dict[str, Any], summary: str) -> str:
    lines = [f"# Data check of {report['root']}", "",
             f"{report['cases']} cases ({report['layout']} layout), {report['good']} good, {len(report['bad'])} bad; "
             f"{report['seconds']} s with {report['jobs']} process(es). Written by `lightning-distill check-data`.", ""]
    if report["bad"]:
        lines += ["## Bad cases", "", "| case | problem |", "|---|---|"]
        lines += [f"| {c} | {e.replace('|', '/')} |" for c, e in report["bad"].items()]
        lines += ["", "Leave them out with `data.nifti.cases` (the good ones are listed in data_check.json, `good_cases`).", ""]
    lines += ["## Label map (good cases)", "", "```", summary, "```", ""]
    if report["coverage_problems"]:
        lines += ["## Coverage", ""] + [f"- {p}" for p in report["coverage_problems"]] + [""]
    return "\n".join(lines)


def bad_lines(report: Dict[str, Any], limit: int = 20) -> List[str]:
    return [f"  {c}: {e}" for c, e in list(report["bad"].items())[:limit]] + (
        [f"  ... and {len(report['bad']) - limit} more"] if len(report["bad"]) > limit else [])
