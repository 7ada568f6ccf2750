"""Every notebook in notebooks/ runs top to bottom (the installed package only, CPU)."""

import glob
import os

import pytest

from conftest import REPO

NOTEBOOKS = sorted(glob.glob(os.path.join(REPO, "notebooks", "*.ipynb")))
# a line each notebook prints when it ran through its main part
EXPECTED = {"01_data_exploration.ipynb": "student slices", "02_prototype_bank_and_dist.ipynb": "DIST inter=",
            "03_benchmark_comparison.ipynb": "better in"}


@pytest.mark.parametrize("path", sorted(set(NOTEBOOKS) | {os.path.join(REPO, "notebooks", n) for n in EXPECTED}),
                         ids=os.path.basename)
def test_notebook_runs(path, tmp_path):
    """Every notebook on disk, and every one listed in EXPECTED, runs and prints its expected line."""
    assert os.path.isfile(path), f"{path} is listed in EXPECTED but absent"
    assert os.path.basename(path) in EXPECTED, f"{path}: add the line it prints when it ran through to EXPECTED"
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(path, as_version=4)
    env_bank = os.environ.get("LD_BANK")
    os.environ["LD_BANK"] = str(tmp_path / "no_bank.pt")  # deterministic: the notebook trains its own tiny teacher
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": os.path.dirname(path)}}).execute()
    finally:
        if env_bank is None:
            os.environ.pop("LD_BANK", None)
        else:
            os.environ["LD_BANK"] = env_bank
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    assert any(EXPECTED[os.path.basename(path)] in o.get("text", "") for o in outputs)
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {}) for o in outputs)
