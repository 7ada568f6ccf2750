"""SIKD: the class-mean image, feature hooks, and the frozen teacher."""

import pytest
import torch

from conftest import REPO
from lightning_distill.methods.sikd import SIKDModule, class_mean_image, sikd_loss
from lightning_distill.networks import build_network, head_module_name


def test_class_mean_image_hand_computed_two_channels_absent_class_and_batch():
    image = torch.tensor([[[[1.0, 2.0], [4.0, 9.0]], [[10.0, 20.0], [30.0, 40.0]]],
                          [[[5.0, 5.0], [1.0, 3.0]], [[0.0, 0.0], [0.0, 8.0]]]])  # B=2, C=2, 2x2
    label = torch.tensor([[[[0, 1], [1, 2]]], [[[3, 3], [0, 0]]]])  # class 3 absent from image 0, 1-2 from image 1
    out = class_mean_image(image, label, num_classes=4)
    expected = torch.tensor([[[[1.0, 3.0], [3.0, 9.0]], [[10.0, 25.0], [25.0, 40.0]]],
                             [[[5.0, 5.0], [2.0, 2.0]], [[0.0, 0.0], [4.0, 4.0]]]])
    assert out.shape == image.shape and torch.allclose(out, expected, atol=1e-6)


def test_class_mean_image_ignored_pixels_keep_intensity_3d_and_errors():
    image = torch.arange(8.0).reshape(1, 1, 2, 2, 2)
    label = torch.zeros(1, 1, 2, 2, 2, dtype=torch.long)
    label[0, 0, 0, 0, 0] = 255
    out = class_mean_image(image, label, num_classes=2)
    assert out[0, 0, 0, 0, 0] == 0.0  # its own value
    assert torch.allclose(out.flatten()[1:], torch.full((7,), sum(range(1, 8)) / 7))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        class_mean_image(image, label.clamp(max=5) + 2, num_classes=2)
    with pytest.raises(ValueError, match="needs image"):
        class_mean_image(image, label[:, :, 0], num_classes=2)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus", "UnetPlusPlus", "PSPNet", "Linknet"])
def test_hooks_find_the_penultimate_layer_of_smp_architectures(arch):
    torch.manual_seed(0)
    kw = {"encoder_depth": 3, "upsampling": 8} if arch == "PSPNet" else {}
    student, teacher = (build_network(arch, 2, 1, 3, encoder="resnet18", kwargs=kw) for _ in range(2))
    m = SIKDModule(student, ["background", "a", "b"], teacher=teacher, feature_layer=head_module_name(arch), scheduler="none")
    m.train()
    batch = {"image": torch.randn(2, 1, 64, 64), "label": torch.randint(0, 3, (2, 1, 64, 64))}
    out = m.model_step(batch, train=True)
    assert set(out["terms"]) == {"seg_dice", "seg_ce", "sikd_mse"} and torch.isfinite(out["loss"])
    assert out["terms"]["sikd_mse"] > 0
    out["loss"].backward()
    assert not m.teacher.training and all(p.grad is None for p in m.teacher.parameters())
    assert all(not p.requires_grad for p in m.teacher.parameters())
    # the penultimate features: the head's input, of the width the head's first convolution takes,
    # at the input size divided by the head's own upsampling (FPN, DeepLabV3+: 4, PSPNet here: 8;
    # 1 for the others) -- not the bottleneck (1/32) -- and the student's and the teacher's agree
    head = dict(student.named_modules())[head_module_name(arch)]
    conv = next(mod for mod in head.modules() if isinstance(mod, torch.nn.Conv2d))
    seen = {}
    hooks = [dict(net.named_modules())[head_module_name(arch)].register_forward_pre_hook(
        lambda mod, args, key=key: seen.__setitem__(key, args[0].shape)) for key, net in (("s", student), ("t", teacher))]
    m.model_step(batch, train=True)
    for h in hooks:
        h.remove()
    b, c, hgt, wid = seen["s"]
    assert seen["s"] == seen["t"] and b == 2 and c == conv.in_channels
    up = next((mod.scale_factor for mod in head.modules() if isinstance(mod, torch.nn.Upsample)), 1)
    assert (hgt, wid) == (64 // up, 64 // up), (seen["s"], up)


def test_sikd_loss_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="same architecture"):
        sikd_loss(torch.zeros(1, 16, 8, 8), torch.zeros(1, 8, 8, 8))
    assert sikd_loss(torch.ones(1, 2, 4, 4), torch.zeros(1, 2, 4, 4)) == pytest.approx(1.0)


def test_sikd_student_needs_a_teacher_checkpoint(tmp_path, capsys):
    from lightning_distill.cli import main

    out = tmp_path / "run"
    assert main(["fit", f"{REPO}/experiments/sikd.yaml", "distill.teacher=null", f"output_dir={out}"]) == 2
    assert "distill.teacher" in capsys.readouterr().err


def test_tiny_sikd_teacher_then_student_through_the_cli(tmp_path, tiny_student):
    import csv

    from lightning_distill.cli import main

    teacher = tmp_path / "teacher"
    assert main(["fit", f"{REPO}/experiments/sikd_teacher.yaml", f"output_dir={teacher}", *tiny_student]) == 0
    ckpt = teacher / "checkpoints" / "best.ckpt"
    assert ckpt.is_file()
    student = tmp_path / "student"
    assert main(["fit", f"{REPO}/experiments/sikd.yaml", f"output_dir={student}", f"distill.teacher={ckpt}", *tiny_student]) == 0
    rows = list(csv.DictReader(open(student / "logs" / "metrics.csv")))
    assert any(r.get("train/sikd_mse") for r in rows) and (student / "results.json").is_file()
    # the teacher was trained and is tested on class-mean images; predicting unlabelled data is refused
    with pytest.raises(ValueError, match="cannot predict unlabelled"):
        from lightning_distill.checkpoints import load_checkpoint, load_network
        from lightning_distill.modules import SegmentationModule

        ck, cfg = load_checkpoint(ckpt)
        SegmentationModule(load_network(ck, cfg), ck["hyper_parameters"]["class_names"],
                           input_transform="class_mean").predict_step({"image": torch.zeros(1, 1, 64, 64)}, 0)
