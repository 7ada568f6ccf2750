"""A benchmark's grid and its results file: the part of the benchmark that the report, the sweeps and
the runner share (below all three, so that none imports another for it).

* :class:`GridRun`, :func:`grid`, :func:`runs_at`: the student runs a benchmark YAML describes.
* :func:`read_records`, :func:`append_record`: the JSON-lines results file (atomic, locked appends).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Sequence

from omegaconf import DictConfig

from lightning_distill.io import atomic_write, exclusive


@dataclass(frozen=True)
class GridRun:
    method: str
    arch: str
    fraction: float
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}|{self.arch}|f{self.fraction:g}|s{self.seed}"

    @property
    def dirname(self) -> str:
        return f"{self.method}_{self.arch}_f{self.fraction:g}_s{self.seed}"


def among(fraction: float, fractions: Sequence[float]) -> bool:
    return any(abs(float(x) - float(fraction)) < 1e-12 for x in fractions)


def runs_at(cfg: DictConfig, method: str, fraction: float) -> bool:
    """Whether ``method`` runs at training ``fraction`` (``fractions_of``; default every fraction)."""
    only = cfg.fractions_of.get(method) if "fractions_of" in cfg else None
    return only is None or among(fraction, only)


def grid(cfg: DictConfig) -> List[GridRun]:
    """Every student run of the benchmark, in run order (seed, fraction, architecture, method)."""
    return [GridRun(m, a, float(f), int(s)) for s in cfg.seeds for f in cfg.fractions for a in cfg.archs for m in cfg.methods
            if runs_at(cfg, m, f)]


def read_records(path: str | Path) -> List[Dict[str, Any]]:
    """The JSON lines of a results file (``[]`` when it does not exist yet).

    Raises:
        ValueError: a line is not valid JSON (names the file and line).
    """
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}, line {i}: not a JSON record ({e.msg}); the file is damaged: remove that line "
                             "to re-run the run it belonged to") from None
    return records


def append_record(path: str | Path, record: Dict[str, Any]) -> bool:
    """Add one JSON line unless a record with the same ``key`` is there already; returns whether it was added.

    The file is rewritten atomically (temp file + rename), so a crash keeps the previous lines intact;
    a lock file ``<path>.lock`` created exclusively serialises writers (parallel workers, array tasks,
    nodes: ``flock`` is unreliable on NFS and Lustre; :func:`lightning_distill.io.exclusive`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(path.with_name(path.name + ".lock")):
        if any(r.get("key") == record.get("key") for r in read_records(path)):
            return False
        previous = path.read_text() if path.exists() else ""
        if previous and not previous.endswith("\n"):
            previous += "\n"
        text = previous + json.dumps(record) + "\n"  # key order kept (organ order)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
        return True


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
