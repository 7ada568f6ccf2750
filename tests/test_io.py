"""Artifacts written safely (lightning_distill/io.py): the user's permissions, the previous file kept through a crash
or a SIGKILL mid-write, truncated files named with their problem when read."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from conftest import subprocess_env as _env
from lightning_distill.bank import load_bank, save_bank
from lightning_distill.io import atomic_write, staged_dir, write_json


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_atomic_writes_and_staged_folders_get_the_users_permissions(tmp_path, umask_022):
    """Results, banks and masks are readable like any file the user creates (umask 022: 0o644 files,
    0o755 folders), not the private 0o600 / 0o700 of temporary files."""
    f = tmp_path / "results.json"
    atomic_write(f, lambda tmp: open(tmp, "w").write("{}"))
    assert stat.S_IMODE(f.stat().st_mode) == 0o644 and f.read_text() == "{}"
    out = tmp_path / "masks"
    with staged_dir(out) as tmp:
        (tmp / "a.nii.gz").write_bytes(b"x")
    assert stat.S_IMODE(out.stat().st_mode) == 0o755
    assert stat.S_IMODE((out / "a.nii.gz").stat().st_mode) == 0o644
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


@pytest.mark.parametrize("kind", ["bank", "json", "bytes", "checkpoint"])
def test_a_crash_while_writing_keeps_the_previous_file(tmp_path, kind, monkeypatch):
    from lightning_distill.bank import Bank
    from lightning_distill.callbacks import AtomicCheckpointIO

    target = tmp_path / {"bank": "prototypes.pt", "json": "results.json", "bytes": "config.yaml",
                         "checkpoint": "last.ckpt"}[kind]
    bank = Bank(torch.eye(3), torch.ones(3), ["background", "a", "b"], 1.0, "prob")
    write = {"bank": lambda: save_bank(target, bank), "json": lambda: write_json(target, {"dice": 0.5}),
             "bytes": lambda: atomic_write(target, lambda tmp: Path(tmp).write_text("seed: 0\n")),
             "checkpoint": lambda: AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)}[kind]
    write()
    before = target.read_bytes()

    def crash(obj, f, *a, **k):  # half the bytes reach the disk, then the process dies
        Path(f).write_bytes(b"\x80partial")
        raise KeyboardInterrupt

    def crash_text(self, *a, **k):
        Path.write_bytes(self, b"{\"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    monkeypatch.setattr(Path, "write_text", crash_text)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp file left behind


def test_sigkill_while_writing_keeps_the_previous_file(tmp_path):
    """A process killed in the middle of a (slow, chunked) atomic write: the old file is untouched."""
    target = tmp_path / "prototypes.pt"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import time
        from lightning_distill.io import atomic_write
        def slow(tmp):
            with open(tmp, "wb") as f:
                for _ in range(1000):
                    f.write(b"x" * 4096); f.flush(); time.sleep(0.01)
        atomic_write({str(target)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".prototypes.pt.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"previous"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".prototypes.pt.") for p in leftovers)  # the temp file, never the target


def test_truncated_artifacts_give_clear_errors(tmp_path, teacher_bank):
    from lightning_distill.checkpoints import load_checkpoint
    from lightning_distill.lab.report import load_results

    for name, load, message in [("results.json", load_results, "truncated or corrupt"),
                                ("prototypes.pt", load_bank, "truncated or not a bank"),
                                ("checkpoints/last.ckpt", load_checkpoint, "truncated or not a checkpoint")]:
        data = (teacher_bank / name).read_bytes()
        cut = tmp_path / Path(name).name
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"{cut.name}.*{message}"):
            load(cut)


def test_a_killed_commands_staged_folder_is_removed_by_the_next_run(tmp_path):
    """SIGKILL (or SIGTERM) while writing leaves the staged folder beside the output; the next run removes it
    (issue 35: `.NAME.partial-*` stayed for good) and leaves the staged folders it cannot judge."""
    from lightning_distill.io import _HOST

    out = tmp_path / "slices"
    code = (f"import os\nfrom lightning_distill.io import staged_dir\nwith staged_dir({str(out)!r}) as t:\n"
            "    (t / 'x.nii.gz').write_text('x')\n    os.kill(os.getpid(), 9)\n")
    assert subprocess.run([sys.executable, "-c", code]).returncode == -9
    left = list(tmp_path.glob(".slices.partial-*"))
    assert len(left) == 1 and not out.exists()
    running = tmp_path / f".slices.partial-{_HOST}-{os.getpid()}-abc"  # a command still writing (this process)
    elsewhere = tmp_path / f".slices.partial-{'0' * 8 if _HOST != '0' * 8 else '1' * 8}-1-abc"  # another machine
    older = tmp_path / ".slices.partial-q1w2e3"  # an older version's: no process in its name
    for d in (running, elsewhere, older):
        d.mkdir()
    with staged_dir(out) as tmp:
        (tmp / "a.nii.gz").write_text("a")
    assert not left[0].exists() and running.is_dir() and elsewhere.is_dir() and older.is_dir()
    assert [p.name for p in out.iterdir()] == ["a.nii.gz"]
