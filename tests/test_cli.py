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


def test_ctrl_c_ends_with_one_line(monkeypatch, capsys):
    """SIGINT (KeyboardInterrupt) exits 130 with one line, no traceback (issue 35)."""
    import lightning_distill.cli as cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli._COMMANDS, "config", interrupted)
    assert main(["config", os.path.join(REPO, "experiments/student.yaml")]) == 130
    err = capsys.readouterr().err
    assert err == "lightning-distill: interrupted (config)\n"


def test_package_warnings_print_as_one_line_without_a_source_path():
    import lightning_distill.cli as cli

    ours = cli._format_warning("x.nii.gz: intensities unlike", UserWarning, os.path.join(cli._PACKAGE_DIR, "results.py"), 9)
    assert ours == "lightning-distill: warning: x.nii.gz: intensities unlike\n"
    theirs = cli._format_warning("deprecated", FutureWarning, "/elsewhere/torch/jit.py", 3, "")
    assert theirs.startswith("/elsewhere/torch/jit.py:3: FutureWarning: deprecated")  # other libraries': as Python prints


def test_a_config_anywhere_extends_the_packages_experiments(tmp_path, capsys):
    """`extends: experiments/teacher.yaml` from a config outside the repository (README's my_teacher.yaml); a missing
    file names both places looked at (issue 35: it named only one, inside the user's folder)."""
    (tmp_path / "mine.yaml").write_text("extends: experiments/teacher.yaml\noutput_dir: runs/mine\n")
    assert main(["config", str(tmp_path / "mine.yaml")]) == 0
    assert "stage: teacher" in capsys.readouterr().out
    (tmp_path / "bad.yaml").write_text("extends: experiments/nosuch.yaml\n")
    assert main(["config", str(tmp_path / "bad.yaml")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'experiments' / 'nosuch.yaml'} nor {os.path.join(REPO, 'experiments', 'nosuch.yaml')}" in err


def test_deleting_a_schema_key_says_what_to_do_instead(capsys):
    assert main(["config", os.path.join(REPO, "experiments/student.yaml"), "~data.splits"]) == 2
    err = capsys.readouterr().err
    assert "'data.splits' is a key of the schema, which stays; set data.splits=null" in err and "~data.splits.NAME" in err


def test_a_cut_list_says_how_many_were_left_out():
    from lightning_distill.io import listed

    assert listed(range(37)) == "[0, 1, 2, 3, 4, 5, 6, 7, 8, 9] (and 27 more)"
    assert listed(["a", "b"]) == "['a', 'b']"
