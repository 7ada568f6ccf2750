import pytest
import torch

from lightning_distill.networks import InputHook, build_network, head_module_name


@pytest.mark.parametrize("name,kwargs,shape", [
    ("UNet", {"channels": [8, 16, 32], "strides": [2, 2]}, (1, 1, 32, 32, 16)),
    ("DynUNet", {"depth": 3, "filters": [8, 16, 32]}, (1, 1, 32, 32, 16)),
    ("SwinUNETR", {"feature_size": 12}, (1, 1, 64, 64, 64)),  # needs sizes divisible by 32, >= 64
])
def test_teacher_networks_by_name_and_their_head(name, kwargs, shape):
    net = build_network(name, 3, 1, 4, kwargs=kwargs).eval()
    hook = InputHook(net, head_module_name(name))
    with torch.no_grad():
        out = net(torch.randn(*shape))
    assert out.shape == (shape[0], 4) + shape[2:]
    feats = hook.pop()
    assert feats.ndim == 5 and feats.shape[1] > 1
    head = dict(net.named_modules())[head_module_name(name)]
    with torch.no_grad():  # the hook holds exactly what the head turns into the output: the penultimate features
        torch.testing.assert_close(head(feats), out)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus", "Linknet"])
def test_student_smp_architectures_by_name(arch):
    net = build_network(arch, 2, 1, 5, encoder="resnet18").eval()
    hook = InputHook(net, head_module_name(arch))
    with torch.no_grad():
        out = net(torch.randn(2, 1, 64, 64))
    assert out.shape == (2, 5, 64, 64)
    feats = hook.pop()
    assert feats.shape[0] == 2 and feats.shape[1] > 5
    with torch.no_grad():  # the head of the hooked features is the network's output (smp: conv + upsampling)
        torch.testing.assert_close(net.segmentation_head(feats), out)


def test_factory_errors_list_valid_names():
    with pytest.raises(KeyError, match="UNet.*Unet"):
        build_network("UNETT", 3, 1, 2)
    with pytest.raises(ValueError, match="2D only"):
        build_network("Unet", 3, 1, 2)
    with pytest.raises(KeyError, match="not found"):
        InputHook(build_network("UNet", 3, 1, 2, kwargs={"channels": [4, 8], "strides": [2]}), "decoder.head")


def test_smp_default_never_downloads_weights(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    net = build_network("Unet", 2, 1, 3, encoder="resnet18")  # encoder_weights=None by default
    assert sum(p.numel() for p in net.parameters()) > 0


def test_model_kwargs_a_monai_network_does_not_take_are_named(tmp_path):
    """A wrong model.kwargs entry (e.g. smp's decoder_channels for MONAI's UNet) is a ValueError naming it and the
    valid arguments, and the CLI exits 2 with that message instead of a TypeError traceback."""
    with pytest.raises(ValueError, match=r"model.kwargs \['decoder_channels'\] are not arguments of the network 'UNet'.*'channels'"):
        build_network("UNet", 2, 1, 3, kwargs={"decoder_channels": [8, 8]})
    assert build_network("DynUNet", 3, 1, 3, kwargs={"depth": 3}) is not None  # the package's own key is accepted
    import os

    from conftest import REPO, TINY_STUDENT
    from lightning_distill.cli import main

    assert main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={tmp_path}", *TINY_STUDENT,
                 "model.name=UNet"]) == 2
