"""The prototype bank's file format: :class:`Bank`, :func:`save_bank`, :func:`load_bank`.

A bank is written as a plain dict of tensors and metadata (no pickled class), atomically; a
``lightning-distill fit`` checkpoint carries its run's bank under ``lightning_distill.prototype_bank``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch

from lightning_distill import __version__
from lightning_distill.io import atomic_write

BANK_FORMAT = 1
_REQUIRED = ("prototypes", "counts", "class_names", "num_classes", "tau", "space")


@dataclass
class Bank:
    """A loaded prototype bank (see :func:`save_bank` for the file format)."""

    prototypes: torch.Tensor  # (K, C) float32
    counts: torch.Tensor  # (K,) voxels (or batches for EMA) that contributed to each row
    class_names: List[str]
    tau: float
    space: str
    meta: Dict[str, Any] = field(default_factory=dict)
    by_tau: Dict[float, torch.Tensor] = field(default_factory=dict)  # (K, C) at every stored temperature

    def __post_init__(self) -> None:
        self.by_tau = {float(t): p.float() for t, p in self.by_tau.items()}
        self.by_tau.setdefault(float(self.tau), self.prototypes.float())

    @property
    def present(self) -> torch.Tensor:
        return self.counts > 0

    @property
    def taus(self) -> List[float]:
        """The temperatures the bank was accumulated at (sorted)."""
        return sorted(self.by_tau)

    def at_tau(self, tau: Optional[float]) -> torch.Tensor:
        """The ``(K, C)`` prototypes at temperature ``tau`` (``None``: the bank's own ``tau``).

        Raises:
            ValueError: the bank holds no matrix at ``tau`` (the message lists the ones it holds).
        """
        if tau is None or self.space == "feature":
            return self.prototypes
        for t, p in self.by_tau.items():
            if abs(t - float(tau)) < 1e-9:
                return p
        raise ValueError(f"prototype bank {self.meta.get('path', '')} holds prototypes at tau {self.taus}, not at "
                         f"distill.tau={tau:g}: use one of those, or pretrain the teacher with bank.taus including {tau:g}")

    def check_classes(self, class_names: Sequence[str], source: str = "") -> None:
        """Raise ``ValueError`` unless the bank's class names equal ``class_names`` (in order)."""
        if list(class_names) != list(self.class_names):
            missing = [c for c in class_names if c not in self.class_names]
            extra = [c for c in self.class_names if c not in class_names]
            raise ValueError(
                f"prototype bank {source or ''} was built for classes {list(self.class_names)} but this run "
                f"segments {list(class_names)} (missing from bank: {missing}; not in this run: {extra}"
                f"{'; same names in another order' if not missing and not extra else ''}). "
                "Use a bank exported by a teacher trained with the same class names."
            )


def bank_record(bank: Bank) -> Dict[str, Any]:
    """The bank as the plain dict that :func:`save_bank` writes (and checkpoints carry)."""
    return {
        **bank.meta,
        "prototypes": bank.prototypes.detach().float().cpu(),
        "counts": bank.counts.detach().cpu(),
        "class_names": list(bank.class_names),
        "num_classes": len(bank.class_names),
        "tau": float(bank.tau),
        "prototypes_by_tau": {float(t): p.detach().float().cpu() for t, p in bank.by_tau.items()},
        "space": bank.space,
        "format": BANK_FORMAT,
        "version": __version__,
    }


def save_bank(path: str | os.PathLike, bank: Bank) -> None:
    """Write a bank atomically (temp file + rename) as a plain dict of tensors and metadata.

    Keys: ``prototypes`` (K x C float32, at ``tau``), ``prototypes_by_tau`` ({tau: K x C} at every
    accumulated temperature), ``counts`` (K: voxels, or batches for an EMA, per row; 0 for a class
    never seen), ``class_names``, ``num_classes``, ``tau``, ``space`` (``prob``/``feature``),
    ``format``, ``version`` and the metadata:

    * ``mode``: ``running_mean`` | ``ema`` (``bank.source=running``) | ``final`` (:func:`final_bank`);
    * ``axial_range``: ``[lo, hi]`` (fractions of the volume's axial extent, see the module
      docstring) or ``None`` (whole volumes);
    * ``checkpoint``, ``checkpoint_sha256``: the weights the bank comes from (running: the run's
      final ``last.ckpt``; final: the checkpoint :func:`final_bank` ran, the best one);
    * ``final`` only: ``final_split`` (``train`` | ``val`` | ``both``: the volumes it ran over) and
      ``volumes`` (how many);
    * ``reliability`` (teacher runs with a validation split): ``{class_name: {"dice", "precision",
      "recall", "voxels"}}`` of the teacher on the validation volumes (background not listed; a
      ratio with a zero denominator is ``None``; see :func:`class_reliability`), with
      ``reliability_split`` (``"val"``) and ``reliability_checkpoint``; absent without a validation
      split;
    * ``config`` (the run's resolved config), ``stage``, ``start``, ``momentum``, ``feature_layer``.
    """
    obj = bank_record(bank)
    atomic_write(path, lambda tmp: torch.save(obj, tmp))


def load_bank(path: str | os.PathLike) -> Bank:
    """Load and validate a bank written by :func:`save_bank`, or the bank a checkpoint carries.

    A ``.ckpt`` of ``lightning-distill fit`` holds the bank of its run as it was when the checkpoint
    was written (a teacher's: the prototype bank so far; a student's: its own prototypes).

    Raises:
        FileNotFoundError: no such file.
        ValueError: unreadable/truncated file, missing keys, or inconsistent shapes; the message
            names the file.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prototype bank {str(p)!r} does not exist (train a teacher first: `make train-teacher`)")
    ckpt = p.suffix == ".ckpt"
    try:  # a checkpoint holds optimizer state and config objects besides tensors
        obj = torch.load(p, map_location="cpu", weights_only=not ckpt)
    except Exception as e:  # noqa: BLE001 - any unpickling error means a bad file
        raise ValueError(f"prototype bank {str(p)!r} could not be read ({type(e).__name__}: {e}); the file is truncated or not a bank") from e
    if ckpt:
        obj = (obj.get("lightning_distill") or {}).get("prototype_bank") if isinstance(obj, dict) else None
        if obj is None:
            raise ValueError(f"checkpoint {str(p)!r} carries no prototype bank (written before the bank started "
                             "accumulating, see bank.start, by a teacher with bank.source=final, whose bank is only "
                             "in its prototypes.pt, or not by lightning_distill)")
    if not isinstance(obj, dict) or any(k not in obj for k in _REQUIRED):
        missing = [k for k in _REQUIRED if not isinstance(obj, dict) or k not in obj]
        raise ValueError(f"prototype bank {str(p)!r} lacks the keys {missing}; it was not written by lightning_distill")
    protos, counts = obj["prototypes"], obj["counts"]
    k = len(obj["class_names"])
    if protos.ndim != 2 or protos.shape[0] != k or counts.shape != (k,) or obj["num_classes"] != k:
        raise ValueError(f"prototype bank {str(p)!r} is inconsistent: prototypes {tuple(protos.shape)}, counts {tuple(counts.shape)}, {k} class names")
    if not torch.isfinite(protos).all():
        raise ValueError(f"prototype bank {str(p)!r} contains NaN or Inf values")
    by_tau = obj.get("prototypes_by_tau") or {}
    if not isinstance(by_tau, dict) or any(not torch.is_tensor(v) or v.shape != protos.shape or not torch.isfinite(v).all()
                                           for v in by_tau.values()):
        raise ValueError(f"prototype bank {str(p)!r} is inconsistent: its prototypes_by_tau are not finite {tuple(protos.shape)} matrices")
    meta = {kk: v for kk, v in obj.items() if kk not in _REQUIRED and kk != "prototypes_by_tau"}
    return Bank(protos.float(), counts, list(obj["class_names"]), float(obj["tau"]), str(obj["space"]), meta, by_tau)


def merge_banks(banks: Sequence[Bank], sources: Optional[Sequence[str]] = None) -> Bank:
    """One bank from banks built over disjoint sets of volumes: each row the mean over all their voxels.

    A bank's row k is the mean over the ``counts[k]`` voxels of class k, so the merged row is
    ``sum_i counts_i[k] * rows_i[k] / sum_i counts_i[k]`` (at every temperature), exactly the row one build over
    all the volumes would give, up to float32 rounding. This is how volumes that need different preprocessing
    (one folder in HU, another 0..255) enter one bank: build a bank per folder, each with its own
    ``data.preprocess``, then merge them (``lightning-distill bank merge``).

    Raises:
        ValueError: fewer than two banks; other class names, spaces, temperatures; an EMA bank (its counts are
            batches, not voxels, so its rows are no means over voxels).
    """
    if len(banks) < 2:
        raise ValueError("merging needs at least two banks")
    names = list(sources) if sources is not None else [str(b.meta.get("path", i)) for i, b in enumerate(banks)]
    first = banks[0]
    for name, b in zip(names, banks):
        if b.meta.get("mode") == "ema":
            raise ValueError(f"{name}: an EMA bank (bank.momentum) counts batches, not voxels; it cannot be merged as a mean")
        for what, mine, theirs in (("class names", b.class_names, first.class_names), ("space", b.space, first.space),
                                   ("temperatures", b.taus, first.taus), ("tau", b.tau, first.tau)):
            if mine != theirs:
                raise ValueError(f"{name}: {what} {mine} differ from {names[0]}'s {theirs}; only banks of the same "
                                 "classes, space and temperatures merge")
    counts = torch.stack([b.counts.double() for b in banks])  # (N, K)
    total = counts.sum(0)

    def mean(rows: Sequence[torch.Tensor]) -> torch.Tensor:
        weighted = sum(c[:, None] * r.double() for c, r in zip(counts, rows))
        return torch.where(total[:, None] > 0, weighted / total.clamp_min(1)[:, None], torch.zeros_like(weighted)).float()

    by_tau = {t: mean([b.at_tau(t) for b in banks]) for t in first.taus}
    meta = {"mode": "merged", "merged_from": [{"bank": n, "counts": b.counts.tolist(), "mode": b.meta.get("mode"),
                                                "data": b.meta.get("data"), "preprocess": b.meta.get("preprocess")}
                                               for n, b in zip(names, banks)],
            "class_voxels": {n: int(c) for n, c in zip(first.class_names, total.tolist())}}
    return Bank(by_tau[first.tau], total.float(), list(first.class_names), first.tau, first.space, meta, by_tau)
