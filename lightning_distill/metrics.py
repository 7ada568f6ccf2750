"""Per-organ segmentation metrics (MONAI computes, torchmetrics aggregates across processes).

How absent classes count (documented in docs/cli.md, "Metrics"):

* Dice of organ k on a case is MONAI's ``compute_dice`` with ``ignore_empty=True``: NaN when the
  ground truth has no pixel of k. NaNs are left out of every mean, so an organ's Dice is the mean over
  the cases that contain it. A false positive on a case without the organ is not counted in Dice.
* HD95 (MONAI ``compute_hausdorff_distance``, percentile 95, in mm using the case's spacing) is NaN
  when the ground truth is empty; when the ground truth is present but the prediction is empty, it is
  the diagonal of the image in mm (the largest distance possible), so a missed organ is penalised.
* Surface Dice (normalised surface distance, NSD; MONAI ``compute_surface_dice``, in mm using the
  case's spacing) is the fraction of the boundary pixels of prediction and ground truth together that
  lie within the tolerance of the other's boundary. The tolerance defaults to one voxel: per case, the
  largest spacing of that case. It is NaN when the ground truth has no pixel of k (MONAI returns 0
  when only the prediction has k; that false positive is not counted, as in Dice), and 0 when the
  ground truth is present but the prediction is empty (as MONAI returns).
* HD95 and surface Dice are read from the same boundary distances, computed once per case and class
  (:func:`per_case_surface_metrics`); the values are those of MONAI's two functions (tested).
* ``dice_mean`` is the mean over organs (foreground classes) of the per-organ means (likewise
  ``hd95_mean`` and ``surface_dice_mean``).
"""

from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from monai.metrics import compute_dice
from monai.metrics.utils import get_edge_surface_distance
from torch import Tensor
from torchmetrics import MeanMetric

from lightning_distill.devices import process_group_size


def one_hot(labels: Tensor, num_classes: int) -> Tensor:
    """``(B, 1, *spatial)`` or ``(B, *spatial)`` labels -> ``(B, K, *spatial)`` float one-hot."""
    if labels.ndim >= 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    labels = labels.long().clamp(0, num_classes - 1)
    return F.one_hot(labels, num_classes).movedim(-1, 1).float()


def per_case_dice(pred: Tensor, label: Tensor, num_classes: int) -> Tensor:
    """Dice per case and foreground class.

    Args:
        pred: ``(B, *spatial)`` or ``(B, 1, *spatial)`` predicted labels.
        label: ground truth, same form.
        num_classes: K (background is class 0).

    Returns:
        ``(B, K - 1)`` Dice, NaN where the ground truth lacks the class.
    """
    return compute_dice(one_hot(pred, num_classes), one_hot(label, num_classes), include_background=False, ignore_empty=True)


