"""The prototype bank as a Lightning callback: class-wise prediction-distribution centroids of the
training batches (Yu et al. 2024), accumulated while a teacher trains (``bank.source=running``).

For each class k the bank holds the mean of a per-voxel vector over the voxels whose ground truth is
k: by default the softmax (temperature tau) of the network's prediction, a K x K matrix; with
``space="feature"`` the penultimate feature map (the input of the network's head, found by module
name through a forward hook), K x D. The callback reads the teacher's train-mode outputs on the
(augmented, possibly cropped) training batches:

- running mean (default): sums and counts over the training batches from ``start`` (a fraction of
  the training steps) to the end, so early, untrained predictions are left out;
- EMA (``momentum`` set): ``P_k <- m P_k + (1 - m) batch_mean_k`` for every class in the batch;
- the per-class sums and counts are held in a torchmetrics :class:`ClassSums` (states reduced with
  ``sum``). Under DDP a running mean's per-process sums stay local and are summed over the processes
  when the bank is read (at each validation, in every checkpoint, at the end of training): one
  collective then, not one per step. An EMA needs each step's global batch means, so it sums over
  the processes every step. Either way every process then holds the same bank, equal (to float64
  rounding) to a single process over the union of the batches, and a checkpoint (written by rank 0)
  holds the global sums.

``bank.source=final`` computes the bank after training instead, from one set of weights over whole
volumes: :func:`lightning_distill.bank.scan.final_bank`. ``bank.axial_range`` keeps only the voxels
at given fractions of a volume's axial extent: :mod:`lightning_distill.bank.axial`.

State and files: the callback's state is saved and restored through ``state_dict`` /
``load_state_dict`` (so it is part of Lightning checkpoints), and the bank is exported at the end of
training with :func:`save_bank` (rank 0 only, atomically); a ``final`` bank replaces it at the same
path. The same callback runs in a student run, where it records the student's own prototypes
(exported as ``student_prototypes.pt``) for comparison with the teacher's bank.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_distill.bank.accumulate import ClassSums, bank_values, check_options, split_taus
from lightning_distill.bank.axial import axial_masked_labels, check_axial_range, warn_empty_classes
from lightning_distill.bank.format import Bank, save_bank
from lightning_distill.io import file_sha256
from lightning_distill.losses.prototype import class_means
from lightning_distill.networks import InputHook


class PrototypeBank(Callback):
    """Accumulate class prototypes of the training predictions (or features).

    The LightningModule's ``training_step`` must return a dict with ``loss`` and ``logits``
    (``B x K x *spatial``); labels are read from ``batch["label"]``.

    Each process adds its batches to a :class:`ClassSums`, folded into the bank after every batch
    with an EMA or in one CPU process, else (on a GPU, under DDP) when the bank is read. Under DDP with batches pending, reading
    (``sums``, ``counts``, ``prototypes``, :meth:`bank`, :meth:`state_dict`, :meth:`export`) is a
    collective that every process must call; the callback folds at the start of every validation,
    in ``state_dict`` and at the end of training, so Lightning's hooks and rank-0-only readers
    during validation (the run's pictures) find nothing pending.

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
        axial_range: ``[lo, hi]``: only voxels at these fractions of the batch's axial (last) axis
            contribute (see :mod:`lightning_distill.bank.axial`; 3D batches of whole-depth volumes). ``None``: all.
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
        axial_range: Optional[Sequence[float]] = None,
    ):
        extra_taus = check_options(space, tau, taus, feature_layer)
        if momentum is not None and not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1) or None, got {momentum}")
        if not 0.0 <= start < 1.0:
            raise ValueError(f"start must be in [0, 1), got {start}")
        self.class_names = list(class_names)
        self.num_classes = len(self.class_names)
        self.space, self.tau, self.momentum, self.start = space, float(tau), momentum, float(start)
        self.feature_layer, self.export_path = feature_layer, export_path
        self.metadata = dict(metadata or {})
        self.axial_range = check_axial_range(axial_range)
        self._warned_empty = False
        self.extra_taus = extra_taus
        # the bank so far, the same on every process: (K, C) float64 sums (running mean) or means (EMA) at tau,
        # the same at each of extra_taus, and the counts (voxels; batches with the class for an EMA)
        self._sums: Optional[torch.Tensor] = None
        self._tau_sums: Dict[float, torch.Tensor] = {}
        self._counts = torch.zeros(self.num_classes, dtype=torch.float64)
        self._pending: Optional[ClassSums] = None  # this process's batches not yet folded into the bank
        self._distributed = False  # training under DDP (set at each batch from the trainer)
        self._hook: Optional[InputHook] = None

    # ----------------------------------------------------------------- state (reads fold first: see the class docstring)
    @property
    def sums(self) -> Optional[torch.Tensor]:
        """``(K, C)`` float64 sums at ``tau`` over every process (EMA: the means), or ``None`` before any batch."""
        self._fold()
        return self._sums

    @property
    def tau_sums(self) -> Dict[float, torch.Tensor]:
        """The same as :attr:`sums` at each of ``extra_taus``."""
        self._fold()
        return self._tau_sums

    @property
    def counts(self) -> torch.Tensor:
        """``(K,)`` float64 voxels per class over every process (EMA: the batches that held the class)."""
        self._fold()
        return self._counts

    @property
    def prototypes(self) -> Optional[torch.Tensor]:
        """Current ``(K, C)`` float32 prototypes (rows of unseen classes are 0), or ``None``."""
        self._fold()
        return None if self._sums is None else self._means(self._sums)

    def _means(self, sums: torch.Tensor) -> torch.Tensor:
        return (sums if self.momentum is not None else class_means(sums, self._counts)).float()

    def bank(self) -> Bank:
        self._fold()
        if self._sums is None:
            raise RuntimeError("the prototype bank is empty: no training batch was accumulated (is `start` too late?)")
        meta = {"mode": "ema" if self.momentum is not None else "running_mean", "momentum": self.momentum,
                "start": self.start, "feature_layer": self.feature_layer,
                "axial_range": None if self.axial_range is None else list(self.axial_range), **self.metadata}
        by_tau = {t: self._means(v) for t, v in self._tau_sums.items()}
        return Bank(self._means(self._sums), self._counts.clone(), self.class_names, self.tau, self.space, meta, by_tau)

    def state_dict(self) -> Dict[str, Any]:
        """The bank over every process (folded first: under DDP rank 0 writes the checkpoint, and it must
        hold the global sums), in the format of checkpoints written before :class:`ClassSums`."""
        self._fold()
        return {"sums": None if self._sums is None else self._sums.clone(), "counts": self._counts.clone(),
                "tau_sums": {t: v.clone() for t, v in self._tau_sums.items()},
                "class_names": self.class_names, "space": self.space, "tau": self.tau, "momentum": self.momentum}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (the global bank; every process loads the same one)."""
        if list(state_dict.get("class_names", [])) != self.class_names:
            raise ValueError(f"checkpointed prototype bank has classes {state_dict.get('class_names')}, this run has {self.class_names}")
        self._sums = None if state_dict["sums"] is None else state_dict["sums"].clone()
        self._counts = state_dict["counts"].clone()
        self._tau_sums = {float(t): v.clone() for t, v in (state_dict.get("tau_sums") or {}).items() if float(t) in self.extra_taus}
        self._pending = None

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
        logits = outputs["logits"]
        values = bank_values(logits, feats, self.space, self.tau, self.extra_taus, self.feature_layer)
        label = axial_masked_labels(batch["label"], self.axial_range, logits.ndim - 2)  # a copy: the loss's labels stay
        self._distributed = dist.is_available() and dist.is_initialized() and trainer.world_size > 1
        if self._pending is None:  # on the values' device: NCCL sums CUDA tensors only
            self._pending = ClassSums(self.num_classes, values.shape[1], distributed_available_fn=self._is_distributed)
            self._pending.to(values.device)
        self._pending.update(values, label)
        # an EMA needs every step's global batch means. A running mean in one CPU process folds every step too
        # (free there, and the order of the float64 additions every result so far was computed with); on an
        # accelerator, or under DDP, the sums stay on the device until the bank is read (no host sync per step)
        if self.momentum is not None or (not self._distributed and values.device.type == "cpu"):
            self._fold()

    def _is_distributed(self) -> bool:
        return self._distributed

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fold()  # on every process, so that rank-0-only readers during validation need no collective

    def _fold(self) -> None:
        """Add the pending batches, summed over the processes (a collective under DDP), to the bank.

        A no-op with nothing pending; every process has the same number of pending batches (DDP runs
        the same steps), so they all call the collective or none does.
        """
        if self._pending is None or not self._pending.update_called:
            return
        sums, counts = (t.cpu() for t in self._pending.compute())
        self._pending.reset()
        parts = split_taus(sums, self.extra_taus)
        seen = self._counts
        self._sums = self._update(self._sums, parts[0], counts, seen)
        for t, part in zip(self.extra_taus, parts[1:]):
            self._tau_sums[t] = self._update(self._tau_sums.get(t), part, counts, seen)
        self._counts = seen + (counts if self.momentum is None else (counts > 0).double())

    def _update(self, state: Optional[torch.Tensor], sums: torch.Tensor, counts: torch.Tensor,
                seen: torch.Tensor) -> torch.Tensor:
        """The running sums (or EMA means) after the folded batches; ``seen``: the counts before them."""
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
        self._fold()
        if self.export_path:
            cb = trainer.checkpoint_callback
            self.export(trainer, getattr(cb, "last_model_path", "") or getattr(cb, "best_model_path", "") or None)

    def export(self, trainer: Trainer, checkpoint: Optional[str] = None) -> None:
        """Write the bank to ``export_path`` (rank 0 only), recording ``checkpoint`` and its SHA-256.

        Every process calls it (the pending batches are folded in on each); rank 0 writes. Lightning
        runs checkpoint callbacks last, so the run's final checkpoint may not exist yet in
        ``on_train_end``; the runner calls this again after ``fit`` to record it.
        """
        self._fold()
        self.metadata["checkpoint"] = checkpoint
        self.metadata["checkpoint_sha256"] = file_sha256(checkpoint) if checkpoint else None
        if trainer.is_global_zero and self.export_path:
            bank = self.bank()
            if not self._warned_empty:  # once per run (the runner exports twice)
                self._warned_empty = True
                warn_empty_classes(bank.counts, bank.class_names, self.axial_range, f"prototype bank {self.export_path}")
            save_bank(self.export_path, bank)
