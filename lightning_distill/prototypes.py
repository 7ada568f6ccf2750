"""The prototype bank: class-wise prediction-distribution centroids, as a Lightning callback.

During teacher pretraining the bank accumulates, for each class k, the mean of a per-voxel vector
over the voxels whose ground truth is k (Yu et al. 2024): by default the softmax (temperature tau)
of the network's prediction, giving a K x K matrix; with ``space="feature"`` the penultimate feature
map (the input of the network's head, found by module name through a forward hook), giving K x D.

Sources (``bank.source``):

* ``running`` (default, the paper): the :class:`PrototypeBank` callback accumulates the teacher's
  train-mode outputs on the (augmented, possibly cropped) training batches while it trains:

  - running mean (default): sums and counts over the training batches from ``start`` (a fraction of
    the training steps) to the end, so early, untrained predictions are left out;
  - EMA (``momentum`` set): ``P_k <- m P_k + (1 - m) batch_mean_k`` for every class in the batch;
  - the per-class sums and counts are held in a torchmetrics :class:`ClassSums` (states reduced
    with ``sum``). Under DDP a running mean's per-process sums stay local and are summed over the
    processes when the bank is read (at each validation, in every checkpoint, at the end of
    training): one collective then, not one per step. An EMA needs each step's global batch means,
    so it sums over the processes every step. Either way every process then holds the same bank,
    equal (to float64 rounding) to a single process over the union of the batches, and a
    checkpoint (written by rank 0) holds the global sums.

* ``final``: :func:`final_bank`, after training, from one set of weights (``fit`` uses the best
  checkpoint by ``val/dice``; the last weights, with a warning, when there is none) in eval mode,
  under ``no_grad``, over whole volumes of ``bank.final_split`` (``train``: the training volumes
  without augmentation or crops; ``val``; ``both``) through the module's ``predict_logits``
  (sliding window when the module has a ``roi_size``). Same accumulation (every temperature,
  ``prob`` or ``feature`` space, the feature map through the same hook by module name, stitched by
  the sliding window like the logits). It is a plain function: call it from a notebook on any
  trained module (see its docstring).

Temperatures: ``taus`` lists further temperatures at which the same voxels are accumulated (one
softmax each, one K x K matrix each), so a student can read the bank at its own temperature
(``distill.tau``): a mean of softmax(z / tau) cannot be recomputed at another tau from the mean at one
tau. ``prototypes`` holds the bank at ``tau``; ``prototypes_by_tau`` at every temperature.

Axial range (``bank.axial_range = [lo, hi]``, both sources): only voxels whose axial position lies in
``[lo, hi]`` contribute. The coordinate is the **fraction of the volume's axial extent**: volumes are
``(X, Y, Z)`` arrays whose last spatial axis is axial (``(B, C, X, Y, Z)`` batches), and slice ``i`` of
``Z`` lies at ``i / (Z - 1)``: 0 is the first slice, 1 the last. The phantom's arrays are oriented
``LAS`` (``PHANTOM_ORIENTATION``) and NIfTI volumes are reoriented to ``data.nifti.orientation``
(``RAS`` by default), so 0 is the most inferior slice and 1 the most superior one of the volume
(of its field of view, after ``crop_foreground`` if set; not of its labels). For the phantom the map
is exact: a volume samples the normalised ``z in [-1, 1]`` linearly along its last axis
(``np.linspace(-1, 1, Z)``), the same ``z`` in which a student's slices are drawn
(``data.phantom.slice_z``), so a slice at ``z`` lies at fraction ``(z + 1) / 2``:
:func:`phantom_axial_range` converts ``slice_z = [-0.6, 0.0]`` (the student's default) into
``[0.2, 0.5]``. Voxels outside the range are masked out of the class sums (their labels set to an
ignore value in a copy: the labels the loss sees are never changed); a class with no voxel in the
range keeps a zero row and count 0 (the student leaves such rows out), and a warning lists it. With
training crops (``data.patch_size``) a patch does not know where it lies in its volume, so ``fit``
refuses an axial range with a running bank when the patches crop the axial axis.

Teacher reliability (:func:`class_reliability`; ``fit`` records it for every teacher run with a
validation split, whatever the source): per class, on the validation volumes with the bank's weights
(best checkpoint, eval mode; the same argmax as validation), voxel counts pooled over every volume:
``dice = 2 TP / (2 TP + FP + FN)``, ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)`` and
``voxels = TP + FN`` (ground-truth voxels); a ratio whose denominator is 0 is ``None``. Background
(the first class) is not listed (its figures are dominated by its size; a student keeps its row at
weight 1). With an axial range the figures are over the same range as the bank (the voxels its rows
are means of), not over whole volumes. Stored as ``meta["reliability"] = {class_name: {"dice",
"precision", "recall", "voxels"}}`` with ``meta["reliability_split"] = "val"`` (and
``reliability_checkpoint``); a run without a validation split records no ``reliability`` key and says
so. A student reads it with ``distill.row_weight=reliability`` / ``distill.min_reliability``.

State and files: the callback's state is saved and restored through ``state_dict`` /
``load_state_dict`` (so it is part of Lightning checkpoints), and the bank is exported at the end of
training with :func:`save_bank` (rank 0 only, atomically); a ``final`` bank replaces it at the same
path.

The same callback runs in a student run, where it records the student's own prototypes (exported
as ``student_prototypes.pt``) for comparison with the teacher's bank.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torchmetrics import Metric
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassStatScores

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


BANK_CONTROLS = ("none", "identity", "flat", "shuffled")


def control_bank(bank: Bank, kind: str = "none", seed: int = 0) -> Bank:
    """The bank with the teacher's content taken out, for the controls of a distillation experiment.

    A gain that survives a control is not the teacher's knowledge. Every stored temperature is
    transformed alike; rows of classes the bank never saw stay 0.

    * ``identity``: ``eye(K)``: a teacher that is right with certainty and knows no confusion.
    * ``flat``: each row keeps the teacher's diagonal (its confidence in the class) and spreads the
      rest evenly over the other classes: the confidence without the confusion pattern.
    * ``shuffled``: each row's off-diagonal entries permuted at random (``seed``); the diagonal and
      the row's off-diagonal mass are kept: the teacher's numbers in a meaningless order.

    Args:
        bank: a probability-space (K x K) bank.
        kind: ``none`` (the bank itself) or one of the above.
        seed: the permutations of ``shuffled``.

    Raises:
        ValueError: an unknown ``kind``, or a control of a feature-space bank.
    """
    if kind not in BANK_CONTROLS:
        raise ValueError(f"unknown bank control {kind!r}; valid: {list(BANK_CONTROLS)}")
    if kind == "none":
        return bank
    if bank.space != "prob":
        raise ValueError(f"bank controls ({kind}) are defined for probability (K x K) banks, this one is {bank.space}")
    k = len(bank.class_names)
    g = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(k - 1, generator=g) for _ in range(k)]
    eye = torch.eye(k)

    def transform(p: torch.Tensor) -> torch.Tensor:
        if kind == "identity":
            out = eye.clone()
        elif kind == "flat":
            d = p.diagonal()
            out = ((1 - d) / max(k - 1, 1))[:, None].expand(k, k).clone()
            out[range(k), range(k)] = d
        else:
            out = p.clone()
            for i in range(k):
                cols = torch.tensor([j for j in range(k) if j != i])
                out[i, cols] = p[i, cols[perms[i]]]
        return out * bank.present[:, None].to(out.dtype)

    meta = {**bank.meta, "control": kind, "control_seed": int(seed) if kind == "shuffled" else None}
    return Bank(transform(bank.prototypes), bank.counts.clone(), list(bank.class_names), bank.tau, bank.space, meta,
                {t: transform(p) for t, p in bank.by_tau.items()})


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


# ---------------------------------------------------------------------------------- axial range
AXIAL_IGNORE = -1  # the label voxels outside the axial range get in the copy the bank reads


def check_axial_range(axial_range: Optional[Sequence[float]], key: str = "bank.axial_range") -> Optional[Tuple[float, float]]:
    """``(lo, hi)`` of a valid axial range (``None``: whole volumes).

    Raises:
        ValueError: not two finite numbers with ``0 <= lo < hi <= 1`` (the message names ``key``).
    """
    if axial_range is None:
        return None
    try:
        values = [float(v) for v in axial_range]
    except (TypeError, ValueError):
        values = []
    if len(values) != 2 or not all(math.isfinite(v) for v in values) or not 0.0 <= values[0] < values[1] <= 1.0:
        raise ValueError(f"{key} must be [lo, hi] with 0 <= lo < hi <= 1 (fractions of the volume's axial extent: "
                         f"0 = its first, most inferior slice, 1 = its last), got {axial_range!r}"
                         + ("; for phantom z coordinates in [-1, 1] use (z + 1) / 2 (phantom_axial_range)"
                            if len(values) == 2 and min(values) < 0 else ""))
    return values[0], values[1]


def phantom_axial_range(slice_z: Sequence[float]) -> List[float]:
    """The ``bank.axial_range`` of the phantom's normalised z range ``[z_lo, z_hi]`` (in ``[-1, 1]``).

    A phantom volume samples ``z`` linearly along its last axis (``np.linspace(-1, 1, Z)``), so a
    slice at ``z`` lies at fraction ``(z + 1) / 2`` of the volume's axial extent: the student's
    ``data.phantom.slice_z = [-0.6, 0.0]`` is ``[0.2, 0.5]``.
    """
    if len(slice_z) != 2 or not -1.0 <= float(slice_z[0]) < float(slice_z[1]) <= 1.0:
        raise ValueError(f"a phantom z range must be [z_lo, z_hi] with -1 <= z_lo < z_hi <= 1, got {list(slice_z)}")
    return [(float(z) + 1.0) / 2.0 for z in slice_z]


def axial_fractions(depth: int) -> torch.Tensor:
    """Axial position of each of ``depth`` slices as a fraction of the extent: ``i / (depth - 1)`` (float64)."""
    return torch.arange(depth, dtype=torch.float64) / max(depth - 1, 1)


def axial_masked_labels(label: torch.Tensor, axial_range: Optional[Tuple[float, float]], spatial_dims: int) -> torch.Tensor:
    """``label`` (``(B, 1, X, Y, Z)`` or ``(B, X, Y, Z)``) with the voxels outside ``axial_range`` set
    to :data:`AXIAL_IGNORE` (a new tensor; ``label`` itself is not changed). ``None``: ``label``."""
    if axial_range is None:
        return label
    if spatial_dims != 3:
        raise ValueError(f"bank.axial_range needs 3D volumes (the axial axis is the last of X, Y, Z); these data are {spatial_dims}D")
    lo, hi = axial_range
    f = axial_fractions(label.shape[-1])
    keep = ((f >= lo - 1e-9) & (f <= hi + 1e-9)).to(label.device)
    return label if bool(keep.all()) else label.masked_fill(~keep, AXIAL_IGNORE)


def warn_empty_classes(counts: torch.Tensor, class_names: Sequence[str], axial_range: Optional[Sequence[float]],
                       what: str = "prototype bank") -> List[str]:
    """Warn (and return them) when classes have no voxel in the bank: their rows are 0, not prototypes."""
    empty = [n for n, c in zip(class_names, counts.tolist()) if c <= 0]
    if empty:
        where = (f"in bank.axial_range={list(axial_range)} (fractions of the volumes' axial extent)"
                 if axial_range is not None else "in the accumulated voxels")
        warnings.warn(f"{what}: no voxel of the classes {empty} {where}: their rows are 0 with count 0, and a student "
                      "leaves them out; widen the range (or check the data) if they should be distilled", stacklevel=3)
    return empty


def _bank_values(logits: torch.Tensor, feats: Optional[torch.Tensor], space: str, tau: float,
                 extra_taus: Sequence[float], feature_layer: Optional[str] = None) -> torch.Tensor:
    """The per-voxel vectors a bank averages: softmax(logits / tau) (``prob``) or ``feats``, then the
    softmax at each of ``extra_taus``, side by side along the channels (one pass, one sum over processes)."""
    logits = logits.detach().float()
    if space == "prob":
        values = torch.softmax(logits / tau, dim=1)
    else:
        if feats is None:
            raise RuntimeError(f"feature hook on {feature_layer!r} captured nothing in this batch")
        values = feats.float()
    if extra_taus:
        values = torch.cat([values] + [torch.softmax(logits / t, dim=1) for t in extra_taus], dim=1)
    return values


class ClassSums(Metric):
    """Per-class sums and voxel counts of per-voxel vectors, summed over the processes when computed.

    States (reduced with ``sum`` across processes): ``sums`` ``(K, C)`` and ``counts`` ``(K,)``, both
    float64. :meth:`update` adds a batch's :func:`masked_class_sums` (labels outside ``[0, K)`` count
    in nothing); :meth:`compute` returns ``(sums, counts)`` over every process (under DDP a
    collective: every process must call it).

    Args:
        num_classes: K.
        channels: C, the length of the per-voxel vectors.
        kwargs: torchmetrics' ``Metric`` options (e.g. ``distributed_available_fn``).
    """

    full_state_update = False
    is_differentiable = False
    higher_is_better = None

    def __init__(self, num_classes: int, channels: int, **kwargs: Any):
        super().__init__(**kwargs)
        self.num_classes = int(num_classes)
        self.add_state("sums", torch.zeros(self.num_classes, int(channels), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("counts", torch.zeros(self.num_classes, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, values: torch.Tensor, label: torch.Tensor) -> None:
        """Add the sums of ``values`` ``(B, C, *spatial)`` per class of ``label`` (``(B, 1, *spatial)``)."""
        sums, counts = masked_class_sums(values, label, self.num_classes)
        self.sums += sums.double()
        self.counts += counts.double()

    def compute(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.sums, self.counts


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
            contribute (see the module docstring; 3D batches of whole-depth volumes). ``None``: all.
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
        self.axial_range = check_axial_range(axial_range)
        self._warned_empty = False
        self.extra_taus = sorted({float(t) for t in taus} - {self.tau}) if space == "prob" else []
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
        values = _bank_values(logits, feats, self.space, self.tau, self.extra_taus, self.feature_layer)
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
        parts = sums.split(sums.shape[1] // (1 + len(self.extra_taus)), dim=1)
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


# ---------------------------------------------------------------------------------- final bank
class _NetWithFeatures(nn.Module):
    """``net`` returning ``(logits, features)``: the features the hook captured in the same call, so a
    sliding window stitches them like the logits (MONAI's ``sliding_window_inference`` takes tuples,
    each output at its own scale)."""

    def __init__(self, net: nn.Module, hook: InputHook):
        super().__init__()
        self.net, self.hook = net, hook

    def forward(self, x: torch.Tensor):
        logits = self.net(x)
        return logits, self.hook.pop()


@contextmanager
def _features_through(module: nn.Module, feature_layer: Optional[str]) -> Iterator[bool]:
    """With ``feature_layer``: ``module.net`` returns ``(logits, features)`` inside the block (restored after)."""
    if feature_layer is None:
        yield False
        return
    net = getattr(module, "net", None)
    if not isinstance(net, nn.Module):
        raise ValueError("a feature-space bank needs a module whose network is `module.net` (the head is found by name in it)")
    hook = InputHook(net, feature_layer, which="input", detach=True)
    module.net = _NetWithFeatures(net, hook)
    try:
        yield True
    finally:
        module.net = net
        hook.remove()


def _hparam(module: nn.Module, key: str, default: Any) -> Any:
    hp = getattr(module, "hparams", None)
    return hp.get(key, default) if hasattr(hp, "get") else default


def _eval_outputs(module: nn.Module, batch: Dict[str, Any], features: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Eval-mode logits (and features) of a batch through the module's own inference path: its
    ``predict_logits`` (sliding window), after its input transform (``model_step``) if it has one."""
    if _hparam(module, "input_transform", "none") != "none":
        if features:
            raise ValueError(f"a feature-space bank of a network trained on {_hparam(module, 'input_transform', '')} inputs "
                             "is not supported (use bank.space=prob)")
        return module.model_step(batch, train=False)["logits"], None
    predict = getattr(module, "predict_logits", None) or module
    out = predict(batch["image"])
    return (out[0], out[1]) if features else (out, None)


