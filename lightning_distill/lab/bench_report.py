"""The benchmark report: markdown tables (and, through :mod:`.bench_plots`, PNG plots) computed from the
benchmark's JSON lines, read through :class:`~lightning_distill.lab.bench_table.Table` (whose docstring
states the statistics, as every report does)."""

from __future__ import annotations

import platform
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import DictConfig

from lightning_distill.lab.bench_grid import cpu_count, runs_at
from lightning_distill.lab.bench_plots import (plot_dice_vs_fraction, plot_headroom, plot_learning_curves, plot_organs,
                                               plot_route_gains)
from lightning_distill.lab.bench_table import OWN_TEST, Table, dice_of, mean_of, num, test_of, title_of
from lightning_distill.lab.stats import fmt_ci, fmt_share, verdict
from lightning_distill.lab.report import fmt_mean_sd


def write_report(cfg: DictConfig, records: Sequence[Dict[str, Any]], command: str = "", quick: bool = False) -> Path:
    """Write ``cfg.report`` (markdown) and its plots; returns the report's path."""
    tab = Table(cfg, records)
    report = Path(cfg.report)
    img = report.parent / "img"
    img.mkdir(parents=True, exist_ok=True)
    plots = []
    if tab.students:
        p1 = img / f"{cfg.name}_dice_vs_fraction.png"
        plot_dice_vs_fraction(tab, p1)
        p2 = img / f"{cfg.name}_organs.png"
        plot_organs(tab, p2)
        plots = [("Mean test Dice against the training fraction (± std over seeds)", p1),
                 ("Per-organ test Dice at the smallest and the largest training fraction (mean over seeds)", p2)]
        p6 = img / f"{cfg.name}_route_gains.png"
        if plot_route_gains(tab, p6):
            plots.insert(0, (f"Dice gain of each method over the {cfg.baseline} at each training size (mean paired difference, "
                             "bars: 95% CI); dashed: what the ceiling adds at that size (headroom(n)), dotted and dash-dotted: the teachers "
                             "on the same slices (one line style per teacher)", p6))
        p5 = img / f"{cfg.name}_headroom.png"
        if plot_headroom(tab, p5):
            plots.append((f"The {cfg.baseline} against the number of training subjects (log scale; dots: seeds, line: "
                          "mean) and the teachers on the same test slices (dashed), mean Dice and per organ", p5))
        p4 = img / f"{cfg.name}_learning_curves.png"
        if plot_learning_curves(tab, p4):
            plots.append(("Learning curves: validation Dice against the training step (mean over seeds)", p4))
        example = translation_example(tab)
        if example is not None:
            rec, src = example
            p3 = img / f"{cfg.name}_translations.png"
            shutil.copyfile(src, p3)
            plots.append((f"Translated images of one run ({rec['method']}, {rec['arch']}, fraction {rec['fraction']:g}, "
                          f"seed {rec['seed']}; validation images, after training)", p3))
    text = render(tab, command, plots=[(t, p.relative_to(report.parent)) for t, p in plots], quick=quick)
    from lightning_distill.io import atomic_write

    atomic_write(report, lambda tmp: Path(tmp).write_text(text))
    write_runs_csv(tab, report.parent / "data" / f"{cfg.name}_runs.csv")
    return report


def write_runs_csv(tab: Table, path: Path) -> Path:
    """One row per finished student run and test set: the setting, the seed and the run's summary
    metrics (mean and per-organ Dice; surface Dice and HD95 where recorded), for notebooks and
    spreadsheets (``notebooks/03_benchmark_comparison.ipynb``)."""
    import csv
    import io

    from lightning_distill.io import atomic_write

    cols = ["benchmark", "test_set", "method", "arch", "fraction", "train_subjects", "seed", "dice_mean",
            "surface_dice_mean", "hd95_mean", *[f"dice_{o}" for o in tab.organs]]
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in sorted(tab.students, key=lambda r: (r["method"], r["arch"], float(r["fraction"]), r["seed"])):
        for ts in tab.test_sets:
            t = test_of(r, ts)
            if t is None:
                continue
            test = t["test"]
            row = {"benchmark": tab.cfg.name, "test_set": ts, "method": r["method"], "arch": r["arch"],
                   "fraction": r["fraction"], "train_subjects": r["train_subjects"], "seed": r["seed"],
                   **{k: test.get(k) for k in ("dice_mean", "surface_dice_mean", "hd95_mean")},
                   **{f"dice_{o}": (test.get("dice") or {}).get(o) for o in tab.organs}}
            w.writerow({k: "" if v is None else v for k, v in row.items()})
    atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))
    return path


