"""The ``lightning-distill`` command (lightning_distill/cli.py): config errors and refused runs exit 2 with the reason,
``config`` prints the resolved config, ``--help`` lists a command's keys."""

import os

import pytest

from conftest import REPO
from lightning_distill.cli import main

STUDENT = os.path.join(REPO, "experiments/student.yaml")


def test_cli_reports_config_errors(capsys):
    assert main(["fit", STUDENT, "data.nope=1"]) == 2
    assert "unknown config key 'data.nope'" in capsys.readouterr().err
    assert main(["fit", "does/not/exist.yaml"]) == 2


def test_cli_config_prints_resolved(capsys):
    assert main(["config", STUDENT, "distill.weight=0.5"]) == 0
    assert "weight: 0.5" in capsys.readouterr().out


def test_student_without_bank_but_nonzero_weight_is_refused(tmp_path, tiny_student, capsys):
    assert main(["fit", STUDENT, f"output_dir={tmp_path}", *tiny_student, "distill.prototypes=null"]) == 2
    assert "distill.prototypes" in capsys.readouterr().err


def test_student_with_missing_bank_file(tmp_path, tiny_student, capsys):
    assert main(["fit", STUDENT, f"output_dir={tmp_path}", *tiny_student, f"distill.prototypes={tmp_path}/none.pt"]) == 2
    assert "none.pt" in capsys.readouterr().err


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
