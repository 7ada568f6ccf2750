"""Run tables (lightning_distill/lab/report.py)."""


def test_compare_table_adds_surface_dice_when_recorded(tmp_path):
    import json

    from lightning_distill.lab.report import compare_table

    old = {"test": {"dice": {"liver": 0.8}, "dice_mean": 0.8, "hd95": {"liver": 3.0}, "hd95_mean": 3.0, "num_cases": 2}}
    new = json.loads(json.dumps(old))
    new["test"].update(surface_dice={"liver": 0.7}, surface_dice_mean=0.7)
    for name, r in (("old", old), ("new", new)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(r))
    assert "surface Dice" not in compare_table([tmp_path / "old"])
    text = compare_table([tmp_path / "old", tmp_path / "new"])
    assert "| surface Dice | old | new |" in text and "| liver | n/a | 0.700 |" in text
    assert text.index("| Dice |") < text.index("| surface Dice |") < text.index("| HD95 (mm) |")
