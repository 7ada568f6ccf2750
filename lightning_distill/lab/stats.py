"""Paired statistics over test cases and learning curves (no package imports: benchmark reports and
``lightning-distill compare`` both use them)."""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import numpy as np


def case_scores(cases: Sequence[Dict[str, Any]]) -> Dict[str, float]:
    """``{case id: mean Dice over the organs present}`` (cases with no organ present are left out)."""
    out = {}
    for c in cases:
        vals = [v for v in c["dice"].values() if v is not None]
        if vals:
            out[c["id"]] = float(np.mean(vals))
    return out


def organ_scores(cases: Sequence[Dict[str, Any]], organ: str) -> Dict[str, float]:
    """``{case id: Dice of organ}`` over the cases whose ground truth has the organ."""
    return {c["id"]: float(c["dice"][organ]) for c in cases if c["dice"].get(organ) is not None}


def late_rise(curve: Optional[Sequence[Sequence[Any]]], steps: Optional[int]) -> Optional[float]:
    """How much the best validation Dice rose in the last quarter of training: ``max(all) − max(step <=
    0.75 · steps)`` over a learning curve of ``[step, val Dice, ...]`` points (the selected checkpoint
    is the best one, so this is what the last quarter could still add). ``None`` without a point in
    the first three quarters."""
    if not curve or not steps:
        return None
    pts = [(int(p[0]), float(p[1])) for p in curve if p[1] is not None]
    early = [d for st, d in pts if st <= 0.75 * steps]
    if not early:
        return None
    return max(d for _, d in pts) - max(early)


def paired_bootstrap(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], n: int = 2000,
                     seed: int = 0) -> Optional[Dict[str, float]]:
    """Mean paired difference ``a - b`` over common seeds and cases, with a two-level bootstrap 95% CI.

    Args:
        a, b: ``{seed: {case id: score}}`` of the two methods.
        n: bootstrap resamples.
        seed: RNG seed (the report is reproducible).

    Returns:
        ``{"mean", "lo", "hi", "seeds", "cases"}``, or ``None`` without a common seed and case.
    """
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    cases = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds]))
    if not cases:
        return None
    d = np.array([[a[s][c] - b[s][c] for c in cases] for s in seeds])  # seeds x cases
    rng = np.random.default_rng(seed)
    si = rng.integers(0, len(seeds), size=(n, len(seeds)))
    ci = rng.integers(0, len(cases), size=(n, len(cases)))
    stats = np.array([d[si[k]][:, ci[k]].mean() for k in range(n)])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": len(seeds), "cases": len(cases)}


def verdict(ci: Optional[Dict[str, float]]) -> str:
    if ci is None:
        return "n/a"
    if ci["lo"] > 0:
        return "better"
    if ci["hi"] < 0:
        return "worse"
    return "no clear difference"


def fmt_ci(ci: Optional[Dict[str, float]]) -> str:
    """``"+0.012 [-0.003, +0.027]"`` of a :func:`paired_bootstrap` result (``"n/a"`` for ``None``)."""
    return "n/a" if ci is None else f"{ci['mean']:+.3f} [{ci['lo']:+.3f}, {ci['hi']:+.3f}]"
