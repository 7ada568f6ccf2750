"""KD methods with a teacher network: the frozen-teacher wrapper and pixel-wise DIST."""

import torch
from torch import nn

from lightning_distill.methods import FrozenTeacher, PixelDistModule
from lightning_distill.networks import build_network

NAMES = ["background", "liver", "spleen"]


def _net():
    return build_network("Unet", 2, 1, len(NAMES), encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})


def test_frozen_teacher_stays_in_eval_without_gradients():
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Dropout(0.5))
    t = FrozenTeacher(net)
    outer = nn.ModuleDict({"student": nn.Conv2d(1, 4, 1), "teacher": t})
    outer.train()  # what Lightning does every epoch
    assert not t.training and not net.training and outer["student"].training
    x = torch.randn(2, 1, 8, 8)
    before = net[1].running_mean.clone()
    y1, y2 = t(x), t(x)
    assert torch.equal(y1, y2)  # dropout off, batch-norm statistics fixed
    assert torch.equal(net[1].running_mean, before) and not y1.requires_grad
    assert all(not p.requires_grad for p in t.parameters())


def test_pixel_dist_module_trains_only_the_student():
    torch.manual_seed(0)
    m = PixelDistModule(_net(), NAMES, teacher=_net(), distill_weight=1.0, scheduler="none")
    m.train()
    assert not m.teacher.training
    batch = {"image": torch.randn(2, 1, 64, 64), "label": torch.randint(0, 3, (2, 1, 64, 64))}
    out = m.model_step(batch, train=True)
    assert set(out["terms"]) == {"seg_dice", "seg_ce", "pixel_dist"} and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in m.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.net.parameters())
    teacher_params = {id(p) for p in m.teacher.parameters()}
    opt = m.make_optimizer()  # what configure_optimizers uses
    assert not any(id(p) in teacher_params for g in opt.param_groups for p in g["params"])
    assert "teacher" not in m.hparams  # the network is not saved as a hyperparameter


def test_pixel_dist_student_through_the_cli_with_a_2d_teacher_checkpoint(tmp_path, tiny_student):
    import csv

    from conftest import REPO
    from lightning_distill.cli import main

    teacher = tmp_path / "teacher2d"
    assert main(["fit", f"{REPO}/experiments/baseline.yaml", f"output_dir={teacher}", *tiny_student]) == 0
    student = tmp_path / "pixel"
    assert main(["fit", f"{REPO}/experiments/student.yaml", f"output_dir={student}", "distill.method=pixel",
                 f"distill.teacher={teacher}/checkpoints/best.ckpt", "distill.prototypes=null", *tiny_student]) == 0
    rows = list(csv.DictReader(open(student / "logs" / "metrics.csv")))
    assert any(r.get("train/pixel_dist") for r in rows)
