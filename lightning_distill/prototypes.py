"""The prototype bank: class-wise prediction-distribution centroids, as a Lightning callback.

During teacher pretraining the bank accumulates, for each class k, the mean of a per-voxel vector
over the voxels whose ground truth is k (Yu et al. 2024): by default the softmax (temperature tau)
of the network's prediction, giving a K x K matrix; with ``space="feature"`` the penultimate feature
map (the input of the network's head, found by module name through a forward hook), giving K x D.

* Running mean (default): sums and counts over the training batches from ``start`` (a fraction of
  the training steps) to the end, so early, untrained predictions are left out.
* EMA (``momentum`` set): ``P_k <- m P_k + (1 - m) batch_mean_k`` for every class in the batch.
* Under DDP, per-batch sums and counts are all-reduced (summed) before the update, so every process
  holds the same bank, equal to a single process over the union of the batches.
* Temperatures: ``taus`` lists further temperatures at which the same voxels are accumulated (one
  softmax each, one K x K matrix each), so a student can read the bank at its own temperature
  (``distill.tau``): a mean of softmax(z / tau) cannot be recomputed at another tau from the mean at
  one tau. ``prototypes`` holds the bank at ``tau``; ``prototypes_by_tau`` at every temperature.
* The state is saved and restored through ``state_dict`` / ``load_state_dict`` (so it is part of
  Lightning checkpoints), and exported at the end of training with :func:`save_bank` (rank 0 only).

The same callback runs in a student run, where it records the student's own prototypes (exported
as ``student_prototypes.pt``) for comparison with the teacher's bank.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_distill import __version__
from lightning_distill.io import atomic_write
from lightning_distill.losses.prototype import class_means, masked_class_sums
from lightning_distill.networks import InputHook

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


def file_sha256(path: str | os.PathLike) -> Optional[str]:
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


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
    accumulated temperature), ``counts`` (K), ``class_names``, ``num_classes``, ``tau``, ``space`` (``prob``/``feature``), ``format``, ``version`` and the metadata (``mode``, ``config``,
    ``checkpoint``, ``checkpoint_sha256``, ...).
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
                             "accumulating, see bank.start, or not by lightning_distill)")
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


class PrototypeBank(Callback):
    """Accumulate class prototypes of the training predictions (or features).

    The LightningModule's ``training_step`` must return a dict with ``loss`` and ``logits``
    (``B x K x *spatial``); labels are read from ``batch["label"]``.

    Args:
        class_names: the K class names (background first).
        space: ``"prob"`` (softmax of logits / tau, K x K) or ``"feature"`` (K x D).
        tau: softmax temperature for ``space="prob"`` (the bank's ``prototypes``).
        taus: further temperatures accumulated alongside (``space="prob"`` only; ``tau`` is always
            included), so that a student may read the bank at its own temperature.
        momentum: ``None`` for the running mean; a value in (0, 1) for an EMA.
        start: fraction of the training steps (``trainer.max_steps``, else epochs) before which
            batches are not accumulated.
        feature_layer: for ``space="feature"``, the name of the module whose input is the feature
            map (e.g. ``"segmentation_head"``; see :func:`lightning_distill.networks.head_module_name`).
        export_path: where :meth:`on_train_end` writes the bank (``None``: do not export).
        metadata: extra entries for the exported file (e.g. the resolved config).
    """

    def __init__(
        self,
        class_names: Sequence[str],
        space: str = "prob",
        tau: float = 1.0,
        taus: Sequence[float] = (),
        momentum: Optional[float] = None,
        start: float = 0.5,
        feature_layer: Optional[str] = None,
        export_path: Optional[str] = None,
        metadata: Optional[Dict[str, Any]] = None,
    ):
        if space not in ("prob", "feature"):
            raise ValueError(f"space must be 'prob' or 'feature', got {space!r}")
        if space == "feature" and not feature_layer:
            raise ValueError("space='feature' needs feature_layer (the name of the network's head module)")
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1) or None, got {momentum}")
        if not 0.0 <= start < 1.0:
            raise ValueError(f"start must be in [0, 1), got {start}")
        if tau <= 0 or any(t <= 0 for t in taus):
            raise ValueError(f"temperatures must be positive, got tau={tau}, taus={list(taus)}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.space, self.tau, self.momentum, self.start = space, float(tau), momentum, float(start)
        self.feature_layer, self.export_path = feature_layer, export_path
        self.metadata = dict(metadata or {})
        self.extra_taus = sorted({float(t) for t in taus} - {self.tau}) if space == "prob" else []
        self.sums: Optional[torch.Tensor] = None  # (K, C) float64 (running mean) or means (EMA), at tau
        self.tau_sums: Dict[float, torch.Tensor] = {}  # the same at each of extra_taus
        self.counts = torch.zeros(self.num_classes, dtype=torch.float64)
        self._hook: Optional[InputHook] = None

    # ----------------------------------------------------------------- state
    @property
    def prototypes(self) -> Optional[torch.Tensor]:
        """Current ``(K, C)`` float32 prototypes (rows of unseen classes are 0), or ``None``."""
        return None if self.sums is None else self._means(self.sums)

    def _means(self, sums: torch.Tensor) -> torch.Tensor:
        return (sums if self.momentum is not None else class_means(sums, self.counts)).float()

    def bank(self) -> Bank:
        if self.sums is None:
            raise RuntimeError("the prototype bank is empty: no training batch was accumulated (is `start` too late?)")
        meta = {"mode": "ema" if self.momentum is not None else "running_mean", "momentum": self.momentum,
                "start": self.start, "feature_layer": self.feature_layer, **self.metadata}
        by_tau = {t: self._means(v) for t, v in self.tau_sums.items()}
        return Bank(self.prototypes, self.counts.clone(), self.class_names, self.tau, self.space, meta, by_tau)

    def state_dict(self) -> Dict[str, Any]:
        return {"sums": None if self.sums is None else self.sums.clone(), "counts": self.counts.clone(),
                "tau_sums": {t: v.clone() for t, v in self.tau_sums.items()},
                "class_names": self.class_names, "space": self.space, "tau": self.tau, "momentum": self.momentum}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if list(state_dict.get("class_names", [])) != self.class_names:
            raise ValueError(f"checkpointed prototype bank has classes {state_dict.get('class_names')}, this run has {self.class_names}")
        self.sums = None if state_dict["sums"] is None else state_dict["sums"].clone()
        self.counts = state_dict["counts"].clone()
        self.tau_sums = {float(t): v.clone() for t, v in (state_dict.get("tau_sums") or {}).items() if float(t) in self.extra_taus}

    # ----------------------------------------------------------------- hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.space == "feature" and self._hook is None:
            self._hook = InputHook(pl_module.net, self.feature_layer, which="input", detach=True)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def _active(self, trainer: Trainer) -> bool:
        if self.start <= 0:
            return True
        if trainer.max_steps and trainer.max_steps > 0:
            return trainer.global_step >= self.start * trainer.max_steps
        if trainer.max_epochs and trainer.max_epochs > 0:
            return trainer.current_epoch >= int(self.start * trainer.max_epochs)
        return True

    @torch.no_grad()
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        feats = self._hook.pop() if self._hook is not None and self._hook.value is not None else None
        if not self._active(trainer):
            return
        if not isinstance(outputs, dict) or "logits" not in outputs:
            raise RuntimeError("PrototypeBank needs training_step to return a dict with 'logits'")
        logits = outputs["logits"].detach().float()
        if self.space == "prob":
            values = torch.softmax(logits / self.tau, dim=1)
        else:
            if feats is None:
                raise RuntimeError(f"feature hook on {self.feature_layer!r} captured nothing in this batch")
            values = feats.float()
        if self.extra_taus:  # every temperature in one pass (and one all-reduce): channels side by side
            values = torch.cat([values] + [torch.softmax(logits / t, dim=1) for t in self.extra_taus], dim=1)
        sums, counts = self._batch_sums(trainer, pl_module, values, batch["label"])
        parts = sums.split(sums.shape[1] // (1 + len(self.extra_taus)), dim=1)
        seen = self.counts
        self.sums = self._update(self.sums, parts[0], counts, seen)
        for t, part in zip(self.extra_taus, parts[1:]):
            self.tau_sums[t] = self._update(self.tau_sums.get(t), part, counts, seen)
        self.counts = seen + (counts if self.momentum is None else (counts > 0).double())

    def _batch_sums(self, trainer: Trainer, pl_module: LightningModule, values: torch.Tensor, label: torch.Tensor):
        """Per-class sums and counts of one batch, summed over the processes under DDP (float64, CPU)."""
        sums, counts = masked_class_sums(values, label, self.num_classes)
        sums, counts = sums.double(), counts.double()
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            packed = torch.cat([sums.flatten(), counts]).to(pl_module.device)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM)
            packed = packed.cpu()
            sums, counts = packed[: sums.numel()].view_as(sums), packed[sums.numel():]
        return sums.cpu(), counts.cpu()

    def _update(self, state: Optional[torch.Tensor], sums: torch.Tensor, counts: torch.Tensor,
                seen: torch.Tensor) -> torch.Tensor:
        """The running sums (or EMA means) after one batch; ``seen``: the counts before it."""
        if self.momentum is None:
            return sums if state is None else state + sums
        means = class_means(sums, counts)
        present = counts > 0
        state = torch.zeros_like(means) if state is None else state.clone()
        first = present & (seen == 0)
        upd = present & ~first
        state[first] = means[first]
        state[upd] = self.momentum * state[upd] + (1 - self.momentum) * means[upd]
        return state

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.export_path:
            cb = trainer.checkpoint_callback
            self.export(trainer, getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") or None)

    def export(self, trainer: Trainer, checkpoint: Optional[str] = None) -> None:
        """Write the bank to ``export_path`` (rank 0 only), recording ``checkpoint`` and its SHA-256.

        Lightning runs checkpoint callbacks last, so the run's final checkpoint may not exist yet
        in ``on_train_end``; the runner calls this again after ``fit`` to record it.
        """
        self.metadata["checkpoint"] = checkpoint
        self.metadata["checkpoint_sha256"] = file_sha256(checkpoint) if checkpoint else None
        if trainer.is_global_zero and self.export_path:
            save_bank(self.export_path, self.bank())
