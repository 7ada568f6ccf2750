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
from lightning_distill.fingerprint import check_samples, data_identity
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


def training_subjects_in(record: Mapping[str, Any], cfg: DictConfig, subjects: Sequence[str]) -> Optional[int]:
    """How many of ``subjects`` (of ``cfg``'s data) a checkpoint was trained on, from its
    ``checkpoint["lightning_distill"]`` ``record``: 0 when ``cfg`` reads other data than the
    training's (:func:`~lightning_distill.fingerprint.data_identity`), ``None`` (unknown) when the
    checkpoint has no record of its training subjects (written by an older version)."""
    if "train_subjects" not in record:
        return None
    if record.get("data") != data_identity(cfg):
        return 0
    return len(set(subjects) & set(record["train_subjects"]))


def describe_test_set(num_samples: Optional[int], num_subjects: int, overlap: Optional[int], all_subjects: bool) -> str:
    """The tested samples in words, e.g. ``"128 samples of every subject (12 of the 16 subjects are
    training subjects of this checkpoint)"``, or ``"40 held-out samples"`` (``overlap``: see
    :func:`training_subjects_in`)."""
    if not all_subjects and not overlap:
        return f"{num_samples} held-out samples"
    what = f"{num_samples} samples of every subject" if all_subjects else f"{num_samples} test samples"
    if overlap is None:
        return f"{what}; unknown how many are of training subjects (the checkpoint does not record them)"
    if overlap == 0:
        return f"{what}, none of a training subject of this checkpoint"
    return f"{what} ({overlap} of the {num_subjects} subjects are training subjects of this checkpoint)"


def write_results(trainer, module, cfg: DictConfig, path: Path, extra: Dict[str, Any], t0: float, note: str,
                   overlap: Optional[int], num_subjects: int = 0, all_subjects: bool = False) -> Dict[str, Any]:
    """Write ``results.json`` and print the test table; ``overlap``, ``num_subjects`` and
    ``all_subjects`` describe the tested subjects (:func:`describe_test_set`)."""
    summary = dict(module.test_summary or {})
    cases = summary.pop("cases", [])
    test_set = describe_test_set(summary.get("num_cases"), num_subjects, overlap, all_subjects)
    results = {"stage": cfg.stage, "test": summary, "test_set": test_set, "training_subjects_in_test": overlap, **extra,
               "test_cases": cases, "wall_time_s": round(time.time() - t0, 1), "version": __version__}
    if trainer.is_global_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, results)
        print(format_table(summary, f"\n{cfg.stage} test Dice / HD95 ({test_set}, {note}) -> {path}"))
    return results


def check_test_intensities(fp: Optional[Mapping[str, Any]], dm: SegmentationDataModule) -> None:
    """Warn when test samples' intensities are unlike the training data's (``fp``: the checkpoint's
    fingerprint; ``None``: an older checkpoint, nothing is checked)."""
    if fp is None:
        return
    dm.setup()
    test_set = dm.datasets["test"]
    check_samples(fp, {i: test_set._load(i)["image"].numpy() for i in test_set.ids}, raw_profiles(dm.source, test_set.ids))
