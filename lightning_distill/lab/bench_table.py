"""The benchmark's records as a table: per (test set, arch, fraction, method) the runs of every seed, and
the paired statistics the report and its plots read (:class:`Table`).

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

import statistics
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig

from lightning_distill.lab.bench_grid import grid
from lightning_distill.lab.stats import case_scores, late_rise, organ_scores, paired_bootstrap, share_of_headroom, verdict
from lightning_distill.lab.report import mean_sd

OWN_TEST = "test"


def title_of(ts: str) -> str:
    return "own test split" if ts == OWN_TEST else f"test set `{ts}`"


def mean_of(vals) -> Optional[float]:
    return mean_sd(vals)[0]


def dice_of(test: Dict[str, Any], organ: Optional[str] = None) -> Optional[float]:
    """A test summary's mean Dice, or one organ's (``None`` where the organ has none)."""
    return test["dice_mean"] if organ is None else test["dice"].get(organ)


def scores_of(cases: Sequence[Dict[str, Any]], organ: Optional[str] = None) -> Dict[str, float]:
    """``{case: score}``: each case's mean Dice over the organs present, or one organ's Dice."""
    return case_scores(cases) if organ is None else organ_scores(cases, organ)


def test_of(rec: Dict[str, Any], test_set: str) -> Optional[Dict[str, Any]]:
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
                t = test_of(r, ts)
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
        return {s: scores_of(t["test_cases"], organ) for s, t in self.runs(ts, arch, frac, method).items()}

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
            teacher = scores_of(slices["test_cases"], organ)
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
        ref = mean_of(self.dice(ts, arch, full, self.cfg.baseline))
        if ref is None:
            return None, None, None
        for f in self.fractions:
            m = mean_of(self.dice(ts, arch, f, method))
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


def num(v: Optional[float]) -> str:
    return "n/a" if v is None else f"{v:.3f}"