def _batches(data: Any) -> Iterator[Dict[str, Any]]:
    """Batches of ``data``: a DataLoader (as it is), a Dataset (one volume a batch), a batch dict,
    or a list/tuple of these (in order)."""
    from torch.utils.data import DataLoader, Dataset

    items = data if isinstance(data, (list, tuple)) else [data]
    for item in items:
        if isinstance(item, dict):
            yield item
        elif isinstance(item, DataLoader):
            yield from item
        elif isinstance(item, Dataset) or (hasattr(item, "__getitem__") and hasattr(item, "__len__")):
            yield from DataLoader(item, batch_size=1, shuffle=False)
        else:
            raise TypeError(f"expected a DataLoader, a Dataset, a batch dict or a list of them, got {type(item).__name__}")


def _class_names(module: nn.Module, class_names: Optional[Sequence[str]]) -> List[str]:
    if class_names is None:
        class_names = getattr(module, "class_names", None)
        if class_names is None:
            raise ValueError(f"pass class_names: a {type(module).__name__} has no class_names attribute")
    return list(class_names)


def _world() -> Tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


@contextmanager
def _evaluating(module: nn.Module, device: Optional[torch.device]) -> Iterator[torch.device]:
    """``module`` in eval mode on ``device`` (default: where it is) inside the block; its mode and
    device are restored after."""
    params = list(module.parameters())
    before = params[0].device if params else torch.device("cpu")
    device = torch.device(device) if device is not None else before
    was_training = module.training
    module.to(device).eval()
    try:
        with torch.no_grad():
            yield device
    finally:
        module.to(before).train(was_training)


