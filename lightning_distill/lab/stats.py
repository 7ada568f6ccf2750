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
    d = paired_differences(a, b)
    if d is None:
        return None
    n_seeds, n_cases = d.shape
    rng = np.random.default_rng(seed)
    si = rng.integers(0, n_seeds, size=(n, n_seeds))
    ci = rng.integers(0, n_cases, size=(n, n_cases))
    stats = np.array([d[si[k]][:, ci[k]].mean() for k in range(n)])
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return {"mean": float(d.mean()), "lo": float(lo), "hi": float(hi), "seeds": n_seeds, "cases": n_cases}


def paired_differences(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]]) -> Optional[np.ndarray]:
    """``a − b`` over the seeds both have and the cases every one of those seeds has, as a ``(seeds, cases)``
    array (sorted seeds and case ids), or ``None`` without a common seed and case."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    cases = sorted(set.intersection(*[set(a[s]) & set(b[s]) for s in seeds]))
    if not cases:
        return None
    return np.array([[a[s][c] - b[s][c] for c in cases] for s in seeds])


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


def share_of_headroom(a: Dict[int, Dict[str, float]], b: Dict[int, Dict[str, float]], ceiling: Sequence[float],
                      below: Sequence[float], n: int = 2000, seed: int = 0) -> Optional[Dict[str, float]]:
    """The share of the headroom a method closes: ``Δ(a − b) / (mean(ceiling) − mean(below))``, with a bootstrap
    95% CI.

    Args:
        a, b: ``{seed: {case id: score}}`` of the method and the baseline (Δ as :func:`paired_bootstrap`).
        ceiling, below: per-seed mean Dice of the plain model at the ceiling size and at this size, from a
            headroom benchmark (an independent set of runs): each resampled over its seeds.
        n, seed: bootstrap resamples and RNG seed.

    Returns:
        ``{"mean", "lo", "hi", "headroom", "headroom_lo", "headroom_hi"}``, or ``None`` without data; ``mean``,
        ``lo`` and ``hi`` are ``None`` when the headroom's own CI reaches 0 (no measurable headroom to share).
    """
    d = paired_differences(a, b)
    if d is None or not len(ceiling) or not len(below):
        return None
    n_seeds, n_cases = d.shape
    top, low = np.asarray(ceiling, float), np.asarray(below, float)
    rng = np.random.default_rng(seed)
    deltas, rooms = np.empty(n), np.empty(n)
    for k in range(n):
        si = rng.integers(0, n_seeds, n_seeds)
        ci = rng.integers(0, n_cases, n_cases)
        deltas[k] = d[si][:, ci].mean()
        rooms[k] = top[rng.integers(0, len(top), len(top))].mean() - low[rng.integers(0, len(low), len(low))].mean()
    room = float(top.mean() - low.mean())
    r_lo, r_hi = np.percentile(rooms, [2.5, 97.5])
    out = {"headroom": room, "headroom_lo": float(r_lo), "headroom_hi": float(r_hi), "mean": None, "lo": None, "hi": None}
    if r_lo > 0:
        lo, hi = np.percentile(deltas / rooms, [2.5, 97.5])
        out.update(mean=float(d.mean()) / room, lo=float(lo), hi=float(hi))
    return out


def fmt_share(s: Optional[Dict[str, Any]]) -> str:
    """``"+35% [-10%, +80%]"`` of a :func:`share_of_headroom` result."""
    if s is None:
        return "n/a"
    if s["mean"] is None:
        return f"n/a (headroom {s['headroom']:+.3f} [{s['headroom_lo']:+.3f}, {s['headroom_hi']:+.3f}] reaches 0)"
    return f"{100 * s['mean']:+.0f}% [{100 * s['lo']:+.0f}%, {100 * s['hi']:+.0f}%]"