def per_case_surface_metrics(pred: Tensor, label: Tensor, num_classes: int,
                             spacing: Optional[Sequence[Sequence[float]]] = None,
                             tolerance_mm: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """HD95 and surface Dice (NSD) per case and foreground class from one pass over the boundaries.

    Both metrics are read from the same boundary-to-boundary distances (MONAI's
    ``get_edge_surface_distance``, Euclidean, in mm using the case's spacing), which are computed once
    per case and class: the values are those of MONAI's ``compute_hausdorff_distance`` (percentile 95)
    and ``compute_surface_dice`` (tested), in about half the time. Empty masks: see the module docstring.

    Args:
        pred: ``(B, *spatial)`` or ``(B, 1, *spatial)`` predicted labels (2D or 3D).
        label: ground truth, same form.
        num_classes: K (background is class 0).
        spacing: per-case voxel spacing ``(B, ndim)`` in mm; 1 mm if ``None``.
        tolerance_mm: NSD's boundary tolerance in mm, the same for every class; ``None``: one voxel,
            i.e. per case the largest spacing of that case.

    Returns:
        ``(hd95, nsd)``, each a ``(B, K - 1)`` float tensor.
    """
    p, y = one_hot(pred, num_classes), one_hot(label, num_classes)
    b, spatial = p.shape[0], p.shape[2:]
    sp = np.ones((b, len(spatial))) if spacing is None else np.asarray(spacing, dtype=float).reshape(b, len(spatial))
    hd = torch.empty((b, num_classes - 1), dtype=torch.float)
    nsd = torch.empty((b, num_classes - 1), dtype=torch.float)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MONAI warns on every empty mask; handled below
        for i in range(b):
            tol = float(sp[i].max()) if tolerance_mm is None else float(tolerance_mm)
            for c in range(1, num_classes):
                _, (to_gt, to_pred), _ = get_edge_surface_distance(p[i, c], y[i, c], distance_metric="euclidean",
                                                                   spacing=sp[i], symmetric=True, class_index=c)
                hd[i, c - 1] = torch.max(torch.stack([_percentile_95(to_gt), _percentile_95(to_pred)])).cpu()
                edges = len(to_gt) + len(to_pred)  # boundary pixels of prediction and ground truth
                within = torch.sum(to_gt <= tol) + torch.sum(to_pred <= tol)
                nsd[i, c - 1] = float("nan") if edges == 0 else (within / edges).cpu()
    gt_present = y[:, 1:].flatten(2).sum(-1).cpu() > 0
    pred_present = p[:, 1:].flatten(2).sum(-1).cpu() > 0
    # HD95: the image's diagonal in mm where the organ is missed; NSD: MONAI gives 0 there already
    diag = torch.tensor([math.sqrt(sum((n * s) ** 2 for n, s in zip(spatial, row))) for row in sp], dtype=torch.float)
    hd = torch.where(gt_present & ~pred_present, diag[:, None].expand_as(hd), hd)
    nan = torch.full_like(hd, float("nan"))  # no ground truth: a false positive is not counted (as in Dice)
    return torch.where(gt_present, hd, nan), torch.where(gt_present, nsd, nan)


def _percentile_95(distances: Tensor) -> Tensor:
    """The 95th percentile of one direction's boundary distances (NaN when that boundary is empty)."""
    if distances.numel() == 0:
        return torch.tensor(float("nan"), dtype=torch.float, device=distances.device)
    return torch.quantile(distances, 0.95)


def per_case_hd95(pred: Tensor, label: Tensor, num_classes: int, spacing: Optional[Sequence[Sequence[float]]] = None) -> Tensor:
    """HD95 in mm per case and foreground class: :func:`per_case_surface_metrics`' first table."""
    return per_case_surface_metrics(pred, label, num_classes, spacing)[0]


def per_case_surface_dice(pred: Tensor, label: Tensor, num_classes: int, spacing: Optional[Sequence[Sequence[float]]] = None,
                          tolerance_mm: Optional[float] = None) -> Tensor:
    """Surface Dice (NSD) per case and foreground class: :func:`per_case_surface_metrics`' second table."""
    return per_case_surface_metrics(pred, label, num_classes, spacing, tolerance_mm)[1]


def nanmean(x: Tensor, dim: int = 0) -> Tensor:
    return torch.nanmean(x.float(), dim=dim)


def summarize(dice: Tensor, hd95: Optional[Tensor], organs: Sequence[str], surface_dice: Optional[Tensor] = None) -> Dict:
    """Per-organ means (NaN ignored) of ``(N, K - 1)`` per-case tables -> a JSON-ready dict."""

    def clean(v: float) -> Optional[float]:
        return None if math.isnan(v) else float(v)

    d = nanmean(dice)
    out: Dict = {"dice": {o: clean(float(v)) for o, v in zip(organs, d)}}
    out["dice_mean"] = clean(float(torch.nanmean(d)))
    if hd95 is not None:
        h = nanmean(hd95)
        out["hd95"] = {o: clean(float(v)) for o, v in zip(organs, h)}
        out["hd95_mean"] = clean(float(torch.nanmean(h)))
    if surface_dice is not None:
        sd = nanmean(surface_dice)
        out["surface_dice"] = {o: clean(float(v)) for o, v in zip(organs, sd)}
        out["surface_dice_mean"] = clean(float(torch.nanmean(sd)))
    out["num_cases"] = int(dice.shape[0])
    return out


def format_table(summary: Dict, title: str = "") -> str:
    """A per-organ markdown table of :func:`summarize` output."""
    organs = list(summary["dice"])
    has_hd = "hd95" in summary
    has_sd = "surface_dice" in summary
    lines = [title] if title else []
    lines.append("| organ | Dice |" + (" surface Dice |" if has_sd else "") + (" HD95 (mm) |" if has_hd else ""))
    lines.append("|---|---|" + ("---|" if has_sd else "") + ("---|" if has_hd else ""))

    def f(v, nd):
        return "n/a" if v is None else f"{v:.{nd}f}"

    for o in organs:
        lines.append(f"| {o} | {f(summary['dice'][o], 3)} |" + (f" {f(summary['surface_dice'].get(o), 3)} |" if has_sd else "")
                     + (f" {f(summary['hd95'][o], 1)} |" if has_hd else ""))
    lines.append(f"| **mean** | **{f(summary['dice_mean'], 3)}** |"
                 + (f" **{f(summary.get('surface_dice_mean'), 3)}** |" if has_sd else "")
                 + (f" **{f(summary['hd95_mean'], 1)}** |" if has_hd else ""))
    return "\n".join(lines)


def collect_cases(ids: List[str], dice: Tensor, hd95: Optional[Tensor], organs: Sequence[str],
                  surface_dice: Optional[Tensor] = None) -> List[Dict]:
    """Per-case records for ``results.json`` (benchmarks bootstrap over them)."""
    rows = []
    for i, cid in enumerate(ids):
        row = {"id": cid, "dice": {o: (None if math.isnan(float(v)) else float(v)) for o, v in zip(organs, dice[i])}}
        if hd95 is not None:
            row["hd95"] = {o: (None if math.isnan(float(v)) else float(v)) for o, v in zip(organs, hd95[i])}
        if surface_dice is not None:
            row["surface_dice"] = {o: (None if math.isnan(float(v)) else float(v)) for o, v in zip(organs, surface_dice[i])}
        rows.append(row)
    return rows


class CaseMeans:
    """Per-column means over the cases of an evaluation pass, each case counted once, also under DDP.

    Under DDP Lightning's distributed sampler pads the evaluation set so every process gets as many
    batches, repeating cases: a metric averaged over the processes' batches counts those twice (and
    ``val/dice`` picks ``best.ckpt``). Here every process keeps its cases' rows with their ids;
    :meth:`compute` gathers them (a collective: every process calls it), keeps each id's first row
    and averages every column over its non-NaN entries. In one process the result equals torchmetrics'
    ``MeanMetric(nan_strategy="ignore")`` fed batch by batch, bit for bit (it is what computes it).

    Args:
        columns: M, the number of values per case (e.g. one per organ).
    """

    def __init__(self, columns: int):
        self.columns = int(columns)
        self.reset()

    def reset(self) -> None:
        self._chunks: List[tuple] = []

    def update(self, ids: Sequence[str], values: Tensor) -> None:
        """Add ``values`` ``(B, M)`` of the cases ``ids`` (B names)."""
        if values.ndim != 2 or values.shape != (len(ids), self.columns):
            raise ValueError(f"values must be ({len(ids)}, {self.columns}) for {len(ids)} cases, got {tuple(values.shape)}")
        self._chunks.append((list(ids), values.detach().float().cpu()))

    def compute(self) -> Tensor:
        """``(M,)`` means over the unique cases of every process (NaN for a column without a value)."""

        chunks = self._chunks
        world = process_group_size()
        if world > 1:
            gathered: List = [None] * world
            torch.distributed.all_gather_object(gathered, chunks)
            chunks = [c for part in gathered for c in part]
        seen: set = set()
        means = [MeanMetric(nan_strategy="ignore", sync_on_compute=False) for _ in range(self.columns)]
        for ids, values in chunks:
            keep = [i for i, cid in enumerate(ids) if not (cid in seen or seen.add(cid))]
            if keep:
                for j, m in enumerate(means):
                    m.update(values[keep, j])
        return torch.stack([m.compute() if m.update_called else torch.tensor(float("nan")) for m in means])

    @property
    def num_cases(self) -> int:
        """Rows added on this process (duplicates included)."""
        return sum(len(ids) for ids, _ in self._chunks)
