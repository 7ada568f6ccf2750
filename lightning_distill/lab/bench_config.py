"""A benchmark YAML: its schema (:class:`BenchmarkConfig`), how it is read (``extends:``, ``key=value``
overrides, ``--quick``) and checked, and how a finished run's config is compared with what the YAML
asks for now (:func:`config_changes`). Running the grid is :mod:`lightning_distill.lab.benchmark`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import MISSING, DictConfig, OmegaConf

from lightning_distill.config.load import ConfigError, flat_keys, load_schema, to_dict
from lightning_distill.config.run import RunConfig
from lightning_distill.lab.bench_grid import among

RESULTS_FILE = "results.jsonl"
PER_AXES = ("arch", "fraction", "seed")


@dataclass
class StageSpec:
    """A run config (YAML, relative to the benchmark file) and overrides applied to every run of it.

    ``per`` (teachers only): train one teacher per value of these grid axes (``arch``, ``fraction``,
    ``seed``), with that setting's architecture overrides, training fraction and seed, e.g. a 2D SIKD
    teacher per architecture and fraction, so it never sees more labelled data than its student.
    """

    config: str = MISSING
    overrides: List[str] = field(default_factory=list)
    quick_overrides: List[str] = field(default_factory=list)  # added with --quick
    per: List[str] = field(default_factory=list)  # teachers: subset of [arch, fraction, seed]
    # teachers: also score the teacher on the students' own test slices (phantom; see teacher_slices.py)
    score_on_students: bool = False


@dataclass
class SlicesSpec:
    """Teacher-labelled slices (``lightning-distill teach``) that methods refer to as ``{slices.NAME}``.

    The teach config is ``config`` (relative to the benchmark file) with ``overrides``; ``model.path`` is the
    best checkpoint of ``teacher`` (one of ``teachers``, trained once, not per grid axis), or, with
    ``teacher: null``, ``model.format=none`` (ground truth only); ``student`` is the benchmark's student
    config as its first grid run resolves it (its preprocessing and grid make the slices).
    """

    config: str = MISSING
    teacher: Optional[str] = None
    overrides: List[str] = field(default_factory=list)
    quick_overrides: List[str] = field(default_factory=list)  # added with --quick


@dataclass
class TestSetSpec:
    """An extra evaluation of every student: its best (or last) checkpoint tested with these overrides."""

    overrides: List[str] = field(default_factory=list)
    checkpoint: str = "best"  # best (selected on validation) | last (the end of training; needs checkpoint.save_last=true)
    all_subjects: bool = False  # every subject of the (overridden) data, not the run's test split
    description: str = ""


@dataclass
class PrepareSpec:
    """A ``lightning-distill`` command run before anything else, unless ``creates`` exists."""

    creates: str = MISSING
    command: List[str] = MISSING


@dataclass
class QuickSpec:
    """``--quick``: a smaller grid (with each stage's ``quick_overrides``: same code path, a minute)."""

    fractions: Optional[List[float]] = None
    seeds: Optional[List[int]] = None
    archs: Optional[List[str]] = None
    methods: Optional[List[str]] = None


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    description: str = ""
    output_dir: str = "runs/benchmarks/${name}"
    report: str = "docs/benchmarks/${name}.md"  # plots go to <report folder>/img/<name>_*.png
    prepare: List[PrepareSpec] = field(default_factory=list)
    teachers: Dict[str, StageSpec] = field(default_factory=dict)
    slices: Dict[str, SlicesSpec] = field(default_factory=dict)  # teach runs the methods refer to as {slices.NAME}
    student: StageSpec = field(default_factory=StageSpec)
    baseline: str = "baseline"  # the method the others are compared with
    methods: Dict[str, List[str]] = field(default_factory=dict)  # name -> overrides
    archs: Dict[str, List[str]] = field(default_factory=dict)  # name -> overrides
    fractions: List[float] = field(default_factory=lambda: [0.1, 0.25, 0.5, 1.0])
    # method -> the fractions it runs at (default: every fraction): fewer cells where a method is not needed
    fractions_of: Dict[str, List[float]] = field(default_factory=dict)
    # fraction -> student overrides at that fraction, after the method's (e.g. more steps for more subjects, so
    # that every point of a learning curve converges); keys are among the fractions
    fraction_overrides: Dict[float, List[str]] = field(default_factory=dict)
    # the report's learning curve of the baseline: headroom(n) = ceiling - baseline(n), the ceiling being the
    # baseline at the largest fraction, and teacher - ceiling (what no 2D model of this data reaches)
    headroom: bool = False
    # the headroom each Delta is read against: a runs CSV of a headroom benchmark (docs/benchmarks/data/<name>_runs.csv,
    # relative to this YAML): share of headroom(n) = Delta / (ceiling - its plain model at the same number of subjects)
    headroom_from: Optional[str] = None
    seeds: List[int] = field(default_factory=lambda: [0, 1, 2])
    test_sets: Dict[str, TestSetSpec] = field(default_factory=dict)  # extra evaluations (the run's own test split is "test")
    keep_checkpoints: bool = False  # False: delete each student's checkpoints once it is evaluated
    jobs: int = 1  # runs at once (teachers and students), each in its own process with cores // jobs torch threads
    bootstrap: int = 2000  # bootstrap resamples for the confidence intervals
    # [method, control] pairs whose paired difference the report shows (e.g. the teacher's bank vs an identity bank)
    contrasts: List[List[str]] = field(default_factory=list)
    focus_organs: List[str] = field(default_factory=list)  # organs with per-organ paired differences (e.g. the 3D-dependent ones)
    # values the YAML interpolates (${vars.NAME}) and the command line can change (vars.NAME=...), e.g. the students' steps
    vars: Dict[str, Any] = field(default_factory=dict)
    notes: Optional[str] = None  # a hand-written markdown file (path relative to the YAML) shown in the report as "Notes"
    precision_target: float = 0.01  # the report's Precision section: is every Δ's 95% CI half-width at most this?
    convergence_tolerance: float = 0.01  # a run whose best val Dice still rose by this much in the last quarter of training is not converged
    quick: QuickSpec = field(default_factory=QuickSpec)


def load_benchmark(path: str | Path, overrides: Sequence[str] = (), quick: bool = False) -> Tuple[DictConfig, Path]:
    """Load and check a benchmark YAML; returns the config and the folder run configs are relative to.

    The file may ``extends: other.yaml`` (relative to it, followed as in run configs): maps merge, lists are
    replaced, and paths stay relative to ``path``'s folder (so a companion grid beside its base shares its files).

    Raises:
        ConfigError: unknown keys, wrong types, unknown method/architecture names, a baseline that is
            not among the methods, fractions outside (0, 1], or an unknown ``{teachers.NAME}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"benchmark file {str(path)!r} does not exist")

    def quick_grid(cfg: DictConfig) -> DictConfig:  # before the overrides, so that e.g. seeds=[0] still wins
        if not quick:
            return cfg
        q = cfg.quick
        for key in ("fractions", "seeds"):
            if q[key] is not None:
                cfg[key] = q[key]
        for key in ("archs", "methods"):
            if q[key] is not None:
                unknown = [n for n in q[key] if n not in cfg[key]]
                if unknown:
                    raise ConfigError(f"{path}: quick.{key} names {unknown}, not in {key} ({list(cfg[key])})")
                cfg[key] = {n: cfg[key][n] for n in q[key]}
        cfg.fractions_of = {}  # the quick grid runs every method at its fractions
        cfg.fraction_overrides = {}  # ... with the stages' quick overrides (tiny data, a few steps)
        cfg.contrasts = [list(p) for p in cfg.contrasts if all(m in cfg.methods for m in p)]
        return cfg

    cfg = load_schema(BenchmarkConfig, path, overrides, "benchmark", before_overrides=quick_grid)
    for key, what in (("notes", ""), ("headroom_from", " (a headroom benchmark's runs CSV)")):  # files beside the YAML
        if cfg[key]:
            file = Path(cfg[key]) if Path(cfg[key]).is_absolute() else path.parent / cfg[key]
            if not file.is_file():
                raise ConfigError(f"{path}: {key} file {str(file)!r} does not exist{what}")
            cfg[key] = str(file)
    if quick:
        cfg.output_dir = cfg.output_dir.rstrip("/") + "-quick"
        cfg.report = str(Path(cfg.output_dir) / "report.md")
    _check(cfg, path)
    return cfg, path.parent


def _check(cfg: DictConfig, path: Path) -> None:
    where = str(path)
    for key in ("name",):
        if OmegaConf.is_missing(cfg, key):
            raise ConfigError(f"{where}: '{key}' is required")
    if OmegaConf.is_missing(cfg.student, "config"):
        raise ConfigError(f"{where}: 'student.config' (the students' run config) is required")
    if not cfg.methods or not cfg.archs:
        raise ConfigError(f"{where}: 'methods' and 'archs' each need at least one entry")
    if cfg.baseline not in cfg.methods:
        raise ConfigError(f"{where}: baseline {cfg.baseline!r} is not one of the methods {list(cfg.methods)}")
    bad = [f for f in cfg.fractions if not 0.0 < f <= 1.0]
    if bad or not cfg.fractions or not cfg.seeds:
        raise ConfigError(f"{where}: fractions must be in (0, 1] and seeds non-empty (fractions {list(cfg.fractions)})")
    for name, spec in cfg.teachers.items():
        bad = [a for a in spec.per if a not in PER_AXES]
        if bad:
            raise ConfigError(f"{where}: teachers.{name}.per has {bad}; valid axes: {list(PER_AXES)}")
    for m, ovr in cfg.methods.items():
        for o in ovr:
            for name in teacher_refs(o):
                if name not in cfg.teachers:
                    raise ConfigError(f"{where}: method {m!r} refers to {{teachers.{name}}}, but the teachers are "
                                      f"{list(cfg.teachers)}")
            for name in slices_refs(o):
                if name not in cfg.slices:
                    raise ConfigError(f"{where}: method {m!r} refers to {{slices.{name}}}, but the slices are "
                                      f"{list(cfg.slices)}")
    for name, spec in cfg.slices.items():
        if spec.teacher is not None and (spec.teacher not in cfg.teachers or cfg.teachers[spec.teacher].per):
            raise ConfigError(f"{where}: slices.{name}.teacher must be one of the teachers trained once "
                              f"{[t for t, v in cfg.teachers.items() if not v.per]}, or null (ground truth only); "
                              f"got {spec.teacher!r}")
    for m, fr in cfg.fractions_of.items():
        if m not in cfg.methods:
            raise ConfigError(f"{where}: fractions_of names {m!r}, not one of the methods {list(cfg.methods)}")
        bad = [f for f in fr if not among(f, cfg.fractions)]
        if bad:
            raise ConfigError(f"{where}: fractions_of.{m} has {bad}, not among the fractions {list(cfg.fractions)}")
    bad = [f for f in cfg.fraction_overrides if not among(f, cfg.fractions)]
    if bad:
        raise ConfigError(f"{where}: fraction_overrides has {bad}, not among the fractions {list(cfg.fractions)}")
    for pair in cfg.contrasts:
        if len(pair) != 2 or any(m not in cfg.methods for m in pair):
            raise ConfigError(f"{where}: contrasts must be [method, control] pairs of methods {list(cfg.methods)}, got {list(pair)}")
    reserved = {"test"}
    if reserved & set(cfg.test_sets):
        raise ConfigError(f"{where}: test set name 'test' is reserved for each run's own test split")
    for name, ts in cfg.test_sets.items():
        if ts.checkpoint not in ("best", "last"):
            raise ConfigError(f"{where}: test_sets.{name}.checkpoint must be 'best' or 'last', got {ts.checkpoint!r}")


def teacher_refs(override: str) -> List[str]:
    return re.findall(r"\{teachers\.([A-Za-z0-9_\-]+)\}", override)


def slices_refs(override: str) -> List[str]:
    return re.findall(r"\{slices\.([A-Za-z0-9_\-]+)\}", override)


def config_changes(old: Dict[str, Any], new: Dict[str, Any]) -> List[str]:
    """Keys whose values differ between a finished run's config and the one asked for now.

    ``output_dir`` is ignored, and so is a key that is new in the schema (absent from ``old``) while it
    has its default value: new options default to the old behaviour, so such runs stay valid. Keys of
    :data:`EXECUTION_KEYS` say how a run executes, not what it computes, and are ignored too.
    """
    defaults = flat_keys(to_dict(OmegaConf.structured(RunConfig)))
    a, b = flat_keys(old), flat_keys(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if k == "output_dir" or k in EXECUTION_KEYS or a.get(k, MISSING_VALUE) == b.get(k, MISSING_VALUE):
            continue
        if k not in a and k in defaults and b[k] == defaults[k]:
            continue
        changes.append(f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}")
    return changes


MISSING_VALUE = object()
# loader workers draw nothing themselves (every sample's augmentation is seeded by its draw seed; resume and
# worker counts give the same batches, tests/data/test_sampling.py), so their number does not change a result
EXECUTION_KEYS = frozenset({"data.num_workers"})