def translation_example(tab: Table) -> Optional[Tuple[Dict[str, Any], Path]]:
    """A run that saved translated images (CMEDL): the largest fraction, then the smallest seed."""
    runs = [r for r in tab.students if r.get("translations") and Path(r["translations"]).is_file()]
    if not runs:
        return None
    best = min(runs, key=lambda r: (-r["fraction"], r["seed"], r["arch"], r["method"]))
    return best, Path(best["translations"])


def render(tab: Table, command: str, plots: Sequence[Tuple[str, Path]] = (), quick: bool = False) -> str:
    cfg = tab.cfg
    base = cfg.baseline
    others = [m for m in tab.methods if m != base]
    L: List[str] = [f"# Benchmark: {cfg.name}" + (" (--quick)" if quick else ""), ""]
    if cfg.description:
        L += [cfg.description.strip(), ""]
    finished = len(tab.students)
    versions = sorted({str(r.get("version")) for r in tab.students})
    wall = sum(r["wall_time_s"] for r in [*tab.students, *tab.teachers])
    L += [f"Generated by `{command}` from `{Path(cfg.output_dir) / 'results.jsonl'}`: **{finished} of "
          f"{tab.expected} student runs finished**; lightning_distill {', '.join(versions) or 'n/a'}; "
          f"{platform.machine()}, {cpu_count()} CPU cores. Do not edit by hand: re-run the command (finished runs are "
          f"skipped, only the report is rebuilt). Sum of run wall times: {wall / 60:.1f} min.", ""]
    if quick:
        L += ["> **--quick**: tiny data and a few steps, to exercise the code path; the numbers mean nothing.", ""]
    if finished < tab.expected:
        L += [f"> **Incomplete**: {tab.expected - finished} runs are missing; every number below uses the finished "
              "runs only. Re-run the command to complete the grid.", ""]
    L += _setup(tab, quick)
    if not tab.students:
        return "\n".join(L + ["No student run has finished yet.", ""])
    L += _summary(tab, others)
    L += _precision(tab, others)
    if cfg.notes and not quick:
        L += ["## Notes", "", f"*Written by hand from the generated numbers (`{_rel(cfg.notes)}`); every other section "
              "is generated.*", "", Path(cfg.notes).read_text().strip(), ""]
    L += _teachers_on_slices(tab)
    L += _headroom(tab)
    L += _banks(tab)
    L += _convergence(tab)
    L += _contrasts(tab)
    L += _focus(tab)
    for ts in tab.test_sets:
        title = title_of(ts)
        desc = "" if ts == OWN_TEST else cfg.test_sets[ts].description
        L += [f"## Test Dice: {title}", ""]
        if desc:
            L += [desc.strip(), ""]
        share = ts == OWN_TEST and bool(cfg.headroom_from)
        L += [f"Mean ± std over seeds; surface Dice (tolerance {tab.surface_tolerance()}) and HD95 (mm) are each "
              f"run's mean over organs (n/a: not recorded); Δ is the paired difference to the {base} [95% CI]."
              + (f" Share of headroom(n): Δ / headroom(n), headroom(n) = ceiling − plain model at the same number of "
                 f"subjects in `{_rel(cfg.headroom_from)}` (its own runs and test slices; each resampled over its seeds) "
                 "[bootstrap 95% CI]." if share else ""), "",
              "| arch | fraction (subjects) | method | Dice | surface Dice | HD95 (mm) "
              f"| Δ Dice − {base} [95% CI] | verdict |" + (" share of headroom(n) [95% CI] |" if share else ""),
              "|---|---|---|---|---|---|---|---|" + ("---|" if share else "")]
        for a in tab.archs:
            for f in tab.fractions:
                for m in tab.methods:
                    if not runs_at(cfg, m, f):
                        continue
                    ci = tab.diff(ts, a, f, m) if m != base else None
                    L.append(f"| {a} | {tab.frac_label(f)} | {m} | {fmt_mean_sd(tab.dice(ts, a, f, m))} | "
                             f"{fmt_mean_sd(tab.metric(ts, a, f, m, 'surface_dice_mean'))} | "
                             f"{fmt_mean_sd(tab.metric(ts, a, f, m, 'hd95_mean'), nd=1)} | "
                             + (f"{fmt_ci(ci)} | {verdict(ci)} |" if m != base else "— | — |")
                             + ((f" {fmt_share(tab.share(a, f, m))} |" if m != base else " — |") if share else ""))
        low, full = tab.fractions[0], tab.fractions[-1]
        L += ["", f"### Low-data check ({title})", "",
              f"Smallest training fraction at which a method's mean Dice reaches the {base}'s mean at the largest "
              f"fraction ({full:g}); and the paired difference of the method at the smallest fraction ({low:g}) − the "
              f"{base} at the largest (same seeds and test cases; above 0: fewer labelled subjects beat them all).", "",
              f"| arch | {base} at {full:g} | method | smallest fraction reaching it | its mean Dice there "
              f"| at {tab.frac_label(low)} − {base} at {tab.frac_label(full)} [95% CI] | verdict |",
              "|---|---|---|---|---|---|---|"]
        for a in tab.archs:
            for m in tab.methods:
                ref, f, mean = tab.low_data(ts, a, m)
                ci = tab.diff(ts, a, low, m, other_frac=full) if runs_at(cfg, m, low) and low != full else None
                L.append(f"| {a} | {num(ref)} | {m} | {'none' if f is None else tab.frac_label(f)} | {num(mean)} | "
                         f"{fmt_ci(ci)} | {verdict(ci) if ci is not None else '—'} |")
        L.append("")
    L += _organs(tab), ""
    for title, p in plots:
        L += [f"![{title}]({p})", "", f"*{title}.*", ""]
    L += ["## How the numbers are computed", "",
          "- Mean Dice of a run: per-organ means over its test cases, averaged over organs (organs absent from a "
          "case's ground truth do not count for that case). Tables show mean ± std over seeds.",
          "- Δ: per-case paired difference (a case's score is its mean Dice over the organs present) between runs "
          "with the same architecture, fraction and seed, averaged over seeds and cases; 95% CI from a two-level "
          f"bootstrap ({int(cfg.bootstrap)} resamples of seeds, then of test cases; percentile interval).",
          "- Verdict: *better* / *worse* when the whole CI is above / below 0, otherwise *no clear difference*.",
          "- Surface Dice (normalised surface distance): per organ and case, the fraction of the boundary pixels of "
          "prediction and ground truth that lie within the tolerance of the other's boundary (tolerance: "
          f"{tab.surface_tolerance()}; distances in mm with the case's spacing); NaN when the ground truth lacks the organ, 0 "
          "when the prediction is empty. Tables show mean ± std over seeds of each run's mean over organs, as for "
          "HD95 (mm); the paired difference and verdict use Dice only.",
          "- Training subsets are nested (the smaller fraction's subjects are inside the larger one's); validation "
          "and test subjects are the same for every run.", ""]
    return "\n".join(L)


