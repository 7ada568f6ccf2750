"""What a run's test says and where it goes: ``results.json``, the test table, which tested subjects
the checkpoint trained on, and the warnings about the test (no best checkpoint, unlike intensities)."""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

from omegaconf import DictConfig

from lightning_distill import __version__
from lightning_distill.data.build import raw_profiles
from lightning_distill.data.datamodules import SegmentationDataModule
from lightning_distill.data.provenance import SubjectOverlap, compare_subjects, subject_of
from lightning_distill.data.sources import SubjectSource
from lightning_distill.fingerprint import check_samples, ct_window_of, data_identity
from lightning_distill.io import write_json
from lightning_distill.metrics import format_table


def warn_no_best(out: Path, dm: SegmentationDataModule, targs: Dict[str, Any], last: Optional[str]) -> None:
    """Why ``best.ckpt`` (chosen by ``val/dice``) was not written, when training ended without one."""
    best = out / "checkpoints" / "best.ckpt"
    if not dm.splits["val"]:
        why = ("there is no validation split (data.val_subjects=0, or data.splits without val subjects), so nothing "
               f"chooses a best checkpoint and {best} was not written")
    else:
        why = (f"no validation ran during training (trainer.max_steps={targs.get('max_steps')} ends before the first "
               f"validation epoch), so {best} was not written")
    warnings.warn(f"{why}: testing the last weights ({last or 'not saved'})", stacklevel=3)


def training_subjects_in(record: Mapping[str, Any], cfg: DictConfig, source: SubjectSource,
                         subjects: Sequence[str]) -> SubjectOverlap:
    """How many of ``subjects`` (of ``source``, read with ``cfg``) a checkpoint was trained on, from its
    ``checkpoint["lightning_distill"]`` ``record``.

    Subjects are compared by identity, through the records of the datasets derived from one another
    (:mod:`lightning_distill.data.provenance`): slices of a training volume are that volume's subject. A count
    is given only where it is certain; tested subjects of a dataset no record links to the training data are
    unknown, never none. A checkpoint of an older version records its training subject ids only: they count
    when ``cfg`` reads the training's own data, else the overlap is unknown."""
    if "train_identities" in record:
        return compare_subjects({source.subject_identity(s) for s in subjects}, record["train_identities"])
    if "train_subjects" not in record:
        return SubjectOverlap(None, "unknown how many are of training subjects (the checkpoint does not record them)")
    if record.get("data") != data_identity(cfg):
        return SubjectOverlap(None, "unknown how many are of training subjects (the test data is not the training data, "
                                    "and the checkpoint, written by an older version, records subject ids only)")
    n = len(set(subjects) & set(record["train_subjects"]))
    return SubjectOverlap(n, f"{n} of the {len(subjects)} subjects are training subjects of this checkpoint"
                          if n else "none of a training subject of this checkpoint")


def describe_test_set(num_samples: Optional[int], overlap: SubjectOverlap, all_subjects: bool) -> str:
    """The tested samples in words, e.g. ``"128 samples of every subject (12 of the 16 subjects are
    training subjects of this checkpoint)"``, or ``"40 held-out samples"`` (only when no tested subject is a
    training subject for certain; ``overlap``: :func:`training_subjects_in`)."""
    if overlap.count == 0 and not all_subjects:
        return f"{num_samples} held-out samples"
    what = f"{num_samples} samples of every subject" if all_subjects else f"{num_samples} test samples"
    if overlap.count == 0:  # every subject: "none of a training subject ..."
        return f"{what}, {overlap.why}"
    if overlap.count:
        return f"{what} ({overlap.why})"
    return f"{what}; {overlap.why}"  # unknown


def write_results(trainer, module, cfg: DictConfig, path: Path, extra: Dict[str, Any], t0: float, note: str,
                   overlap: SubjectOverlap, all_subjects: bool = False) -> Dict[str, Any]:
    """Write ``results.json`` and print the test table; ``overlap`` and ``all_subjects`` describe the tested
    subjects (:func:`describe_test_set`; ``training_subjects_in_test`` is ``null`` when unknown)."""
    summary = dict(module.test_summary or {})
    cases = summary.pop("cases", [])
    test_set = describe_test_set(summary.get("num_cases"), overlap, all_subjects)
    results = {"stage": cfg.stage, "test": summary, "test_set": test_set, "training_subjects_in_test": overlap.count, **extra,
               "test_cases": cases, "wall_time_s": round(time.time() - t0, 1), "version": __version__}
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        print(format_table(summary, f"\n{cfg.stage} test Dice / HD95 ({test_set}, {note}) -> {path}"))
    return results


def check_test_intensities(fp: Optional[Mapping[str, Any]], dm: SegmentationDataModule, cfg: DictConfig) -> None:
    """Warn when test subjects' intensities are unlike the training data's (``fp``: the checkpoint's
    fingerprint; ``None``: an older checkpoint, nothing is checked; ``cfg``: the test's config, whose CT window
    the advice starts from)."""
    if fp is None:
        return
    dm.setup()
    test_set = dm.datasets["test"]
    check_samples(fp, {i: test_set._load(i)["image"].numpy() for i in test_set.ids}, raw_profiles(dm.source, test_set.ids),
                  subject_of=subject_of, window=ct_window_of(cfg))
