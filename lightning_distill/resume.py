"""Resuming a run: the checkpoint ``fit`` continues from (checked before training) and the CSV rows
the interrupted run logged up to it."""

from __future__ import annotations

import csv
import warnings
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from lightning.pytorch.utilities.rank_zero import rank_zero_only
from omegaconf import DictConfig

from lightning_distill.config.load import flat_keys, to_dict
from lightning_distill.checkpoints import load_checkpoint
from lightning_distill.modules import check_checkpoint


def resume_checkpoint(cfg: DictConfig, names) -> Tuple[Optional[str], int, Dict[str, Any]]:
    """The checkpoint ``fit`` continues from (``cfg.resume``), its step and its ``lightning_distill``
    record (``{}`` without one), checked before training starts.

    ``resume=auto`` takes ``<output_dir>/checkpoints/last.ckpt`` when it exists and starts afresh
    otherwise (so a pre-empted job can be re-submitted with the same command). The checkpoint must be
    readable, hold optimizer state (not ``checkpoint.weights_only``) and segment the same classes;
    config values that differ from the checkpoint's (other than ``trainer``, ``resume``, ``logger``,
    ``pictures``) are listed in a warning.
    """
    if not cfg.resume:
        return None, 0, {}
    auto = cfg.resume == "auto"
    path = Path(cfg.output_dir) / "checkpoints" / "last.ckpt" if auto else Path(cfg.resume)
    if auto and not path.is_file():
        print(f"resume=auto: no {path} yet, starting from scratch")
        return None, 0, {}
    ckpt, old = load_checkpoint(path)
    check_checkpoint(ckpt, names, f"checkpoint {path}")
    if "optimizer_states" not in ckpt or "loops" not in ckpt:
        raise ValueError(f"checkpoint {path} holds weights only (checkpoint.weights_only=true) and cannot resume training; "
                         "to start a new run from its weights, use it as a teacher or drop `resume`")
    now, then = flat_keys(to_dict(cfg)), flat_keys(to_dict(old))
    changed = sorted(k for k in now.keys() | then.keys()
                     if k.split(".")[0] not in ("trainer", "resume", "logger", "pictures") and now.get(k) != then.get(k))
    if changed:
        warnings.warn(f"resuming from {path} with config values that differ from the checkpoint's: "
                      + ", ".join(f"{k}={now.get(k)!r} (was {then.get(k)!r})" for k in changed), stacklevel=2)
    print(f"resuming from {path} (step {ckpt.get('global_step')}, epoch {ckpt.get('epoch')})")
    return str(path), int(ckpt.get("global_step", 0)), dict(ckpt.get("lightning_distill") or {})


def previous_csv_rows(cfg: DictConfig, out: Path, step: int) -> list:
    """Rows of ``logs/metrics.csv`` up to the resumed checkpoint's ``step`` (a resumed run re-logs the rest)."""
    csv_path = out / "logs" / "metrics.csv"
    if cfg.logger != "csv" or not csv_path.is_file() or rank_zero_only.rank != 0:
        return []
    rows = []
    with csv_path.open(newline="") as f:
        for r in csv.DictReader(f):
            row = {k: int(v) if v.lstrip("-").isdigit() else float(v) for k, v in r.items() if v not in (None, "")}
            s = row.get("step")
            if s is not None and (s < step or (s == step and any(k.startswith("val/") for k in row))):
                rows.append(row)
    return rows