def _setup(tab: Table, quick: bool) -> List[str]:
    cfg = tab.cfg

    def ovr(words: Sequence[str], quick_words: Sequence[str]) -> str:
        text = f"`{' '.join(words)}`" if words else "no overrides"
        return text + (f", and for --quick `{' '.join(quick_words)}`" if quick and quick_words else "")

    L = ["## Setup", ""]
    for name, spec in cfg.teachers.items():
        per = f", one per {' × '.join(spec.per)}" if spec.per else ", trained once for the whole grid"
        L.append(f"- Teacher `{name}`{per}: `{spec.config}` with {ovr(spec.overrides, spec.quick_overrides)}.")
        recs = sorted((r for r in tab.teachers if r["teacher"] == name), key=lambda r: r.get("instance", ""))
        if len(recs) == 1:
            r, c = recs[0], recs[0]["config"]
            L.append(f"  {c['model']['name']} on {c['data']['shape']} inputs, {r['steps']} steps; own test Dice "
                     f"{num(r['test'].get('dice_mean'))} ({r['test'].get('num_cases')} cases), {r['wall_time_s']:.0f} s.")
        elif recs:
            L.append(f"  {len(recs)} teachers, {recs[0]['steps']} steps each, {sum(r['wall_time_s'] for r in recs):.0f} s "
                     f"in all; own test Dice ({recs[0]['test'].get('num_cases')} cases): "
                     + ", ".join(f"{r.get('instance', '?')} {num(r['test'].get('dice_mean'))}" for r in recs) + ".")
    L.append(f"- Students: `{cfg.student.config}` with {ovr(cfg.student.overrides, cfg.student.quick_overrides)}.")
    if tab.students:
        r = tab.students[0]
        c = r["config"]
        steps = sorted({x["steps"] for x in tab.students})
        L.append(f"  {c['data']['shape']} inputs, batch {c['data']['batch_size']}, "
                 f"{'/'.join(str(v) for v in steps)} steps, {r['test']['num_cases']} test cases; median run "
                 f"{statistics.median(x['wall_time_s'] for x in tab.students):.0f} s.")
    for m, o in cfg.methods.items():
        L.append(f"- Method `{m}`: {ovr(o, [])}")
    for a, o in cfg.archs.items():
        L.append(f"- Architecture `{a}`: {ovr(o, [])}")
    L.append(f"- Fractions (training subjects): {', '.join(tab.frac_label(f) for f in tab.fractions)}; seeds "
             f"{list(cfg.seeds)}.")
    for f, o in cfg.fraction_overrides.items():
        L.append(f"- At fraction {float(f):g}: {ovr(o, [])}")
    for name, t in cfg.test_sets.items():
        L.append(f"- Extra test set `{name}`: {ovr(t.overrides, [])}" + (" (every subject)" if t.all_subjects else "")
                 + (f": {t.description.strip()}" if t.description else ""))
    L.append("")
    return L


