"""W&B sweep configs (``experiments/sweeps/*.yaml``): checking, sampling and a local runner.

A sweep YAML is a plain W&B sweep config (``method``, ``metric``, ``parameters``, ``command``);
its ``command`` ends in ``${args_no_hyphens}``, so a W&B agent runs
``lightning-distill fit CONFIG key=value ...`` with the sampled values as the same ``key=value``
overrides the CLI takes. With a W&B server: ``make sweep SWEEP=FILE`` then ``make agent
SWEEP_ID=...``. Without one, ``lightning-distill sweep --local FILE --count N`` samples the same
space here (``grid``: the Cartesian product in order; ``random``, and ``bayes`` as random: seeded
draws) and runs each trial's command as the agent would build it, one after the other, then writes
one table of the trials and their metric.

Supported parameter specs (as in W&B): ``value``, ``values`` (with optional ``probabilities``),
``distribution`` ``uniform`` / ``log_uniform_values`` / ``q_uniform`` / ``q_log_uniform_values`` /
``int_uniform`` / ``normal`` with ``min``/``max`` (``q``; ``mu``/``sigma``).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import yaml

METHODS = ("grid", "random", "bayes")
DISTRIBUTIONS = ("constant", "categorical", "uniform", "log_uniform_values", "q_uniform", "q_log_uniform_values",
                 "int_uniform", "normal")
MACROS = ("${env}", "${interpreter}", "${program}", "${args}", "${args_no_hyphens}")


class SweepError(ValueError):
    """An invalid sweep config; the message names the file and the key."""


def load_sweep(path: str | Path) -> Dict[str, Any]:
    """Read and check a W&B sweep YAML.

    Raises:
        SweepError: not a mapping, unknown ``method``, no ``metric.name``/``goal``, a parameter
            without a valid spec, or a ``command`` without ``${args_no_hyphens}`` / ``${args}``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep file {str(path)!r} does not exist")
    try:
        sweep = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SweepError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(sweep, dict):
        raise SweepError(f"{path}: a sweep config must be a mapping")
    if sweep.get("method") not in METHODS:
        raise SweepError(f"{path}: method must be one of {list(METHODS)}, got {sweep.get('method')!r}")
    metric = sweep.get("metric") or {}
    if not metric.get("name") or metric.get("goal") not in ("maximize", "minimize"):
        raise SweepError(f"{path}: metric needs a name and goal: maximize | minimize, got {metric}")
    params = sweep.get("parameters")
    if not isinstance(params, dict) or not params:
        raise SweepError(f"{path}: 'parameters' must be a non-empty mapping of config keys to specs")
    for name, spec in params.items():
        _check_spec(path, name, spec, sweep["method"])
    cmd = sweep.get("command")
    if not isinstance(cmd, list) or not any(c in ("${args_no_hyphens}", "${args}") for c in cmd):
        raise SweepError(f"{path}: 'command' must be a list containing ${{args_no_hyphens}} (the key=value overrides)")
    unknown = [c for c in cmd if isinstance(c, str) and c.startswith("${") and c not in MACROS]
    if unknown:
        raise SweepError(f"{path}: command macros {unknown} are not supported here; use {list(MACROS)}")
    if "${program}" in cmd and not sweep.get("program"):
        raise SweepError(f"{path}: command uses ${{program}} but 'program' is not set")
    return sweep


def distribution(spec: Dict[str, Any]) -> str:
    if "value" in spec:
        return "constant"
    if "values" in spec:
        return "categorical"
    return spec.get("distribution", "uniform")


