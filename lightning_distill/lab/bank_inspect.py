"""What a prototype bank knows, and how much of it each loss geometry can see.

``lightning-distill bank inspect BANK`` prints :func:`bank_diagnostics` as markdown and writes
:func:`plot_bank_diagnostics` as a PNG. For a K x K probability bank:

* per row (ground-truth class k): voxels, the diagonal ``P[k, k]``, the entropy of the row (nats; 0
  for a one-hot row, ``log K`` for a uniform one), the off-diagonal mass ``1 - P[k, k]``, the largest
  confusion, and the teacher's held-out reliability when the bank records it;
* the distance of the bank from the identity under each geometry and at each stored temperature:
  the (inter, intra) prototype-DIST terms of a student that is right with certainty and has no
  confusion at all. A figure near 0 means a loss in that geometry barely tells such a student from
  the teacher: it is almost blind to what the bank knows beyond the labels (docs/geometry.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from lightning_distill.losses.prototype import GEOMETRIES, identity_distances
from lightning_distill.bank.format import Bank, load_bank


def row_statistics(bank: Bank, tau: Optional[float] = None) -> List[Dict[str, Any]]:
    """One dict per class: ``class``, ``voxels``, ``diagonal``, ``entropy``, ``offdiag_mass``,
    ``confusion`` (the largest off-diagonal class) and ``confusion_p``, plus ``dice``/``precision``
    when the bank records the teacher's reliability (``prob`` space only for the probability figures)."""
    p = bank.at_tau(tau)
    rel = bank.meta.get("reliability") or {}
    rows = []
    for k, name in enumerate(bank.class_names):
        row: Dict[str, Any] = {"class": name, "voxels": float(bank.counts[k])}
        if bank.space == "prob":
            r = p[k].clamp_min(0)
            off = r.clone()
            off[k] = -1
            j = int(off.argmax())
            row.update(diagonal=float(r[k]), entropy=float(-(r * r.clamp_min(1e-12).log()).sum()),
                       offdiag_mass=float(1 - r[k]), confusion=bank.class_names[j], confusion_p=float(r[j]))
        else:
            row.update(norm=float(p[k].norm()))
        if name in rel:
            row.update({m: rel[name].get(m) for m in ("dice", "precision", "recall")})
        rows.append(row)
    return rows


def identity_table(bank: Bank) -> Dict[float, Dict[str, tuple]]:
    """``{tau: {geometry: (inter, intra)}}``: the bank's distance from the identity at every stored
    temperature (rows of classes the bank never saw are left out)."""
    return {t: identity_distances(bank.at_tau(t), GEOMETRIES, present=bank.present) for t in bank.taus}


def bank_diagnostics(bank: Bank, source: str = "") -> str:
    """The bank's diagnostics as markdown (see the module docstring)."""
    meta = bank.meta
    taus = ", ".join(f"{t:g}" for t in bank.taus)
    mode = meta.get("mode", "?")
    lines = [f"# Prototype bank {source}".rstrip(), "",
             f"{bank.space} space, {len(bank.class_names)} classes, {mode}"
             + (f" from {meta['start']:g} of training" if mode in ("running_mean", "ema") and meta.get("start") is not None else "")
             + f"; tau {bank.tau:g}" + (f" (stored at tau {taus})" if bank.space == "prob" else "")
             + (f"; axial range {meta['axial_range']}" if meta.get("axial_range") else "")
             + (f"; checkpoint {meta['checkpoint']}" if meta.get("checkpoint") else ""), ""]
    rows = row_statistics(bank)
    has_rel = any("dice" in r for r in rows)
    rel_cols = " teacher Dice | precision |" if has_rel else ""
    rel_split = f" (held-out: {meta.get('reliability_split', 'val')})" if has_rel else ""
    if bank.space == "prob":
        lines += [f"Rows at tau {bank.tau:g}{rel_split}:", "",
                  "| class | voxels | diagonal | entropy (nats) | off-diagonal mass | largest confusion |" + rel_cols,
                  "|---|---:|---:|---:|---:|---|" + ("---:|---:|" if has_rel else "")]
        for r in rows:
            line = (f"| {r['class']} | {r['voxels']:.0f} | {r['diagonal']:.3f} | {r['entropy']:.3f} | "
                    f"{r['offdiag_mass']:.3f} | {r['confusion']} ({r['confusion_p']:.3f}) |")
            if has_rel:
                line += " " + " | ".join("-" if r.get(m) is None else f"{r[m]:.3f}" for m in ("dice", "precision")) + " |"
            lines.append(line)
        lines += ["", f"Entropy of a uniform row: {math.log(len(bank.class_names)):.3f} nats.", "",
                  "Distance from the identity, inter / intra (a student right with certainty and without any "
                  "confusion; near 0 = the geometry is almost blind to what the bank knows beyond the labels):", "",
                  "| geometry | " + " | ".join(f"tau {t:g}" for t in bank.taus) + " |",
                  "|---|" + "---:|" * len(bank.taus)]
        table = identity_table(bank)
        for g in GEOMETRIES:
            lines.append(f"| {g} | " + " | ".join(f"{table[t][g][0]:.4f} / {table[t][g][1]:.4f}" for t in bank.taus) + " |")
        lines += ["", "offdiag compares only the off-diagonal entries, which the identity does not have: its figure "
                  "is 1 by construction (no correlation), whatever the bank."]
    else:
        lines += ["| class | voxels | prototype norm |" + rel_cols, "|---|---:|---:|" + ("---:|---:|" if has_rel else "")]
        for r in rows:
            line = f"| {r['class']} | {r['voxels']:.0f} | {r['norm']:.3f} |"
            if has_rel:
                line += " " + " | ".join("-" if r.get(m) is None else f"{r[m]:.3f}" for m in ("dice", "precision")) + " |"
            lines.append(line)
        lines += ["", "A feature-space bank is compared as it is (geometry prob); the identity figures do not apply."]
    absent = [n for n, c in zip(bank.class_names, bank.counts.tolist()) if c <= 0]
    if absent:
        lines += ["", f"Classes with no voxel in the bank (left out of every loss): {', '.join(absent)}."]
    return "\n".join(lines) + "\n"