def _summary(tab: Table, others: Sequence[str]) -> List[str]:
    """Per method and test set, how many settings are better / worse / not clearly different from the
    baseline; then the low-data claim of every method run at more than one fraction."""
    base = tab.cfg.baseline
    if not others:  # the baseline alone (a learning curve): nothing to compare
        return []
    titles = [title_of(ts) for ts in tab.test_sets]
    L = ["## Summary", "",
         f"Verdicts against the {base} over the settings each method runs in (*better* / *worse*: the paired 95% CI "
         "of the Dice difference above / below 0; the settings are named).", "",
         "| method | " + " | ".join(titles) + " |", "|---|" + "---|" * len(titles)]
    improving = []
    for m in others:
        cells = []
        for ts in tab.test_sets:
            groups: Dict[str, List[str]] = {"better": [], "worse": [], "no clear difference": [], "n/a": []}
            for a in tab.archs:
                for f in tab.fractions:
                    if runs_at(tab.cfg, m, f):
                        groups[verdict(tab.diff(ts, a, f, m))].append(f"{a} at {f:g}")
            n = sum(len(v) for v in groups.values())
            named = lambda k: f" ({', '.join(groups[k])})" if groups[k] else ""  # noqa: E731
            cells.append(f"better in {len(groups['better'])} of {n}{named('better')}; worse in {len(groups['worse'])}"
                         f"{named('worse')}")
            if groups["better"]:
                improving.append(m)
        L.append(f"| **{m}** | " + " | ".join(cells) + " |")
    L.append("")
    L.append(f"- No method improves on the {base} in any setting of any test set." if not improving else
             f"- Better than the {base} in some setting: {', '.join(sorted(set(improving)))} (see the tables and the "
             "controls below before crediting the teacher).")
    for m in others:
        if sum(runs_at(tab.cfg, m, f) for f in tab.fractions) < 2:
            continue
        for ts, title in zip(tab.test_sets, titles):
            for a in tab.archs:
                claim = tab.low_data_claim(ts, a, m)
                if claim:
                    L.append(f"- Low-data claim, {a}, {title}: {claim}")
    L.append("")
    return L