def _check_spec(path: Path, name: str, spec: Any, method: str) -> None:
    where = f"{path}: parameter {name!r}"
    if not isinstance(spec, dict):
        raise SweepError(f"{where}: expected a mapping such as {{values: [...]}} or {{min: .., max: ..}}, got {spec!r}")
    kind = distribution(spec)
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{where}: distribution {kind!r} is not supported; use one of {list(DISTRIBUTIONS)}")
    if kind == "categorical" and (not isinstance(spec["values"], list) or not spec["values"]):
        raise SweepError(f"{where}: 'values' must be a non-empty list")
    if (kind == "constant" and spec["value"] is None) or (kind == "categorical" and None in spec["values"]):
        raise SweepError(f"{where}: null is not a usable sweep value (a W&B agent passes it as the string 'None'); "
                         "put fixed overrides such as key=null in 'command' instead")
    if kind == "categorical":
        vals = spec["values"]
        probs = spec.get("probabilities")
        if probs is not None and (len(probs) != len(vals) or not math.isclose(sum(probs), 1.0, abs_tol=1e-6)):
            raise SweepError(f"{where}: 'probabilities' must have one entry per value and sum to 1")
    elif kind == "normal":
        if "sigma" in spec and spec["sigma"] <= 0:
            raise SweepError(f"{where}: sigma must be > 0")
    elif kind != "constant":
        if "min" not in spec or "max" not in spec or not spec["min"] < spec["max"]:
            raise SweepError(f"{where}: {kind} needs min < max, got {spec}")
        if kind.startswith("log") or kind.startswith("q_log"):
            if spec["min"] <= 0:
                raise SweepError(f"{where}: {kind} needs min > 0")
    if method == "grid" and kind not in ("constant", "categorical"):
        raise SweepError(f"{where}: a grid sweep needs 'value' or 'values', not a {kind} distribution")


def _draw(spec: Dict[str, Any], rng: np.random.Generator) -> Any:
    kind = distribution(spec)
    if kind == "constant":
        return spec["value"]
    if kind == "categorical":
        i = int(rng.choice(len(spec["values"]), p=spec.get("probabilities")))
        return spec["values"][i]
    if kind == "normal":
        return float(rng.normal(spec.get("mu", 0.0), spec.get("sigma", 1.0)))
    lo, hi = spec["min"], spec["max"]
    if kind == "int_uniform":
        return int(rng.integers(int(lo), int(hi) + 1))
    if kind in ("log_uniform_values", "q_log_uniform_values"):
        v = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
    else:
        v = float(rng.uniform(lo, hi))
    if kind.startswith("q_"):
        q = spec.get("q", 1.0)
        v = round(v / q) * q
    return v


def sample(sweep: Dict[str, Any], count: Optional[int] = None, seed: int = 0) -> List[Dict[str, Any]]:
    """Points of the sweep: the grid in order (at most ``count``), or ``count`` seeded random draws."""
    params = sweep["parameters"]
    if sweep["method"] == "grid":
        names = list(params)
        choices = [[params[n]["value"]] if "value" in params[n] else list(params[n]["values"]) for n in names]
        points = [dict(zip(names, combo)) for combo in itertools.product(*choices)]
        return points[:count] if count else points
    if not count:
        raise SweepError(f"a {sweep['method']} sweep needs a trial count (--count N)")
    rng = np.random.default_rng(seed)
    return [{n: _draw(s, rng) for n, s in params.items()} for _ in range(count)]


def format_value(v: Any) -> str:
    """A value as a W&B agent writes it after ``key=``: Python's ``str`` (``True``, ``[64, 64]``),
    which the config's override parser reads back (``null`` must not be a sweep value: it would
    arrive as the string ``None``)."""
    return str(v)


def command_for(sweep: Dict[str, Any], point: Dict[str, Any], interpreter: str = sys.executable) -> List[str]:
    """The command line a W&B agent builds for ``point``: the ``command`` list with its macros expanded."""
    out: List[str] = []
    for c in sweep["command"]:
        if c == "${env}":
            continue  # the agent prefixes /usr/bin/env; the environment is inherited here
        if c == "${interpreter}":
            out.append(interpreter)
        elif c == "${program}":
            out.append(str(sweep["program"]))
        elif c == "${args_no_hyphens}":
            out += [f"{k}={format_value(v)}" for k, v in point.items()]
        elif c == "${args}":
            out += [f"--{k}={format_value(v)}" for k, v in point.items()]
        else:
            out.append(str(c))
    return out


