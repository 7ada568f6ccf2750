"""Resuming a run (lightning_distill/resume.py): SIGKILLed mid-epoch and resumed equals never interrupted; a checkpoint
that cannot be resumed is refused with a clear message. Figures quoted in docs/reliability.md (`make test-slow`)."""

import csv
import json
import os
import re
import signal

import pytest
import torch

from conftest import REPO, TINY_STUDENT, TINY_TEACHER
from conftest import load_ckpt as _ckpt, max_weight_diff as _max_weight_diff, run_cli as _cli, subprocess_env as _env
from lightning_distill.bank import load_bank
from lightning_distill.cli import main

TEACHER_YAML = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")

# 10 training subjects in batches of 2: 5 batches an epoch; last.ckpt every 2 steps; killed in step 7
RESUME_TEACHER = [*TINY_TEACHER, "data.num_subjects=14", "trainer.max_steps=12", "checkpoint.every_n_steps=2",
                  "trainer.deterministic=true", "pictures=0"]
RESUME_STUDENT = [*TINY_STUDENT, "data.num_subjects=28", "trainer.max_steps=12", "checkpoint.every_n_steps=2",
                  "trainer.deterministic=true", "pictures=0"]  # 20 training slices in batches of 4

KILL_SCRIPT = """
import os, signal, sys
from lightning_distill.bank.callback import PrototypeBank
step = int(os.environ["LD_KILL_AT_STEP"])
orig = PrototypeBank.on_train_batch_end
def kill_after(self, trainer, *args):  # the bank has seen the batch; no checkpoint has stored it
    orig(self, trainer, *args)
    if trainer.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
PrototypeBank.on_train_batch_end = kill_after
from lightning_distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _csv_rows(run):
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return sorted(tuple(sorted((k, v) for k, v in r.items() if v != "")) for r in csv.DictReader(f))


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "student", "transfer"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, stage, teacher_bank, request):
    """A run SIGKILLed in training step 7 (mid-epoch; last.ckpt from step 6) and re-run with resume=auto
    ends with the same weights, bank, test metrics and CSV log as a run that was never interrupted."""
    if stage == "teacher":
        yaml, over, bank_file = TEACHER_YAML, RESUME_TEACHER, "prototypes.pt"
    else:
        yaml, bank_file = STUDENT_YAML, "student_prototypes.pt"
        over = [*RESUME_STUDENT, f"distill.prototypes={teacher_bank / 'prototypes.pt'}"]
    if stage == "transfer":  # teacher-labelled slices and union slices drawn per sample, beside prototype DIST
        folder = request.getfixturevalue("teach_folder")
        over += [f"transfer.slices={folder}", f"transfer.union={folder}", "transfer.ratio=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = _cli(["fit", yaml, f"output_dir={full}", *over])
    assert r.returncode == 0, r.stderr[-3000:]
    script = tmp_path / "kill_at_step.py"
    script.write_text(KILL_SCRIPT)
    r = _cli(["fit", yaml, f"output_dir={part}", *over], env=_env(LD_KILL_AT_STEP="7"), script=str(script))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    killed = _ckpt(part / "checkpoints" / "last.ckpt")
    batches_per_epoch = 5
    assert killed["global_step"] == 6 and killed["global_step"] % batches_per_epoch != 0  # mid-epoch
    assert not (part / "results.json").exists()
    r = _cli(["fit", yaml, f"output_dir={part}", "resume=auto", *over])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "(step 6, epoch 1)" in r.stdout
    wdiff = _max_weight_diff(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    a, b = load_bank(full / bank_file), load_bank(part / bank_file)
    print(f"{stage} resumed at step 6 of 12 vs uninterrupted: weights max abs diff {wdiff}, bank max abs diff "
          f"{(a.prototypes - b.prototypes).abs().max().item()}, {len(_csv_rows(part))} CSV rows")
    assert wdiff == 0.0
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.counts, b.counts)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, part))
    assert ra["test"] == rb["test"] and ra["steps"] == rb["steps"] == 12
    assert _csv_rows(full) == _csv_rows(part)  # nothing of the killed run's log lost, nothing twice


def test_resume_errors_are_clear(tmp_path, teacher_bank, capsys):
    ckpt_path = teacher_bank / "checkpoints" / "last.ckpt"
    ckpt = _ckpt(ckpt_path)
    names = list(ckpt["lightning_distill"]["class_names"])
    torch.save(dict(ckpt, lightning_distill={**ckpt["lightning_distill"], "class_names": names[:3]}),
               tmp_path / "other_classes.ckpt")
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer_states", "lr_schedulers", "loops")},
               tmp_path / "weights.ckpt")
    data = ckpt_path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    out = str(tmp_path / "run")
    for name, message in [("other_classes.ckpt", f"other_classes.ckpt was trained on the classes {names[:3]}, this run "
                                                 f"segments {names} \\(not in the checkpoint: {names[3:]}"),
                          ("weights.ckpt", "weights.ckpt holds weights only"),
                          ("cut.ckpt", "cut.ckpt' could not be read .*truncated"),
                          ("nothing.ckpt", "nothing.ckpt' does not exist")]:
        assert main(["fit", TEACHER_YAML, f"output_dir={out}", f"resume={tmp_path / name}", *TINY_TEACHER]) == 2
        err = capsys.readouterr().err
        assert re.search(message.replace("[", "\\[").replace("]", "\\]"), err), err
    run = tmp_path / "run"  # refused before training, and before the folder's config.yaml is replaced
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
