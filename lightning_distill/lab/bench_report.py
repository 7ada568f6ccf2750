"""The benchmark report: markdown tables and PNG plots computed from the benchmark's JSON lines.

Statistics (also stated in every report):

* a run's score on a test case is the mean Dice over the organs present in that case's ground truth;
* per setting (architecture, training fraction, method): mean ± std over seeds of the run's mean
  test Dice (the per-organ means averaged over organs, as in ``results.json``);
* paired difference method − baseline: the mean over seeds and test cases of the per-case score
  differences of runs with the same seed, architecture and fraction; its 95% CI is a two-level
  bootstrap (seeds resampled with replacement, then test cases), percentile interval;
* verdict: "better" when the whole CI is above 0, "worse" when it is below 0, otherwise
  "no clear difference";
* low-data check: per architecture and method, the smallest training fraction whose mean Dice is at
  least the baseline's mean at the largest fraction;
* surface Dice (normalised surface distance) of an organ on a case: the fraction of the boundary pixels
  of prediction and ground truth that lie within the tolerance of the other's boundary, in mm; the
  tolerance is the run's ``surface_tolerance_mm``, by default one voxel (per case, its largest
  spacing). NaN when the ground truth lacks the organ, 0 when the prediction is empty. Per
  setting: mean ± std over seeds of the run's ``surface_dice_mean`` (likewise ``hd95_mean``); "n/a"
  for records written before surface Dice existed. The paired bootstrap uses Dice only.
"""

from __future__ import annotations

import math
import platform
import shutil
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from omegaconf import DictConfig

from lightning_distill.lab.bench_grid import cpu_count, grid, runs_at
from lightning_distill.lab.stats import (case_scores, fmt_ci, fmt_share, late_rise, organ_scores, paired_bootstrap,  # noqa: F401  (re-exported)
                                         share_of_headroom, verdict)
from lightning_distill.lab.report import fmt_mean_sd, mean_sd
from lightning_distill.visuals import new_figure

OWN_TEST = "test"


def _title(ts: str) -> str:
    return "own test split" if ts == OWN_TEST else f"test set `{ts}`"


def _mean(vals) -> Optional[float]:
    return mean_sd(vals)[0]


def _dice(test: Dict[str, Any], organ: Optional[str] = None) -> Optional[float]:
    """A test summary's mean Dice, or one organ's (``None`` where the organ has none)."""
    return test["dice_mean"] if organ is None else test["dice"].get(organ)


def _scores(cases: Sequence[Dict[str, Any]], organ: Optional[str] = None) -> Dict[str, float]:
    """``{case: score}``: each case's mean Dice over the organs present, or one organ's Dice."""
    return case_scores(cases) if organ is None else organ_scores(cases, organ)


def _test_of(rec: Dict[str, Any], test_set: str) -> Optional[Dict[str, Any]]:
    """``{"test": summary, "test_cases": [...]}`` of a record for one test set."""
    if test_set == OWN_TEST:
        return {"test": rec["test"], "test_cases": rec["test_cases"]}
    return rec.get("test_sets", {}).get(test_set)


