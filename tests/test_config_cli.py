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


def test_student_without_bank_but_nonzero_weight_is_refused(tmp_path, tiny_student, capsys):
    assert main(["fit", STUDENT, f"output_dir={tmp_path}", *tiny_student, "distill.prototypes=null"]) == 2
    assert "distill.prototypes" in capsys.readouterr().err


def test_student_with_missing_bank_file(tmp_path, tiny_student, capsys):
    assert main(["fit", STUDENT, f"output_dir={tmp_path}", *tiny_student, f"distill.prototypes={tmp_path}/none.pt"]) == 2
    assert "none.pt" in capsys.readouterr().err


def test_extends_merges_base_file_and_reports_errors_in_the_right_file(tmp_path):
    cfg = load_config(BASELINE)
    student = load_config(STUDENT)
    assert cfg.distill.weight == 0 and cfg.distill.prototypes is None and cfg.output_dir == "runs/baseline"
    assert cfg.data == student.data and cfg.model == student.model  # everything else from student.yaml
    (tmp_path / "base.yaml").write_text("data:\n  batchsize: 3\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nseed: 2\n")
    with pytest.raises(ConfigError, match=r"base.yaml.*data.batchsize"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "loop.yaml")


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


# ------------------------------------------------------------------ one loader, choices beside their fields (issue 34)
def test_every_choice_default_is_one_of_its_choices_at_every_depth():
    from omegaconf import OmegaConf

    from lightning_distill.config import BankBuildConfig, RunConfig, TeachConfig, choices_of

    for schema in (RunConfig, BankBuildConfig, TeachConfig):
        cfg = OmegaConf.structured(schema)
        for key, options in choices_of(schema).items():
            allowed = options() if callable(options) else options
            assert OmegaConf.select(cfg, key) in allowed, (schema.__name__, key)
    run = choices_of(RunConfig)
    # the nested data section of CMEDL's second modality gets the data section's choices without a second table
    assert run["cmedl.target.nifti.unmapped"] == run["data.nifti.unmapped"] and "distill.method" in run
    assert choices_of(TeachConfig)["data.phantom.version"] == run["data.phantom.version"]


def test_a_checkpoints_config_dict_gets_the_same_checks_as_a_file(tmp_path):
    from lightning_distill.config import load_config_dict, to_dict

    good = to_dict(load_config(None, []))
    assert load_config_dict(good).distill.method == "prototype"
    bad = {**good, "distill": {**good["distill"], "geometry": "cosine"}}
    with pytest.raises(ConfigError, match=r"ckpt: distill.geometry='cosine' is not one of \['prob', 'logprob', 'offdiag'\]"):
        load_config_dict(bad, where="ckpt")
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        load_config_dict({**good, "trainer": {"max_stepz": 3}}, where="ckpt")


@pytest.mark.parametrize("command, keys", [
    (["bank", "build"], ["model.format = 'checkpoint'  (one of: checkpoint, monai, bundle, torchscript)",
                         "threshold = 0.9  # unlabelled volumes", "data.preprocess.modality = 'CT'  (one of: CT, MR, none)"]),
    (["teach"], ["model.format = 'checkpoint'  (one of: checkpoint, monai, bundle, torchscript, none)",
                 "levels.mode = 'range'  (one of: range, match)", "data.phantom.version = '0.3'  (one of: 0.3, 0.5)"]),
])
def test_command_help_lists_every_config_key_with_its_default_and_choices(capsys, command, keys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    out = capsys.readouterr().out
    assert all(k in out for k in keys), out


def test_one_rule_says_which_run_is_a_baseline_and_what_a_report_calls_each_run():
    from omegaconf import OmegaConf

    from lightning_distill.config import is_baseline, run_label

    def label(*overrides):
        cfg = load_config(STUDENT, list(overrides))
        return is_baseline(cfg), run_label(cfg)

    assert label("distill.weight=0", "distill.prototypes=null") == (True, "baseline")
    assert label("distill.prototypes=bank.pt") == (False, "distilled")
    assert label("distill.method=sikd", "distill.teacher=t.ckpt", "distill.weight=2") == (False, "sikd")  # a report once called it baseline
    assert label("distill.method=sikd", "distill.weight=0") == (True, "baseline")
    assert label("distill.method=cmedl", "distill.weight=0") == (False, "cmedl")  # its translator and teacher still train
    assert label("distill.weight=0", "transfer.slices=s") == (False, "transfer")
    assert label("distill.weight=0", "transfer.union=s", "loss.class_balance=inverse_frequency") == (True, "balanced baseline+union")
    assert label("stage=teacher") == (False, "teacher")
    old = OmegaConf.create({"stage": "student", "distill": {"weight": 0.0}})  # a config of an older version lacks keys
    assert is_baseline(old) and run_label(old) == "baseline"
