"""Markdown tables from runs' ``results.json`` files (used to write ``docs/``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Sequence


def load_results(run_dir: str | Path) -> dict:
    p = Path(run_dir)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist (has the run finished?)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{p} is not valid JSON ({e}); the file is truncated or corrupt") from e


def compare_table(run_dirs: Sequence[str | Path], names: Sequence[str] | None = None) -> str:
    """One row per organ, one Dice column per run (HD95 in a second table), means last."""
    results = [load_results(r) for r in run_dirs]
    names = list(names) if names else [Path(r).name for r in run_dirs]
    organs: List[str] = list(results[0]["test"]["dice"])

    def f(v, nd):
        return "n/a" if v is None else f"{v:.{nd}f}"

    out = []
    for metric, nd, mean_key, title in (("dice", 3, "dice_mean", "Dice"), ("hd95", 1, "hd95_mean", "HD95 (mm)")):
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