class Table:
    """Student records indexed by (test set, arch, fraction, method) -> {seed: test dict}."""

    def __init__(self, cfg: DictConfig, records: Sequence[Dict[str, Any]]):
        self.cfg = cfg
        self.methods = list(cfg.methods)
        self.archs = list(cfg.archs)
        self.fractions = sorted(float(f) for f in cfg.fractions)
        self.test_sets = [OWN_TEST, *cfg.test_sets]
        keys = {r.key for r in grid(cfg)}
        self.students = [r for r in records if r.get("kind") == "student" and r["key"] in keys]
        # this benchmark's teachers only (a benchmark that extends another may share its output folder)
        self.teachers = [r for r in records if r.get("kind") == "teacher" and r.get("teacher") in cfg.teachers]
        self._headroom_runs: Dict[str, Dict[int, List[float]]] = {}  # headroom_from's runs by architecture
        self._diffs: Dict[Tuple, Optional[Dict[str, float]]] = {}  # diff()'s bootstraps: summary, tables and plots ask again
        self.expected = len(keys)
        self.data: Dict[Tuple, Dict[int, Dict]] = {}
        self.subjects: Dict[float, int] = {}
        for r in self.students:
            self.subjects[float(r["fraction"])] = r["train_subjects"]
            for ts in self.test_sets:
                t = _test_of(r, ts)
                if t is not None:
                    self.data.setdefault((ts, r["arch"], float(r["fraction"]), r["method"]), {})[r["seed"]] = t
        self.organs = list(self.students[0]["test"]["dice"]) if self.students else []
        self._teacher_diffs: Dict[Tuple, Optional[Dict[str, float]]] = {}

    def runs(self, ts, arch, frac, method) -> Dict[int, Dict]:
        return self.data.get((ts, arch, frac, method), {})

    def dice(self, ts, arch, frac, method) -> List[Optional[float]]:
        return [t["test"]["dice_mean"] for t in self.runs(ts, arch, frac, method).values()]

    def metric(self, ts, arch, frac, method, key: str) -> List[Optional[float]]:
        """A summary value (``"surface_dice_mean"``, ``"hd95_mean"``) of every seed's run; None where absent."""
        return [t["test"].get(key) for t in self.runs(ts, arch, frac, method).values()]

    def surface_tolerance(self) -> str:
        """The surface Dice tolerance of the finished runs, in words."""
        tols = {(r.get("config") or {}).get("surface_tolerance_mm") for r in self.students}
        words = sorted("one voxel = the case's largest spacing" if t is None else f"{float(t):g} mm" for t in tols)
        if not words:
            return "n/a"
        return " or ".join(words) + (" (differs between runs)" if len(words) > 1 else "")

    def scores(self, ts, arch, frac, method, organ: Optional[str] = None) -> Dict[int, Dict[str, float]]:
        """``{seed: {case: score}}``: a case's mean Dice over the organs present, or one organ's Dice."""
        return {s: _scores(t["test_cases"], organ) for s, t in self.runs(ts, arch, frac, method).items()}

    def diff(self, ts, arch, frac, method, other: Optional[str] = None, organ: Optional[str] = None,
             other_frac: Optional[float] = None) -> Optional[Dict[str, float]]:
        """Paired difference ``method − other`` (default: the baseline; at ``other_frac``, default the same
        fraction), optionally of one organ's Dice; pairs are the same seed and test case. Computed once per
        argument set (the bootstrap's RNG seed is fixed, so a second call would give the same result)."""
        key = (ts, arch, frac, method, other or self.cfg.baseline, organ, frac if other_frac is None else other_frac)
        if key not in self._diffs:
            self._diffs[key] = paired_bootstrap(self.scores(ts, arch, frac, method, organ),
                                                self.scores(ts, arch, key[-1], key[4], organ), n=int(self.cfg.bootstrap))
        return self._diffs[key]

    def scored_teachers(self, ts) -> List[Tuple[Dict[str, Any], Dict[str, Any]]]:
        """``(record, {"test", "test_cases"})`` of every teacher scored on the students' slices of test set ``ts``."""
        recs = sorted((r for r in self.teachers if r.get("student_slices")), key=lambda r: r.get("instance", ""))
        pairs = [(r, r["student_slices"] if ts == OWN_TEST else (r.get("student_slices_sets") or {}).get(ts)) for r in recs]
        return [(r, t) for r, t in pairs if t]

    def teacher_diff(self, ts, arch, rec, slices, organ: Optional[str] = None) -> Optional[Dict[str, float]]:
        """Paired difference teacher − baseline at the largest fraction on the students' slices of test set ``ts``
        (``rec``'s ``slices`` from :meth:`scored_teachers`; its one run paired with every baseline seed), computed
        once per teacher, test set, architecture and organ (the teachers' and the headroom sections both show it)."""
        key = (ts, arch, rec.get("instance"), organ)
        if key not in self._teacher_diffs:
            base, f = self.cfg.baseline, self.fractions[-1]
            teacher = _scores(slices["test_cases"], organ)
            self._teacher_diffs[key] = paired_bootstrap({sd: teacher for sd in self.runs(ts, arch, f, base)},
                                                        self.scores(ts, arch, f, base, organ), n=int(self.cfg.bootstrap))
        return self._teacher_diffs[key]

    def _records(self, arch, frac, method) -> List[Dict[str, Any]]:
        return [r for r in self.students if r["arch"] == arch and float(r["fraction"]) == frac and r["method"] == method]

    def curves(self, arch, frac, method) -> Dict[int, List]:
        """``{seed: val_curve}`` of the finished runs that recorded one."""
        return {r["seed"]: r["val_curve"] for r in self._records(arch, frac, method) if r.get("val_curve")}

    def late_rises(self, arch, frac, method) -> List[float]:
        """Per seed: :func:`late_rise` of its learning curve (seeds without one left out)."""
        rises = (late_rise(r.get("val_curve"), r.get("steps")) for r in self._records(arch, frac, method))
        return [v for v in rises if v is not None]

    def converged(self, arch, frac) -> Optional[bool]:
        """Whether the setting's baseline converged: the mean over seeds of its late rise is below
        ``convergence_tolerance`` (``None`` without learning curves)."""
        rises = self.late_rises(arch, frac, self.cfg.baseline)
        return None if not rises else statistics.mean(rises) < float(self.cfg.convergence_tolerance)

    def headroom_runs(self, arch: str) -> Dict[int, List[float]]:
        """``{train subjects: [per-seed mean Dice]}`` of the plain model in ``cfg.headroom_from`` (own test split),
        read once per architecture (every table row and plot panel asks)."""
        import csv

        if arch in self._headroom_runs:
            return self._headroom_runs[arch]
        out: Dict[int, List[float]] = self._headroom_runs.setdefault(arch, {})
        with open(self.cfg.headroom_from, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["test_set"] == OWN_TEST and r["method"] == self.cfg.baseline]
        if any(r["arch"] == arch for r in rows):
            rows = [r for r in rows if r["arch"] == arch]
        for r in rows:
            out.setdefault(int(r["train_subjects"]), []).append(float(r["dice_mean"]))
        return out

    def share(self, arch, frac, method) -> Optional[Dict[str, float]]:
        """Share of the headroom at this setting's number of subjects that ``method`` closes (``headroom_from``)."""
        if not self.cfg.headroom_from:
            return None
        runs, n = self.headroom_runs(arch), self.subjects.get(frac)
        if n not in runs:
            return None
        top = max(runs)
        return share_of_headroom(self.scores(OWN_TEST, arch, frac, method), self.scores(OWN_TEST, arch, frac, self.cfg.baseline),
                                 runs[top], runs[n], n=int(self.cfg.bootstrap))

    def frac_label(self, f: float) -> str:
        n = self.subjects.get(f)
        return f"{f:g} ({n})" if n is not None else f"{f:g}"

    def low_data(self, ts, arch, method) -> Tuple[Optional[float], Optional[float], Optional[float]]:
        """(baseline mean at the largest fraction, smallest fraction where ``method`` reaches it, its mean there)."""
        full = self.fractions[-1]
        ref = _mean(self.dice(ts, arch, full, self.cfg.baseline))
        if ref is None:
            return None, None, None
        for f in self.fractions:
            m = _mean(self.dice(ts, arch, f, method))
            if m is not None and m >= ref:
                return ref, f, m
        return ref, None, None

    def low_data_claim(self, ts, arch, method) -> Optional[str]:
        """One sentence: does ``method`` reach the full-data baseline with fewer subjects than the baseline needs?"""
        base = self.cfg.baseline
        ref, f_m, mean = self.low_data(ts, arch, method)
        _, f_b, _ = self.low_data(ts, arch, base)
        if ref is None:
            return None
        where = f"the {base}'s mean at fraction {self.fractions[-1]:g} ({ref:.3f})"
        if f_m is None:
            return f"{method} never reaches {where}: **not reproduced**."
        said = f"{method} reaches {where} at fraction {self.frac_label(f_m)} ({mean:.3f})"
        if f_b is not None and f_m < f_b:
            ci = self.diff(ts, arch, f_m, method)
            return (f"{said}, the {base} only at {self.frac_label(f_b)}: **reproduced on the means** over seeds "
                    f"(paired difference at that fraction: {verdict(ci)}).")
        return f"{said}, and so does the {base} itself at {self.frac_label(f_b)}: **not reproduced** (no data saved)."


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
            t = _test_of(r, ts)
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
        title = _title(ts)
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
                L.append(f"| {a} | {_num(ref)} | {m} | {'none' if f is None else tab.frac_label(f)} | {_num(mean)} | "
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


def _num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"


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
                     f"{_num(r['test'].get('dice_mean'))} ({r['test'].get('num_cases')} cases), {r['wall_time_s']:.0f} s.")
        elif recs:
            L.append(f"  {len(recs)} teachers, {recs[0]['steps']} steps each, {sum(r['wall_time_s'] for r in recs):.0f} s "
                     f"in all; own test Dice ({recs[0]['test'].get('num_cases')} cases): "
                     + ", ".join(f"{r.get('instance', '?')} {_num(r['test'].get('dice_mean'))}" for r in recs) + ".")
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
    titles = [_title(ts) for ts in tab.test_sets]
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
                    rows.append(f"| {_title(ts)} | {a} | {tab.frac_label(f)} | {'/'.join(map(str, seeds))} | "
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
            L += [f"### {_title(ts)}", ""]
        for a in tab.archs:
            L += ["| teacher | " + " | ".join("mean" if o is None else o for o in organs) + " |", "|---|" + "---|" * len(organs)]
            bruns = tab.runs(ts, a, f, base)
            L.append(f"| {base} ({a}, {len(bruns)} seeds) | " + " | ".join(_num(_mean(
                [_dice(t["test"], o) for t in bruns.values()])) for o in organs) + " |")
            for r, t in scored:
                L.append(f"| {r.get('instance')} | " + " | ".join(_num(_dice(t["test"], o)) for o in organs) + " |")
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
            L += [f"### {_title(ts)}", ""]
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
                L.append(f"| {tab.frac_label(f)} | " + " | ".join(_num(_mean([_dice(t["test"], o) for t in runs.values()]))
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
                     + f" | {int(b['counts'][k]):,} | {_num(d)} |")
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
        L += [f"### {_title(ts)}", "", "| arch | fraction | method − control | mean Dice Δ [95% CI] | verdict | "
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
                cells = [_num(_mean([t["test"]["dice"][o] for t in runs.values()])) for o in tab.organs]
                sd = fmt_mean_sd([t["test"].get("surface_dice_mean") for t in runs.values()])
                hd = fmt_mean_sd([t["test"].get("hd95_mean") for t in runs.values()], nd=1)
                L.append(f"| {a} | {tab.frac_label(f)} | {m} | " + " | ".join(cells) + f" | {sd} | {hd} |")
    return "\n".join(L)


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
                teacher = _scores(t["test_cases"])
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
            vals = [v for v in (_dice(t["test"], o) for t in tab.runs(OWN_TEST, a, f, base).values()) if v is not None]
            if vals:
                x = tab.subjects.get(f, f)
                ax.scatter([x] * len(vals), vals, s=10, color=colors[0], alpha=0.5)
                xs.append(x)
                means.append(statistics.mean(vals))
        ax.plot(xs, means, marker="o", color=colors[0], label=base)
        for i, (r, t) in enumerate(teachers):
            v = _dice(t["test"], o)
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
            vals = [_mean([t["test"]["dice"][o] for t in runs.values()]) for o in tab.organs]
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
