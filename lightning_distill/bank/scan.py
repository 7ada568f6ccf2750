"""A trained module over whole volumes, offline: the ``final`` bank and the teacher's reliability.

* :func:`final_bank` (``bank.source=final``): after training, from one set of weights (``fit`` uses
  the best checkpoint by ``val/dice``; the last weights, with a warning, when there is none) in eval
  mode, under ``no_grad``, over whole volumes of ``bank.final_split`` (``train``: the training volumes
  without augmentation or crops; ``val``; ``both``) through the module's ``predict_logits`` (sliding
  window when the module has a ``roi_size``). Same accumulation as the training callback (every
  temperature, ``prob`` or ``feature`` space, the feature map through the same hook by module name,
  stitched by the sliding window like the logits). It is a plain function: call it from a notebook on
  any trained module (see its docstring).
* :func:`class_reliability` (``fit`` records it for every teacher run with a validation split,
  whatever the source): per class, on the validation volumes with the bank's weights (best
  checkpoint, eval mode; the same argmax as validation), voxel counts pooled over every volume:
  ``dice = 2 TP / (2 TP + FP + FN)``, ``precision = TP / (TP + FP)``, ``recall = TP / (TP + FN)`` and
  ``voxels = TP + FN`` (ground-truth voxels); a ratio whose denominator is 0 is ``None``. Background
  (the first class) is not listed (its figures are dominated by its size; a student keeps its row at
  weight 1). With an axial range the figures are over the same range as the bank (the voxels its rows
  are means of), not over whole volumes. Stored as ``meta["reliability"] = {class_name: {"dice",
  "precision", "recall", "voxels"}}`` with ``meta["reliability_split"] = "val"`` (and
  ``reliability_checkpoint``); a run without a validation split records no ``reliability`` key and
  says so. A student reads it with ``distill.row_weight=reliability`` / ``distill.min_reliability``.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics.aggregation import SumMetric
from torchmetrics.classification import MulticlassStatScores

from lightning_distill.bank.accumulate import ClassSums, bank_values, check_options, split_taus
from lightning_distill.bank.axial import axial_masked_labels, check_axial_range, warn_empty_classes
from lightning_distill.bank.format import Bank
from lightning_distill.losses.prototype import class_means
from lightning_distill.networks import InputHook

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

        from lightning_distill.data.build import build_datamodule
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
            (see :mod:`lightning_distill.bank.axial`); ``None``: whole volumes.
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
    extra = check_options(space, tau, taus, feature_layer)
    rng = check_axial_range(axial_range)
    tau = float(tau)
    k = len(names)

    def step(batch):
        logits, feats = _eval_outputs(module, batch, space == "feature")
        if logits.shape[1] != k:
            raise ValueError(f"the module predicts {logits.shape[1]} classes, class_names has {k}: {names}")
        values = bank_values(logits, feats, space, tau, extra, feature_layer)
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
    parts = split_taus(sums, extra)
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
