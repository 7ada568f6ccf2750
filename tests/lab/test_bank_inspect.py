"""``lightning-distill bank inspect`` (lightning_distill/lab/bank_inspect.py): a bank read in every geometry."""

from lightning_distill.losses.prototype import GEOMETRIES


def test_bank_inspect_cli_prints_every_geometry_and_writes_a_png(teacher_bank, tmp_path, capsys):
    from lightning_distill.cli import main

    png = tmp_path / "inspect.png"
    assert main(["bank", "inspect", str(teacher_bank / "prototypes.pt"), "--png", str(png)]) == 0
    out = capsys.readouterr().out
    for g in GEOMETRIES:
        assert f"| {g} | " in out
    assert "| tau 0.5 | tau 1 | tau 2 | tau 4 |" in out and "entropy" in out and "liver" in out
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert main(["bank", "inspect", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt" in capsys.readouterr().err
