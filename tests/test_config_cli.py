import json
import os

import pytest
import torch

from lightning_distill.cli import main
from lightning_distill.config import ConfigError, load_config

from conftest import REPO

TEACHER = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT = os.path.join(REPO, "experiments/student.yaml")
BASELINE = os.path.join(REPO, "experiments/baseline.yaml")


@pytest.mark.parametrize("path", [TEACHER, STUDENT, BASELINE])
def test_experiment_configs_load(path):
    cfg = load_config(path)
    assert cfg.stage in ("teacher", "student")


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        load_config(STUDENT, ["data.train_fracton=0.5"])
    msg = str(e.value)
    assert "data.train_fracton" in msg and "data.train_fraction" in msg and "batch_size" in msg
    with pytest.raises(ConfigError, match="distill.weight"):
        load_config(STUDENT, ["distil.weight=0"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config(STUDENT, ["trainer.max_step=3"])


def test_unknown_key_in_yaml_file_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("stage: student\ndata:\n  batchsize: 4\n")
    with pytest.raises(ConfigError, match=r"bad.yaml.*data.batchsize.*data.batch_size"):
        load_config(p)


def test_wrong_type_and_choice():
    with pytest.raises(ConfigError, match="data.batch_size"):
        load_config(STUDENT, ["data.batch_size=many"])
    with pytest.raises(ConfigError, match="stage"):
        load_config(STUDENT, ["stage=teachr"])


def test_cli_reports_config_errors(capsys):
    assert main(["fit", STUDENT, "data.nope=1"]) == 2
    assert "unknown config key 'data.nope'" in capsys.readouterr().err
    assert main(["fit", "does/not/exist.yaml"]) == 2


def test_cli_config_prints_resolved(capsys):
    assert main(["config", STUDENT, "distill.weight=0.5"]) == 0
    assert "weight: 0.5" in capsys.readouterr().out


def test_fast_dev_run_teacher_and_student(tmp_path, tiny_teacher, tiny_student, teacher_bank):
    assert main(["fit", TEACHER, f"output_dir={tmp_path / 't'}", *tiny_teacher, "trainer.fast_dev_run=true"]) == 0
    assert main(["fit", STUDENT, f"output_dir={tmp_path / 's'}", *tiny_student,
                 f"distill.prototypes={teacher_bank / 'prototypes.pt'}", "trainer.fast_dev_run=true"]) == 0
    assert (tmp_path / "s" / "results.json").is_file()


def test_tiny_teacher_then_student_run_writes_outputs(tmp_path, tiny_teacher, tiny_student):
    """Acceptance: a few steps of teacher then student through the CLI, in well under a minute."""
    t_out, s_out, b_out = tmp_path / "teacher", tmp_path / "student", tmp_path / "baseline"
    assert main(["fit", TEACHER, f"output_dir={t_out}", *tiny_teacher]) == 0
    bank = torch.load(t_out / "prototypes.pt", weights_only=True)
    for key in ("prototypes", "counts", "class_names", "num_classes", "tau", "space", "config",
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
    assert "train/dist_inter" not in (b_out / "logs" / "metrics.csv").read_text().splitlines()[0]


def test_student_without_bank_but_nonzero_weight_is_refused(tmp_path, tiny_student, capsys):
    assert main(["fit", STUDENT, f"output_dir={tmp_path}", *tiny_student, "distill.prototypes=null"]) == 2
    assert "distill.prototypes" in capsys.readouterr().err


def test_student_with_missing_bank_file(tmp_path, tiny_student, capsys):
    assert main(["fit", STUDENT, f"output_dir={tmp_path}", *tiny_student, f"distill.prototypes={tmp_path}/none.pt"]) == 2
    assert "none.pt" in capsys.readouterr().err
