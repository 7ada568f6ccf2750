"""Safe file output: every artifact is written to a temporary file in the same folder and renamed
into place, so a crash while writing leaves the previous file intact and never a half-written one."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path`` (same folder, same ending)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else (path.suffix or ".tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def save_nifti(image, path: str | os.PathLike) -> None:
    import nibabel as nib

    atomic_write(path, lambda tmp: nib.save(image, tmp))


def new_dataset_dir(dst: str | os.PathLike, overwrite: bool = False) -> Path:
    """An empty nnU-Net raw folder (``imagesTr``, ``labelsTr``); a non-empty one only with ``overwrite``."""
    dst = Path(dst)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(dst)
    (dst / "imagesTr").mkdir(parents=True, exist_ok=True)
    (dst / "labelsTr").mkdir(parents=True, exist_ok=True)
    return dst