def _precision(tab: Table, others: Sequence[str]) -> List[str]:
    """The achieved precision: half-width of every method's paired 95% CI against the baseline, per setting."""
    base, target = tab.cfg.baseline, float(tab.cfg.precision_target)
    rows = []
    for ts in tab.test_sets:
        for a in tab.archs:
            for f in tab.fractions:
                half = {m: (ci["hi"] - ci["lo"]) / 2 for m in others if runs_at(tab.cfg, m, f)
                        for ci in [tab.diff(ts, a, f, m)] if ci is not None}
                if half:
                    worst = max(half, key=half.get)
                    seeds = sorted({len(tab.runs(ts, a, f, m)) for m in half})
                    rows.append(f"| {title_of(ts)} | {a} | {tab.frac_label(f)} | {'/'.join(map(str, seeds))} | "
                                f"{max((len(c) for c in tab.scores(ts, a, f, base).values()), default=0)} | {float(np.median(list(half.values()))):.4f} | "
                                f"{half[worst]:.4f} ({worst}) | {'yes' if half[worst] <= target else '**no**'} |")
    if not rows:
        return []
    return ["## Precision", "",
            f"Half-width of the paired 95% CI of each method's Δ against the {base} (half the CI's length), median and "
            f"largest over the methods at each setting; target: ≤ {target:g} mean Dice for every method.", "",
            "| test set | arch | fraction (subjects) | seeds | test cases | median half-width | largest (method) | "
            "target met |", "|---|---|---|---|---|---|---|---|", *rows, ""]


def _teachers_on_slices(tab: Table) -> List[str]:
    """Each teacher scored on the students' test slices (own test split, and every extra test set it was
    scored on), beside the baseline (largest fraction)."""
    recs = [r for r in tab.teachers if r.get("student_slices")]
    if not recs:
        return []
    base, f = tab.cfg.baseline, tab.fractions[-1]
    L = ["## Teachers on the students' test slices", "",
         f"Each teacher scored on exactly the test slices the students are scored on (a 3D teacher segments each "
         f"subject's whole volume and is scored on the student's slice of it, a 2D teacher on the student's images; "
         f"`lightning_distill/lab/teacher_slices.py`), "
         f"beside the {base} at fraction {tab.frac_label(f)} (mean over its seeds). Δ: paired difference teacher − "
         f"{base} over the slices (the teacher's one run paired with every {base} seed), [bootstrap 95% CI]. A "
         "teacher can only pass on what it knows better than the student.", ""]
    organs = [None, *tab.organs]
    for ts in tab.test_sets:
        scored = tab.scored_teachers(ts)
        if not scored:
            continue
        if len(tab.test_sets) > 1:
            L += [f"### {title_of(ts)}", ""]
        for a in tab.archs:
            L += ["| teacher | " + " | ".join("mean" if o is None else o for o in organs) + " |", "|---|" + "---|" * len(organs)]
            bruns = tab.runs(ts, a, f, base)
            L.append(f"| {base} ({a}, {len(bruns)} seeds) | " + " | ".join(num(mean_of(
                [dice_of(t["test"], o) for t in bruns.values()])) for o in organs) + " |")
            for r, t in scored:
                L.append(f"| {r.get('instance')} | " + " | ".join(num(dice_of(t["test"], o)) for o in organs) + " |")
                L.append(f"| Δ {r.get('instance')} − {base} | " + " | ".join(fmt_ci(tab.teacher_diff(ts, a, r, t, o))
                                                                           for o in organs) + " |")
            L.append("")
    return L


