"""Markdown tables from runs' ``results.json`` files (used to write ``docs/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence

from lightning_distill.visuals import new_figure


def load_results(run_dir: str | Path, name: str = "results.json") -> dict:
    p = Path(run_dir)
    p = p / name if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (has the run finished?)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); the file is truncated or corrupt") from e


def compare_table(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None) -> str:
    """One row per organ, one Dice column per run (surface Dice, when recorded, and HD95 in more tables), means last."""
    results = [load_results(r) for r in run_dirs]
    names = list(names) if names else [Path(r).name for r in run_dirs]
    organs: List[str] = list(results[0]["test"]["dice"])

    def f(v, nd):
        return "n/a" if v is None else f"{v:.{nd}f}"

    out = []
    tables = [("dice", 3, "dice_mean", "Dice"), ("hd95", 1, "hd95_mean", "HD95 (mm)")]
    if any("surface_dice" in r["test"] for r in results):  # runs from before surface Dice show n/a
        tables.insert(1, ("surface_dice", 3, "surface_dice_mean", "surface Dice"))
    for metric, nd, mean_key, title in tables:
        out.append(f"| {title} | " + " | ".join(names) + " |")
        out.append("|---|" + "---|" * len(names))
        for o in organs:
            out.append(f"| {o} | " + " | ".join(f(r["test"].get(metric, {}).get(o), nd) for r in results) + " |")
        out.append("| **mean** | " + " | ".join(f"**{f(r['test'].get(mean_key), nd)}**" for r in results) + " |")
        out.append("")
    out.append("| run | test subjects | training subjects | wall time (s) |")
    out.append("|---|---|---|---|")
    for n, r in zip(names, results):
        out.append(f"| {n} | {r['test'].get('num_cases')} | {r.get('train_subjects')} | {r.get('wall_time_s')} |")
    return "\n".join(out) + "\n"


def plot_dice(run_dirs: Sequence[str | Path], path: str | Path, names: Sequence[str] | None = None) -> None:
    """Grouped bars of per-organ test Dice, one colour per run, saved as PNG."""
    import numpy as np

    results = [load_results(r) for r in run_dirs]
    names = list(names) if names else [Path(r).name for r in run_dirs]
    organs = list(results[0]["test"]["dice"])
    x = np.arange(len(organs) + 1)
    w = 0.8 / len(results)
    fig, ax = new_figure(figsize=(1.1 * len(x) + 2, 4))
    for i, (n, r) in enumerate(zip(names, results)):
        vals = [r["test"]["dice"].get(o) for o in organs] + [r["test"].get("dice_mean")]
        ax.bar(x + (i - (len(results) - 1) / 2) * w, [np.nan if v is None else v for v in vals], w, label=n)
    ax.set_xticks(x, organs + ["mean"], rotation=30, ha="right")
    ax.set_ylabel("test Dice")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def plot_bank(bank_path: str | Path, path: str | Path) -> None:
    """Heatmap of a prototype bank (rows: classes; columns: predicted classes or features)."""
    from lightning_distill.bank.format import load_bank

    bank = load_bank(bank_path)
    p = bank.prototypes
    fig, ax = new_figure(figsize=(6, 5))
    if bank.space == "prob":
        im = ax.imshow(p.clamp_min(1e-4).log10(), cmap="viridis", vmin=-4, vmax=0)
        fig.colorbar(im, label="log10 mean probability")
        ax.set_xticks(range(len(bank.class_names)), bank.class_names, rotation=90)
        ax.set_xlabel("predicted class")
    else:
        im = ax.imshow(p, cmap="coolwarm", aspect="auto")
        fig.colorbar(im, label="mean feature")
        ax.set_xlabel("feature channel")
    ax.set_yticks(range(len(bank.class_names)), bank.class_names)
    ax.set_ylabel("ground-truth class")
    ax.set_title(f"prototype bank ({bank.space}, tau={bank.tau:g})")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def grid_groups(run_dirs: Sequence[str | Path], results_name: str = "results.json") -> dict:
    """Runs pooled over seeds: ``{(training subjects, method, model, encoder): [results, ...]}``.

    ``method`` is the run's :func:`~lightning_distill.config.run.run_label` (``teacher``, ``baseline``, ``distilled``, ``sikd``, ...).
    Each run directory needs its results file and ``config.yaml``; an extra evaluation written by
    ``lightning-distill test`` takes the training size from the run's own ``results.json``.
    """
    from omegaconf import OmegaConf

    from lightning_distill.config.run import run_label

    groups: dict = {}
    for d in run_dirs:
        r = load_results(d, results_name)
        n = r["train_subjects"] if "train_subjects" in r else load_results(d)["train_subjects"]
        cfg = OmegaConf.load(Path(d) / "config.yaml")
        method = run_label(cfg)
        groups.setdefault((n, method, cfg.model.name, cfg.model.encoder), []).append(r)
    return groups


def mean_sd(vals) -> tuple:
    """``(mean, sample std)`` of the values that are not None/NaN (std 0 for one value; ``(None, None)`` for none)."""
    import math
    import statistics

    vals = [v for v in vals if v is not None and not math.isnan(v)]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def fmt_mean_sd(vals, nd: int = 3) -> str:
    """``"m ± sd"`` of :func:`mean_sd` (``"n/a"`` without values)."""
    m, sd = mean_sd(vals)
    return "n/a" if m is None else f"{m:.{nd}f} ± {sd:.{nd}f}"


def grid_table(run_dirs: Sequence[str | Path], results_name: str = "results.json") -> str:
    """Mean ± std over seeds of test Dice per method, model and training size (see :func:`grid_groups`)."""
    groups = grid_groups(run_dirs, results_name)
    organs = list(next(iter(groups.values()))[0]["test"]["dice"])

    out = ["| training subjects | method | model | seeds | mean Dice | " + " | ".join(organs) + " |",
           "|---|---|---|---|---|" + "---|" * len(organs)]
    for (n, method, name, enc), rs in sorted(groups.items()):
        out.append(f"| {n} | {method} | {name}/{enc} | {len(rs)} | {fmt_mean_sd([r['test']['dice_mean'] for r in rs])} | "
                   + " | ".join(fmt_mean_sd([r["test"]["dice"][o] for r in rs]) for o in organs) + " |")
    return "\n".join(out) + "\n"


def plot_grid(run_dirs: Sequence[str | Path], path: str | Path, results_name: str = "results.json") -> None:
    """Mean test Dice (± std over seeds) against training subjects, one line per method and model."""
    lines: dict = {}
    for (n, method, model, _), rs in grid_groups(run_dirs, results_name).items():
        lines.setdefault((method, model), {})[n] = mean_sd([r["test"]["dice_mean"] for r in rs])
    fig, ax = new_figure(figsize=(5.5, 4))
    for (method, model), by_n in sorted(lines.items()):
        ns = sorted(by_n)
        ax.errorbar(ns, [by_n[n][0] for n in ns], yerr=[by_n[n][1] for n in ns], marker="o", capsize=3,
                    label=f"{method} ({model})")
    ax.set_xscale("log")
    ax.set_xlabel("training subjects (single slices)")
    ax.set_ylabel("mean test Dice (± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