def plot_bank_diagnostics(bank: Bank, path: str | Path, source: str = "") -> Path:
    """PNG: the bank (log10, rows = ground truth), per-row entropy and off-diagonal mass, and the
    identity distances (inter + intra) of every geometry at every stored temperature (log scale)."""
    import numpy as np

    from lightning_distill.io import atomic_write
    from lightning_distill.visuals import new_figure

    names = bank.class_names
    prob = bank.space == "prob"
    fig, axes = new_figure(1, 3 if prob else 1, figsize=(17, 5) if prob else (6, 5))
    axes = np.atleast_1d(axes)
    p = bank.prototypes
    if prob:
        im = axes[0].imshow(p.clamp_min(1e-4).log10(), cmap="viridis", vmin=-4, vmax=0)
        fig.colorbar(im, ax=axes[0], label="log10 mean probability")
        axes[0].set_xticks(range(len(names)), names, rotation=90)
        axes[0].set_xlabel("predicted class")
    else:
        im = axes[0].imshow(p, cmap="coolwarm", aspect="auto")
        fig.colorbar(im, ax=axes[0], label="mean feature")
        axes[0].set_xlabel("feature channel")
    axes[0].set_yticks(range(len(names)), names)
    axes[0].set_ylabel("ground-truth class")
    axes[0].set_title(f"bank ({bank.space}, tau={bank.tau:g}) {source}".strip(), fontsize=9)
    if prob:
        rows = row_statistics(bank)
        x = np.arange(len(names))
        axes[1].bar(x - 0.2, [r["entropy"] for r in rows], 0.4, label="entropy (nats)")
        axes[1].bar(x + 0.2, [r["offdiag_mass"] for r in rows], 0.4, label="off-diagonal mass")
        axes[1].set_xticks(x, names, rotation=90)
        axes[1].set_title("per row")
        axes[1].legend(fontsize=8)
        table = identity_table(bank)
        width = 0.8 / len(GEOMETRIES)
        xt = np.arange(len(bank.taus))
        for i, g in enumerate(GEOMETRIES):
            axes[2].bar(xt + (i - (len(GEOMETRIES) - 1) / 2) * width,
                        [max(sum(table[t][g]), 1e-5) for t in bank.taus], width, label=g)
        axes[2].set_yscale("log")
        axes[2].set_xticks(xt, [f"tau {t:g}" for t in bank.taus])
        axes[2].set_ylabel("inter + intra vs identity")
        axes[2].set_title("distance from the identity (near 0: blind)")
        axes[2].legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    return path


def inspect_bank(bank_path: str | Path, png: Optional[str | Path] = None) -> tuple:
    """Load a bank (or a checkpoint's) and return ``(markdown, png_path)``; the PNG defaults to
    ``<bank>_inspect.png`` beside it."""
    bank = load_bank(bank_path)
    src = Path(bank_path)
    png = Path(png) if png else src.with_name(src.stem + "_inspect.png")
    return bank_diagnostics(bank, str(src)), plot_bank_diagnostics(bank, png, src.name)


__all__ = ["bank_diagnostics", "identity_table", "inspect_bank", "plot_bank_diagnostics", "row_statistics"]