def _headroom(tab: Table) -> List[str]:
    """The baseline's learning curve read as headroom (``headroom: true``): what more labelled subjects of the
    students' own population give a 2D model, and how much of the teachers' margin lies beyond that."""
    if not tab.cfg.headroom or len(tab.fractions) < 2:
        return []
    base, top, prev = tab.cfg.baseline, tab.fractions[-1], tab.fractions[-2]
    organs = [None, *tab.organs]
    head = "| fraction (subjects) | " + " | ".join("mean" if o is None else o for o in organs) + " |"
    rule = "|---|" + "---|" * len(organs)
    L = ["## Learning curve and headroom", "",
         f"The {base} (a 2D model of the students' population, no teacher) at every training size. **Ceiling**: the "
         f"{base} at the largest size, {tab.frac_label(top)} subjects — a measured value, not an extrapolation; the "
         f"plateau check says whether the curve had flattened there. **headroom(n)** = ceiling − {base}(n): what more "
         f"labelled slices of this population give a 2D model, the part of a teacher's margin a 2D student can "
         f"reach. **Unreachable** = teacher − ceiling on the same slices: what a teacher knows beyond any 2D model "
         f"trained on this population (negative: the ceiling passes the teacher). Paired over seeds and test "
         f"cases, [bootstrap 95% CI]; a teacher's one run is paired with every seed of the ceiling.", ""]
    for ts in tab.test_sets:
        if len(tab.test_sets) > 1:
            L += [f"### {title_of(ts)}", ""]
        for a in tab.archs:
            rise = tab.diff(ts, a, top, tab.cfg.baseline, other_frac=prev)
            if rise is None:
                said = "n/a."
            elif rise["lo"] > 0:
                said = "**still rising**: the ceiling is a lower bound of the plateau."
            elif rise["hi"] < 0:
                said = (f"**falling**: the largest size is worse than the one before it, so the ceiling is no plateau "
                        f"(more subjects of this data made the {base} worse; a negative headroom says so).")
            else:
                said = ("no clear rise (the CI includes 0): the curve may have flattened, but a larger size could still add "
                        "up to the CI's upper bound; the ceiling is the measured value at this size.")
            L += [f"**{a}.** Plateau check: {base}({tab.frac_label(top)}) − {base}({tab.frac_label(prev)}) = "
                  f"{fmt_ci(rise)}: {said}", "",
                  f"{base}, mean over seeds:", "", head, rule]
            for f in tab.fractions:
                runs = tab.runs(ts, a, f, base)
                L.append(f"| {tab.frac_label(f)} | " + " | ".join(num(mean_of([dice_of(t["test"], o) for t in runs.values()]))
                                                                  for o in organs) + " |")
            L += ["", f"headroom(n) = ceiling − {base}(n) [95% CI]:", "", head, rule]
            for f in tab.fractions[:-1]:
                L.append(f"| {tab.frac_label(f)} | " + " | ".join(fmt_ci(tab.diff(ts, a, top, tab.cfg.baseline, organ=o, other_frac=f)) for o in organs) + " |")
            scored = tab.scored_teachers(ts)
            if scored:
                L += ["", "Unreachable = teacher − ceiling [95% CI] (the teacher scored on the same test slices):", "",
                      "| teacher | " + " | ".join("mean" if o is None else o for o in organs) + " |", rule]
                for r, t in scored:
                    L.append(f"| {r.get('instance')} | " + " | ".join(fmt_ci(tab.teacher_diff(ts, a, r, t, o)) for o in organs) + " |")
            L.append("")
    return L


def _convergence(tab: Table) -> List[str]:
    """Convergence check from the learning curves (and the plot's caption)."""
    if not any(r.get("val_curve") for r in tab.students):
        return []
    tol = float(tab.cfg.convergence_tolerance)
    L = ["## Convergence check", "",
         f"Late rise of a run: how much its best validation Dice rose in the last quarter of training (the "
         f"checkpoint tested is the best one). A setting is **flagged** when its {tab.cfg.baseline}'s late rise, "
         f"averaged over seeds, is {tol:g} or more: its students had not converged, and differences there may be "
         "differences of speed. Mean ± std over seeds.", "",
         "| arch | fraction (subjects) | " + " | ".join(tab.methods) + " | converged |", "|---|---|" + "---|" * (len(tab.methods) + 1)]
    for a in tab.archs:
        for f in tab.fractions:
            ok = tab.converged(a, f)
            flag = "n/a" if ok is None else ("yes" if ok else "**no: flagged**")
            L.append(f"| {a} | {tab.frac_label(f)} | " + " | ".join(fmt_mean_sd(tab.late_rises(a, f, m)) if runs_at(tab.cfg, m, f)
                                                                     else "not run" for m in tab.methods)
                     + f" | {flag} |")
    L.append("")
    return L


