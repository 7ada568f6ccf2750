"""Training runs end to end through ``lightning-distill fit`` (lightning_distill/train.py): teacher, student and
baseline write their outputs; a feature-space bank; the same seed gives the same run."""

import json
import os

import pytest
import torch

from conftest import REPO, TINY_TEACHER
from lightning_distill.bank import load_bank
from lightning_distill.cli import main

TEACHER = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT = os.path.join(REPO, "experiments/student.yaml")
BASELINE = os.path.join(REPO, "experiments/baseline.yaml")


def test_fast_dev_run_teacher_and_student(tmp_path, tiny_teacher, tiny_student, teacher_bank):
    assert main(["fit", TEACHER, f"output_dir={tmp_path / 't'}", *tiny_teacher, "trainer.fast_dev_run=true"]) == 0
    assert main(["fit", STUDENT, f"output_dir={tmp_path / 's'}", *tiny_student,
                 f"distill.prototypes={teacher_bank / 'prototypes.pt'}", "trainer.fast_dev_run=true"]) == 0
    assert (tmp_path / "s" / "results.json").is_file()


def test_tiny_teacher_then_student_run_writes_outputs(tmp_path, tiny_teacher, tiny_student, capsys):
    """Acceptance: a few steps of teacher then student through the CLI, in well under a minute."""
    t_out, s_out, b_out = tmp_path / "teacher", tmp_path / "student", tmp_path / "baseline"
    assert main(["fit", TEACHER, f"output_dir={t_out}", *tiny_teacher]) == 0
    bank = torch.load(t_out / "prototypes.pt", weights_only=True)
    for key in ("prototypes", "prototypes_by_tau", "counts", "class_names", "num_classes", "tau", "space", "config",
                "checkpoint_sha256", "version"):
        assert key in bank, key
    assert bank["prototypes"].shape == (9, 9) and bank["space"] == "prob"
    assert main(["fit", STUDENT, f"output_dir={s_out}", *tiny_student, f"distill.prototypes={t_out / 'prototypes.pt'}"]) == 0
    assert main(["fit", BASELINE, f"output_dir={b_out}", *tiny_student]) == 0
    for out in (t_out, s_out, b_out):
        res = json.loads((out / "results.json").read_text())
        test = res["test"]
        assert 0.0 <= test["dice_mean"] <= 1.0
        assert set(test["dice"]) == set(test["hd95"]) and "liver" in test["dice"]
        assert (out / "config.yaml").is_file() and (out / "checkpoints" / "last.ckpt").is_file()
    assert (s_out / "student_prototypes.pt").is_file()
    logged = (s_out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/dist_inter" in logged and "val/dice" in logged and "val/dice_liver" in logged
    assert "train/dist_grad_ratio" in logged  # how much the distillation term moves the logits (grad_every)
    assert "train/dist_inter" not in (b_out / "logs" / "metrics.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main(["report", str(t_out), str(s_out), str(b_out), "--names", "teacher", "distilled", "baseline",
                 "--plot", str(tmp_path / "dice.png"), "--bank-plot", str(t_out / "prototypes.pt"), str(tmp_path / "bank.png")]) == 0
    assert (tmp_path / "dice.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "bank.png").stat().st_size > 1000
    table = capsys.readouterr().out
    assert "| Dice | teacher | distilled | baseline |" in table and "| liver |" in table and "**mean**" in table


def test_feature_space_bank_end_to_end(tmp_path, tiny_teacher, tiny_student):
    t_out = tmp_path / "teacher"
    assert main(["fit", TEACHER, f"output_dir={t_out}", *tiny_teacher, "bank.space=feature", "bank.momentum=0.9"]) == 0
    from lightning_distill.bank import load_bank

    bank = load_bank(t_out / "prototypes.pt")
    assert bank.space == "feature" and bank.meta["mode"] == "ema" and bank.prototypes.shape[0] == 9
    assert bank.prototypes.shape[1] > 9  # K x D feature centroids (D = channels entering the head)
    s_out = tmp_path / "student"
    assert main(["fit", STUDENT, f"output_dir={s_out}", *tiny_student, f"distill.prototypes={t_out / 'prototypes.pt'}"]) == 0
    header = (s_out / "logs" / "metrics.csv").read_text().splitlines()[0]
    assert "train/dist_inter" in header and "train/dist_grad_ratio" in header  # measured on the features here
    ckpt = torch.load(s_out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert any(k.startswith("projector.") for k in ckpt["state_dict"])  # the learned 1x1 projection


@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["fit", TEACHER, f"output_dir={tmp_path / name}", f"seed={seed}", "pictures=0",
                     "trainer.deterministic=true", *TINY_TEACHER]) == 0
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text())["test"],
                      load_bank(tmp_path / name / "prototypes.pt").prototypes)
    print("test Dice seed 0, seed 0 again, seed 1:", [runs[k][0]["dice_mean"] for k in "abc"])
    assert runs["a"][0] == runs["b"][0] and torch.equal(runs["a"][1], runs["b"][1])
    assert runs["a"][0]["dice_mean"] != runs["c"][0]["dice_mean"]
    assert not torch.equal(runs["a"][1], runs["c"][1])
