import os
import stat

import pytest

from lightning_distill.io import atomic_write, staged_dir


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