def _rel(path: str) -> str:
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def _banks(tab: Table) -> List[str]:
    """Each teacher's probability bank (K x K at its tau): row k = the mean softmax over the voxels
    labelled k, so the row shows what the teacher predicts for class k and the column j where class
    j's probability mass comes from; with the held-out Dice per class when recorded."""
    teachers = [t for t in tab.teachers if t.get("bank")]
    if not teachers:
        return []
    L = ["## What the teachers' banks hold", "",
         "Row k: the teacher's mean softmax over the voxels labelled k (what the students are pulled towards); "
         "column j: where the probability of class j comes from. Held-out Dice: the teacher's per-class Dice on "
         "its validation data (the bank's reliability record), n/a when not recorded.", ""]
    for t in teachers:
        b = t["bank"]
        names, rel = b["classes"], b.get("reliability") or {}
        L += [f"### {t.get('instance', t.get('teacher'))} (tau {b['tau']:g})", "",
              "| label (row) / predicted (column) | " + " | ".join(names) + " | voxels | held-out Dice |",
              "|---|" + "---|" * (len(names) + 2)]
        for k, row in enumerate(b["matrix"]):
            d = (rel.get(names[k]) or {}).get("dice")
            L.append(f"| {names[k]} | " + " | ".join(f"**{v:.3f}**" if j == k else f"{v:.3f}" for j, v in enumerate(row))
                     + f" | {int(b['counts'][k]):,} | {num(d)} |")
        L.append("")
    return L


def _contrasts(tab: Table) -> List[str]:
    pairs = [tuple(p) for p in tab.cfg.contrasts]
    if not pairs:
        return []
    focus = list(tab.cfg.focus_organs)
    L = ["## Which part of a gain needs the teacher's content", "",
         "Paired differences between a method and its control (same architecture, fraction and seed; bootstrap "
         "95% CI over seeds and test cases): a gain that the control also gets (identity or shuffled bank, a 2D "
         "teacher's bank, class balancing) is not the 3D teacher's knowledge."
         + (f" Per-organ columns: Dice of the organs where 3D context matters ({', '.join(focus)})." if focus else ""), ""]
    for ts in tab.test_sets:
        L += [f"### {title_of(ts)}", "", "| arch | fraction | method − control | mean Dice Δ [95% CI] | verdict | "
              + " | ".join(f"{o} Δ" for o in focus) + (" |" if focus else ""),
              "|---|---|---|---|---|" + "---|" * len(focus)]
        for a in tab.archs:
            for f in tab.fractions:
                for m, c in pairs:
                    if not (runs_at(tab.cfg, m, f) and runs_at(tab.cfg, c, f)):
                        continue
                    ci = tab.diff(ts, a, f, m, c)
                    L.append(f"| {a} | {tab.frac_label(f)} | {m} − {c} | {fmt_ci(ci)} | {verdict(ci)} | "
                             + " | ".join(fmt_ci(tab.diff(ts, a, f, m, c, o)) for o in focus) + (" |" if focus else ""))
        L.append("")
    return L


def _focus(tab: Table) -> List[str]:
    focus = [o for o in tab.cfg.focus_organs if o in tab.organs]
    if not focus:
        return []
    base = tab.cfg.baseline
    L = [f"## Organs where 3D context matters: Dice Δ against the {base} (own test split)", "",
         f"Per organ, paired difference method − {base} over the seeds and the test cases that contain the organ, "
         "[bootstrap 95% CI].", "",
         "| arch | fraction | method | " + " | ".join(focus) + " |", "|---|---|---|" + "---|" * len(focus)]
    for a in tab.archs:
        for f in tab.fractions:
            for m in tab.methods:
                if m == base or not runs_at(tab.cfg, m, f):
                    continue
                L.append(f"| {a} | {tab.frac_label(f)} | {m} | " + " | ".join(fmt_ci(tab.diff(OWN_TEST, a, f, m, None, o))
                                                                         for o in focus) + " |")
    L.append("")
    return L


def _organs(tab: Table) -> str:
    L = ["## Per-organ Dice, surface Dice and HD95 (own test split; mean over seeds)", "",
         "| arch | fraction | method | " + " | ".join(tab.organs) + " | surface Dice (mean ± std) | HD95 mm (mean ± std) |",
         "|---|---|---|" + "---|" * (len(tab.organs) + 2)]
    for a in tab.archs:
        for f in tab.fractions:
            for m in tab.methods:
                runs = tab.runs(OWN_TEST, a, f, m)
                if not runs:
                    continue
                cells = [num(mean_of([t["test"]["dice"][o] for t in runs.values()])) for o in tab.organs]
                sd = fmt_mean_sd([t["test"].get("surface_dice_mean") for t in runs.values()])
                hd = fmt_mean_sd([t["test"].get("hd95_mean") for t in runs.values()], nd=1)
                L.append(f"| {a} | {tab.frac_label(f)} | {m} | " + " | ".join(cells) + f" | {sd} | {hd} |")
    return "\n".join(L)
