"""Safe file output: every artifact is written to a temporary file in the same folder and renamed
into place, so a crash while writing leaves the previous file intact and never a half-written one."""

from __future__ import annotations

import glob
import hashlib
import json
import os
import random
import re
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional, Sequence

import nibabel as nib


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod(path: str | os.PathLike, mode: int) -> None:
    """``mode`` less the umask; file systems that refuse chmod (some network mounts) keep their own."""
    try:
        os.chmod(path, mode & ~_umask())
    except OSError:
        pass


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)``, then rename ``tmp_path`` to ``path`` (same folder, same ending).

    The file gets the permissions of any file the user creates (``0o666`` less the umask), not the
    private ``0o600`` of a temporary file: results, banks and masks stay readable by a lab's group.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = ".nii.gz" if path.name.endswith(".nii.gz") else (path.suffix or ".tmp")
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        write(tmp)
        _chmod(tmp, 0o666)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def file_sha256(path: str | os.PathLike) -> Optional[str]:
    """The SHA-256 hex digest of a file's bytes (read in 1 MiB chunks), or ``None`` when it is no file."""
    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with p.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=2)))


def write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_nifti(image, path: str | os.PathLike) -> None:
    atomic_write(path, lambda tmp: nib.save(image, tmp))


def listed(items: Sequence[Any], limit: int = 10) -> str:
    """``items`` for a message: at most ``limit`` of them, and how many more there are when the list is cut."""
    items = list(items)
    return f"{items[:limit]}" + (f" (and {len(items) - limit} more)" if len(items) > limit else "")


_HOST = hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]  # names a staged folder's machine
_PARTIAL = re.compile(r"\.partial-([0-9a-f]{8})-(\d+)-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_partials(dst: str | os.PathLike) -> List[Path]:
    """Remove the staged folders of ``dst`` (:func:`staged_dir`) left by a killed command: those written on this
    machine by a process that no longer runs. A staged folder of a running command, of another machine (a shared
    file system) or of an older version (no process in its name) is left alone. Returns the removed folders."""
    dst = Path(dst)
    removed = []
    for p in dst.parent.glob(f".{glob.escape(dst.name)}.partial-*"):
        m = _PARTIAL.search(p.name)
        if p.is_dir() and m and m.group(1) == _HOST and not _alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def staged_dir(dst: str | os.PathLike, overwrite: bool = False, merge: bool = False) -> Iterator[Path]:
    """Build a folder's content in a temporary folder beside ``dst``, and put it in place only when
    the ``with`` block ends without an exception: a failure removes the temporary folder and leaves
    ``dst`` as it was (absent, or with its previous content).

    Args:
        dst: the output folder.
        overwrite: replace a non-empty ``dst`` as a whole (its old content is removed only after the
            new folder is complete); without it a non-empty ``dst`` raises ``FileExistsError`` before
            anything is written. Ignored with ``merge``.
        merge: move the new files into ``dst`` (creating it if needed), replacing files of the same
            name and keeping the others (e.g. masks predicted earlier into the same folder).

    Yields:
        The temporary folder to write into (same file system as ``dst``, so the final moves are renames), named
        ``.<dst name>.partial-<machine>-<pid>-<random>``; a later call removes it if its process was killed
        (:func:`remove_stale_partials`).
    """
    dst = Path(dst)
    if not merge and dst.exists() and (not dst.is_dir() or any(dst.iterdir())) and not overwrite:
        raise FileExistsError(f"{dst} exists and is not empty; pass --overwrite to replace it")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder")
    dst.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(dst)
    tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.partial-{_HOST}-{os.getpid()}-"))
    _chmod(tmp, 0o777)  # a folder the user creates, not mkdtemp's private 0o700
    try:
        yield tmp
        if merge:
            dst.mkdir(exist_ok=True)
            for f in sorted(tmp.rglob("*")):
                if f.is_file():
                    target = dst / f.relative_to(tmp)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    os.replace(f, target)
        else:
            old = None
            if dst.exists():
                old = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}.old-"))
                os.replace(dst, old / dst.name)
            try:
                os.replace(tmp, dst)
            except BaseException:
                if old is not None:  # put the previous content back
                    os.replace(old / dst.name, dst)
                raise
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def nnunet_dirs(root: Path) -> Path:
    """Create ``imagesTr`` and ``labelsTr`` in ``root`` (an nnU-Net v2 raw dataset folder); returns ``root``."""
    (root / "imagesTr").mkdir(parents=True, exist_ok=True)
    (root / "labelsTr").mkdir(parents=True, exist_ok=True)
    return root


def _claim_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")})


def read_claim(path: str | os.PathLike) -> dict:
    """The ``{"host", "pid", "since"}`` of a claim file (``{}`` when unreadable or gone)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}


def _claim_is_stale(info: dict) -> bool:
    """A claim of a process on this host that no longer runs (a claim of another host is never judged stale)."""

    if info.get("host") != socket.gethostname() or not isinstance(info.get("pid"), int):
        return False
    try:
        os.kill(info["pid"], 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def claim(path: str | os.PathLike) -> bool:
    """Claim ``path`` by creating it exclusively (``O_CREAT | O_EXCL``, atomic also on NFS v3+ and Lustre,
    unlike ``flock``); returns whether this process now holds it. The file records host, pid and time;
    a claim left by a dead process of this host is taken over. :func:`release` removes it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _claim_is_stale(read_claim(path)):
                return False
            try:
                path.unlink()  # the dead holder's: try once more
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(_claim_text())
        return True
    return False


def release(path: str | os.PathLike) -> None:
    """Remove a claim this process holds (a claim of another process is left alone)."""
    info = read_claim(path)
    if info.get("pid") == os.getpid():

        if info.get("host") == socket.gethostname():
            Path(path).unlink(missing_ok=True)


@contextmanager
def exclusive(path: str | os.PathLike, timeout: float = 120.0, stale_after: float = 60.0) -> Iterator[None]:
    """A short critical section between processes, on any file system: a lock file created exclusively.

    Waits (up to ``timeout`` seconds) while another process holds it; a lock file older than
    ``stale_after`` seconds (its holder died inside the section, which lasts milliseconds) is removed.

    Raises:
        TimeoutError: naming the lock file, when it could not be taken in time.
    """

    path = Path(path)
    t0 = time.monotonic()
    while not claim(path):
        try:
            if time.time() - path.stat().st_mtime > stale_after:
                path.unlink(missing_ok=True)
                continue
        except FileNotFoundError:
            continue
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"could not take the lock {path} in {timeout:.0f} s (held by {read_claim(path) or 'unknown'}); "
                               "delete it if no benchmark process is running")
        time.sleep(0.02 + 0.08 * random.random())
    try:
        yield
    finally:
        release(path)