def check_parameters(sweep: Dict[str, Any], config: Optional[str] = None) -> None:
    """Raise ``ConfigError`` unless every parameter (with a sampled value) is a valid override of ``config``."""
    from lightning_distill.config.run import load_config

    point = sample(sweep, count=1, seed=0)[0]
    load_config(config, [f"{k}={format_value(v)}" for k, v in point.items()])


def trial_metric(run_dir: Path, name: str, goal: str) -> Optional[float]:
    """A trial's metric: the best (by ``goal``) value of ``name`` in its CSV log, else ``results.json``."""
    csv = run_dir / "logs" / "metrics.csv"
    if csv.is_file():
        import csv as _csv

        with csv.open() as f:
            vals = [float(r[name]) for r in _csv.DictReader(f) if r.get(name) not in (None, "")]
        vals = [v for v in vals if not math.isnan(v)]
        if vals:
            return max(vals) if goal == "maximize" else min(vals)
    res = run_dir / "results.json"
    if res.is_file():
        r = json.loads(res.read_text())
        if name == "val/dice":
            return (r.get("val") or {}).get("dice_best")
        if name.startswith("test/"):
            return (r.get("test") or {}).get(name[5:] + "_mean", (r.get("test") or {}).get(name[5:]))
    return None


def run_local(path: str | Path, count: Optional[int], out: str | Path, seed: int = 0, extra: Sequence[str] = (),
              dry_run: bool = False, log=print) -> List[Dict[str, Any]]:
    """Run the sweep's trials here, one after the other, as subprocesses with the agent's command line.

    Each trial writes into ``out/trial_NNN`` (``output_dir=`` is appended to its command, then
    ``extra``); every finished trial is appended to ``out/trials.jsonl`` and the table
    ``out/results.md`` is rewritten. Returns the trial records.
    """
    from lightning_distill.lab.bench_grid import append_record
    from lightning_distill.io import atomic_write

    sweep = load_sweep(path)
    points = sample(sweep, count, seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metric, goal = sweep["metric"]["name"], sweep["metric"]["goal"]
    records: List[Dict[str, Any]] = []
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    for i, point in enumerate(points):
        run_dir = out / f"trial_{i:03d}"
        cmd = command_for(sweep, point) + [f"output_dir={run_dir}", *extra]
        log(f"[{i + 1}/{len(points)}] {' '.join(cmd)}")
        if dry_run:
            continue
        t0 = time.time()
        rc = subprocess.run(cmd, env=env).returncode
        rec = {"key": f"trial_{i:03d}", "params": point, "command": cmd, "returncode": rc,
               "metric": metric, "value": trial_metric(run_dir, metric, goal) if rc == 0 else None,
               "wall_time_s": round(time.time() - t0, 1), "output_dir": str(run_dir)}
        append_record(out / "trials.jsonl", rec)
        records.append(rec)
        atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(results_table(sweep, records, str(path))))
        log(f"    {metric} = {rec['value']} (exit {rc}, {rec['wall_time_s']} s)")
    if records:
        log(results_table(sweep, records, str(path)))
    return records


def results_table(sweep: Dict[str, Any], records: Sequence[Dict[str, Any]], source: str = "") -> str:
    """Markdown: one row per trial (best first by the sweep's goal), its parameters and metric."""
    metric, goal = sweep["metric"]["name"], sweep["metric"]["goal"]
    names = list(sweep["parameters"])
    sign = -1 if goal == "maximize" else 1
    rows = sorted(records, key=lambda r: (r["value"] is None, sign * (r["value"] or 0.0)))
    lines = [f"Sweep `{source}` ({sweep['method']}, {len(records)} trials run locally), {metric} ({goal}; best "
             "validation value of each trial):", "",
             "| trial | " + " | ".join(names) + f" | {metric} | exit | wall (s) |",
             "|---|" + "---|" * len(names) + "---|---|---|"]
    for r in rows:
        v = "n/a" if r["value"] is None else f"{r['value']:.4f}"
        lines.append(f"| {r['key']} | " + " | ".join(format_value(r["params"][n]) for n in names)
                     + f" | {v} | {r['returncode']} | {r['wall_time_s']} |")
    return "\n".join(lines) + "\n"
