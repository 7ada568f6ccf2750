"""A persistent on-disk cache of preprocessed NIfTI cases (``data.nifti.cache_dir``).

One ``.npz`` file per case holds what a :class:`~lightning_distill.data.sources.NiftiSource` makes of
it (preprocessed image and label, spacing, the raw image's quantile profile, the raw label ids and
their voxel counts), named by the case id and a key: a hash of everything the arrays depend on
(preprocessing settings, label mapping, dimensionality and slice mode, and each input file's path,
size and modification time). A changed file or setting gives another key, so a stale entry is never
read; entries are written atomically, so a killed run leaves none half-written. Several processes
(DDP ranks, loader workers) may share the folder: they write the same bytes under the same name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import numpy as np

from lightning_distill.io import atomic_write

CACHE_FORMAT = 1


def case_key(files: Sequence[Path], settings: Dict[str, Any]) -> str:
    """A 16-hex-digit key of a case's input files (path, size, mtime) and the settings its arrays depend on."""
    stats = []
    for f in files:
        st = Path(f).stat()
        stats.append([str(Path(f).resolve()), st.st_size, st.st_mtime_ns])
    blob = json.dumps({"format": CACHE_FORMAT, "files": stats, "settings": settings}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CaseCache:
    """``get(case_id, key)`` / ``put(case_id, key, arrays)`` of plain numpy arrays in ``folder``."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.hits = self.misses = 0

    def path(self, case_id: str, key: str) -> Path:
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in case_id)
        return self.folder / f"{safe}-{key}.npz"

    def get(self, case_id: str, key: str) -> Optional[Dict[str, np.ndarray]]:
        p = self.path(case_id, key)
        if not p.is_file():
            self.misses += 1
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        except Exception:  # noqa: BLE001 - an unreadable entry is a miss; it is rewritten
            self.misses += 1
            return None
        self.hits += 1
        return out

    def put(self, case_id: str, key: str, arrays: Dict[str, np.ndarray]) -> None:
        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(self.path(case_id, key), write)