def _to(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


def _scan(module: nn.Module, data: Any, device: Optional[torch.device], max_batches: Optional[int],
          distributed: bool, step, make) -> Tuple[Any, int]:
    """Run ``step(batch) -> args`` over the batches (this process's share of them under DDP: batch
    ``i`` on rank ``i % world``), add each ``args`` to one torchmetrics ``Metric`` built by
    ``make(*args, distributed_available_fn=...)`` at the first batch, and return its ``compute()``
    over every batch of every process (states reduced by torchmetrics) and the number of samples."""
    world, rank = _world() if distributed else (1, 0)
    shared = lambda: world > 1  # noqa: E731
    metric, samples, first = None, SumMetric(distributed_available_fn=shared), None
    with _evaluating(module, device) as dev:
        samples = samples.to(dev)
        for i, batch in enumerate(_batches(data)):
            if max_batches is not None and i >= max_batches:
                break
            first = batch if first is None else first
            if i % world != rank:
                continue
            batch = _to(batch, dev)
            args = step(batch)
            metric = make(*args, distributed_available_fn=shared).to(dev) if metric is None else metric
            metric.update(*args)
            samples.update(float(batch["image"].shape[0]))
        if first is None:
            raise ValueError("no batch to run over: the data are empty")  # on every process: same batches
        if metric is None:  # fewer batches than processes: this one adds nothing, to states of the right shapes
            metric = make(*step(_to(first, dev)), distributed_available_fn=shared).to(dev)
            samples.update(0.0)
        result = metric.compute()
        volumes = int(samples.compute())
    return result, volumes


def final_bank(module: nn.Module, data: Any, class_names: Optional[Sequence[str]] = None, *, space: str = "prob",
               tau: float = 1.0, taus: Sequence[float] = (), feature_layer: Optional[str] = None,
               axial_range: Optional[Sequence[float]] = None, device: Optional[torch.device] = None,
               max_batches: Optional[int] = None, metadata: Optional[Dict[str, Any]] = None,
               distributed: bool = True) -> Bank:
    """The prototype bank of a trained module's eval-mode predictions over whole volumes (``mode: final``).

    The module runs in eval mode under ``no_grad`` (its mode and device are restored after) through
    its own inference path: ``predict_logits`` (sliding window when it has a ``roi_size``), after
    its input transform if it has one. Each class row is the mean, over every voxel of that class in
    every volume of ``data``, of ``softmax(logits / tau)`` (``space="prob"``: K x K, also at each of
    ``taus``) or of the input of ``feature_layer`` (``space="feature"``: K x D, stitched by the
    sliding window like the logits). ``counts`` are the voxels per class.

    Example (a notebook; ``cfg`` the run's config, ``module`` its trained module)::

        from lightning_distill.train import build_datamodule
        dm = build_datamodule(cfg, training=False); dm.setup()
        bank = final_bank(module, [dm.datasets["val"]], tau=1.0, taus=[0.5, 2.0])

    (``SubjectDataset(dm.source, dm.train_ids)`` gives the training volumes without augmentation.)

    Args:
        module: a trained module (``SegmentationModule`` or any ``nn.Module`` mapping images to logits).
        data: volumes: a Dataset (one volume a batch), a DataLoader, batch dicts with ``image``
            ``(B, C, *spatial)`` and ``label`` ``(B, 1, *spatial)``, or a list of these.
        class_names: the K classes (default: ``module.class_names``).
        space, tau, taus, feature_layer: as for :class:`PrototypeBank`.
        axial_range: ``[lo, hi]``: only voxels at these fractions of the volume's axial (last) axis
            (see the module docstring); ``None``: whole volumes.
        device: where to run (default: where the module is).
        max_batches: stop after this many batches (a smoke test); ``None``: all.
        metadata: extra entries for the bank's ``meta``.
        distributed: when a process group is initialised, share the batches among its processes
            and sum (every process must call this with the same data); the result is the same.

    Raises:
        ValueError: bad arguments, empty data, or no voxel of any class (in the axial range). A class
            without any voxel only warns (its row is 0, its count 0).
    """
    names = _class_names(module, class_names)
    if space not in ("prob", "feature"):
        raise ValueError(f"space must be 'prob' or 'feature', got {space!r}")
    if space == "feature" and not feature_layer:
        raise ValueError("space='feature' needs feature_layer (the name of the network's head module)")
    if tau <= 0 or any(t <= 0 for t in taus):
        raise ValueError(f"temperatures must be positive, got tau={tau}, taus={list(taus)}")
    rng = check_axial_range(axial_range)
    tau = float(tau)
    extra = sorted({float(t) for t in taus} - {tau}) if space == "prob" else []
    k = len(names)

    def step(batch):
        logits, feats = _eval_outputs(module, batch, space == "feature")
        if logits.shape[1] != k:
            raise ValueError(f"the module predicts {logits.shape[1]} classes, class_names has {k}: {names}")
        values = _bank_values(logits, feats, space, tau, extra, feature_layer)
        return values, axial_masked_labels(batch["label"], rng, logits.ndim - 2)

    def make(values, label, **kwargs):
        return ClassSums(k, values.shape[1], **kwargs)

    with _features_through(module, feature_layer if space == "feature" else None):
        (sums, counts), volumes = _scan(module, data, device, max_batches, distributed, step, make)
    sums, counts = sums.cpu(), counts.cpu()
    if not bool((counts > 0).any()):
        raise ValueError("the final bank has no voxel of any class"
                         + (f" in bank.axial_range={list(rng)}" if rng is not None else "") + ": nothing to average")
    if not distributed or _world()[1] == 0:  # the same bank on every process: one warning
        warn_empty_classes(counts, names, rng, "final prototype bank")
    parts = sums.split(sums.shape[1] // (1 + len(extra)), dim=1)
    means = [class_means(p, counts).float() for p in parts]
    meta = {"mode": "final", "feature_layer": feature_layer if space == "feature" else None,
            "axial_range": None if rng is None else list(rng), "volumes": volumes, **(metadata or {})}
    return Bank(means[0], counts, names, tau, space, meta, dict(zip(extra, means[1:])))


def class_reliability(module: nn.Module, data: Any, class_names: Optional[Sequence[str]] = None, *,
                      axial_range: Optional[Sequence[float]] = None, include_background: bool = False,
                      device: Optional[torch.device] = None, max_batches: Optional[int] = None,
                      distributed: bool = True) -> Dict[str, Dict[str, Any]]:
    """Per-class Dice, precision and recall of a module's eval-mode argmax over volumes, voxel counts
    pooled over every volume (not a mean of per-volume figures).

    ``dice = 2 TP / (2 TP + FP + FN)``, ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)``,
    ``voxels = TP + FN`` (the class's ground-truth voxels); a ratio with a zero denominator is
    ``None``. Voxels whose label is outside ``[0, K)`` (e.g. 255, ignored) and, with ``axial_range``,
    voxels outside it count in nothing. The module runs as in :func:`final_bank`.

    Returns:
        ``{class_name: {"dice", "precision", "recall", "voxels"}}`` (plain floats / ints / ``None``),
        without the first class (background) unless ``include_background``.
    """
    names = _class_names(module, class_names)
    rng = check_axial_range(axial_range)
    k = len(names)

    def step(batch):
        logits, _ = _eval_outputs(module, batch, False)
        if logits.shape[1] != k:
            raise ValueError(f"the module predicts {logits.shape[1]} classes, class_names has {k}: {names}")
        label = axial_masked_labels(batch["label"], rng, logits.ndim - 2)
        label = label[:, 0] if label.ndim == logits.ndim else label
        valid = (label >= 0) & (label < k)
        return logits.argmax(1)[valid], label[valid]

    def make(pred, label, **kwargs):  # per class: tp, fp, tn, fn, support (int64 counts)
        return MulticlassStatScores(k, average=None, validate_args=False, **kwargs)

    stats, _ = _scan(module, data, device, max_batches, distributed, step, make)
    tp, fp, fn = stats[:, 0].cpu(), stats[:, 1].cpu(), stats[:, 3].cpu()
    predicted, truth = tp + fp, tp + fn
    ratio = lambda a, b: None if b <= 0 else float(a / b)  # noqa: E731
    out = {}
    for i, name in enumerate(names):
        if i == 0 and not include_background:
            continue
        t, pr, gt = float(tp[i]), float(predicted[i]), float(truth[i])
        out[name] = {"dice": ratio(2 * t, pr + gt), "precision": ratio(t, pr), "recall": ratio(t, gt), "voxels": int(gt)}
    return out


def format_reliability(rel: Dict[str, Dict[str, Any]]) -> str:
    """One line per class: ``liver  dice 0.931  precision 0.95  recall 0.91  (12,345 voxels)``."""
    f = lambda v: "  n/a" if v is None else f"{v:.3f}"  # noqa: E731
    width = max((len(n) for n in rel), default=0)
    return "\n".join(f"  {n:<{width}}  dice {f(r['dice'])}  precision {f(r['precision'])}  recall {f(r['recall'])}  "
                     f"({r['voxels']:,} voxels)" for n, r in rel.items())
