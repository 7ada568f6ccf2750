"""The benchmark report's PNG plots: Dice against the training size, per-organ Dice, the route gains
against the headroom and the teachers, the headroom curve, and the learning curves."""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from lightning_distill.lab.bench_grid import runs_at
from lightning_distill.lab.bench_table import OWN_TEST, Table, dice_of, mean_of, scores_of
from lightning_distill.visuals import new_figure


def plot_learning_curves(tab: Table, path: Path) -> bool:
    """Validation Dice against the training step, mean over seeds, one panel per (arch, fraction)."""
    panels = [(a, f) for a in tab.archs for f in tab.fractions]
    if not any(tab.curves(a, f, m) for a, f in panels for m in tab.methods):
        return False
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(rows, cols, figsize=(4.4 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, (a, f) in zip(axes.flat, panels):
        for m in tab.methods:
            by_step: Dict[int, List[float]] = {}
            for curve in tab.curves(a, f, m).values():
                for p in curve:
                    if p[1] is not None:
                        by_step.setdefault(int(p[0]), []).append(float(p[1]))
            if by_step:
                xs = sorted(by_step)
                ax.plot(xs, [statistics.mean(by_step[x]) for x in xs], label=m, lw=1.2,
                        color=f"C{tab.methods.index(m) % 10}")  # one colour per method in every panel
        ax.set_title(f"{a}, fraction {tab.frac_label(f)}", fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)  # each panel: the methods run at this fraction differ (fractions_of)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("validation Dice (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def plot_dice_vs_fraction(tab: Table, path: Path) -> None:
    panels = [(ts, a) for ts in tab.test_sets for a in tab.archs]
    cols = min(len(panels), 3)
    rows = math.ceil(len(panels) / cols)
    fig, axes = new_figure(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False, sharey=True)
    for ax, (ts, a) in zip(axes.flat, panels):
        for m in tab.methods:
            xs, ys, es = [], [], []
            for f in tab.fractions:
                vals = [v for v in tab.dice(ts, a, f, m) if v is not None]
                if vals:
                    xs.append(tab.subjects.get(f, f))
                    ys.append(statistics.mean(vals))
                    es.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=m)
        ax.set_xscale("log")
        ax.set_title(a if ts == OWN_TEST else f"{a}, {ts}", fontsize=10)
        ax.set_xlabel("training subjects")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    axes[0][0].set_ylabel("mean test Dice")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def plot_route_gains(tab: Table, path: Path) -> bool:
    """One panel per architecture (own test split): every method's Δ against the baseline at every fraction with its
    CI, and as reference lines at each size the headroom (``headroom_from``, else the grid's own ceiling with
    ``headroom: true``) and each teacher scored on the students' slices minus the baseline there."""
    base = tab.cfg.baseline
    methods = [m for m in tab.methods if m != base]
    if not methods:
        return False
    fig, axes = new_figure(1, len(tab.archs), figsize=(max(5.0, 0.7 * len(methods) + 2.5) * len(tab.archs) + 2.5, 4.0),
                           squeeze=False)
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown"]
    width = 0.8 / max(1, len(tab.fractions))
    for ax, a in zip(axes[0], tab.archs):
        for i, f in enumerate(tab.fractions):
            c = colors[i % len(colors)]
            xs, ys, lo, hi = [], [], [], []
            for j, m in enumerate(methods):
                d = tab.diff(OWN_TEST, a, f, m) if runs_at(tab.cfg, m, f) else None
                if d is not None:
                    xs.append(j + (i - (len(tab.fractions) - 1) / 2) * width)
                    ys.append(d["mean"])
                    lo.append(d["mean"] - d["lo"])
                    hi.append(d["hi"] - d["mean"])
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", color=c, capsize=3, label=f"{tab.frac_label(f)} subjects")
            room = _headroom_at(tab, a, f)
            if room is not None:
                ax.axhline(room, color=c, ls="--", lw=1, label=f"ceiling − {base} at {tab.frac_label(f)}")
            base_cases = tab.scores(OWN_TEST, a, f, base)
            for k, (r, t) in enumerate(tab.scored_teachers(OWN_TEST)):  # one line style per teacher
                teacher = scores_of(t["test_cases"])
                gaps = [teacher[cid] - v for sc in base_cases.values() for cid, v in sc.items() if cid in teacher]
                if gaps:
                    ax.axhline(statistics.mean(gaps), color=c, ls=[":", "-.", (0, (1, 3))][k % 3], lw=1.2,
                               label=f"{r.get('instance')} − {base} at {tab.frac_label(f)}")
        ax.axhline(0.0, color="black", lw=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"Dice gain over the {base}")
        ax.set_title(a, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the panel: many reference lines
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def _headroom_at(tab: Table, arch: str, frac: float) -> Optional[float]:
    """headroom(n) at a fraction's number of subjects: from ``headroom_from``, else the grid's own ceiling
    (``headroom: true``); ``None`` without either."""
    if tab.cfg.headroom_from:
        runs, n = tab.headroom_runs(arch), tab.subjects.get(frac)
        if runs and n in runs:
            return statistics.mean(runs[max(runs)]) - statistics.mean(runs[n])
        return None
    if tab.cfg.headroom and frac != tab.fractions[-1]:
        d = tab.diff(OWN_TEST, arch, tab.fractions[-1], tab.cfg.baseline, other_frac=frac)
        return None if d is None else d["mean"]
    return None


def plot_headroom(tab: Table, path: Path) -> bool:
    """The baseline's test Dice against the training subjects (own test split, first architecture), mean Dice
    and one panel per organ, with every teacher scored on the students' slices as a dashed line."""
    if not tab.cfg.headroom or len(tab.fractions) < 2:
        return False
    a, base = tab.archs[0], tab.cfg.baseline
    organs = [None, *tab.organs]
    teachers = tab.scored_teachers(OWN_TEST)
    cols = min(len(organs), 5)
    rows = math.ceil(len(organs) / cols)
    fig, axes = new_figure(rows, cols, figsize=(3.1 * cols, 2.7 * rows), squeeze=False)
    import matplotlib

    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, o in zip(axes.flat, organs):
        xs, means = [], []
        for f in tab.fractions:
            vals = [v for v in (dice_of(t["test"], o) for t in tab.runs(OWN_TEST, a, f, base).values()) if v is not None]
            if vals:
                x = tab.subjects.get(f, f)
                ax.scatter([x] * len(vals), vals, s=10, color=colors[0], alpha=0.5)
                xs.append(x)
                means.append(statistics.mean(vals))
        ax.plot(xs, means, marker="o", color=colors[0], label=base)
        for i, (r, t) in enumerate(teachers):
            v = dice_of(t["test"], o)
            if v is not None:
                ax.axhline(v, ls="--", color=colors[(i + 1) % len(colors)], label=f"{r.get('instance')} (teacher)")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{x:g}" for x in xs], minor=False)
        ax.minorticks_off()
        ax.set_title("mean Dice" if o is None else o, fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(organs):]:
        ax.axis("off")
    axes[0][0].set_xlabel("training subjects", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    return True


def plot_organs(tab: Table, path: Path) -> None:
    fracs = sorted({tab.fractions[0], tab.fractions[-1]})
    bars = [(m, f) for f in fracs for m in tab.methods]
    fig, axes = new_figure(len(tab.archs), 1, figsize=(max(6, 1.1 * len(tab.organs) + 2), 3.0 * len(tab.archs)),
                             squeeze=False, sharey=True)
    import matplotlib

    width = 0.8 / len(bars)
    x = np.arange(len(tab.organs))
    colors = matplotlib.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, a in zip(axes[:, 0], tab.archs):
        for i, (m, f) in enumerate(bars):
            runs = tab.runs(OWN_TEST, a, f, m)
            vals = [mean_of([t["test"]["dice"][o] for t in runs.values()]) for o in tab.organs]
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width,
                   color=colors[tab.methods.index(m) % len(colors)], alpha=0.55 if f != fracs[-1] else 1.0,
                   hatch="//" if f != fracs[-1] else None, label=f"{m}, fraction {f:g}")
        ax.set_xticks(x)
        ax.set_xticklabels(tab.organs, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("Dice")
        ax.set_ylim(0, 1)
        ax.set_title(a, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
