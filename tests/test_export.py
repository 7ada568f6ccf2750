"""`lightning-distill export` (issue 35): ONNX and TorchScript models that compute what the checkpoint's network
computes, at any batch and spatial size, with their classes and preprocessing in the file."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_STUDENT
from lightning_distill.cli import main

STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny phantom student, its network and 4 of its test slices as the network sees them."""
    from lightning_distill.checkpoints import load_checkpoint, load_network
    from lightning_distill.data.build import build_datamodule, build_source

    out = tmp_path_factory.mktemp("export")
    assert main(["fit", STUDENT_YAML, f"output_dir={out}", *TINY_STUDENT, "distill.weight=0", "distill.prototypes=null"]) == 0
    ckpt_path = out / "checkpoints" / "last.ckpt"
    ckpt, cfg = load_checkpoint(ckpt_path)
    dm = build_datamodule(cfg, build_source(cfg), training=False)
    dm.setup()
    test = dm.datasets["test"]
    slices = torch.stack([test[i]["image"] for i in range(4)])
    return ckpt_path, load_network(ckpt, cfg), slices


def test_onnx_runtime_computes_what_the_network_computes(trained, tmp_path):
    import onnx
    import onnxruntime as ort

    ckpt, net, slices = trained
    assert main(["export", str(ckpt), str(tmp_path / "model.onnx")]) == 0
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    rng = torch.Generator().manual_seed(0)
    for x in (slices, slices[:1], torch.rand(3, 1, 96, 80, generator=rng)):  # the phantom slices; batch and size free
        with torch.no_grad():
            want = net(x).numpy()
        got = session.run(None, {"image": x.numpy()})[0]
        assert got.shape == want.shape
        # another runtime's float32 kernels sum in another order: the logits (magnitude ~10) agree within 1e-4
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
        assert (got.argmax(1) != want.argmax(1)).mean() <= 1e-3  # the masks: ties only
    meta = json.loads({p.key: p.value for p in onnx.load(str(tmp_path / "model.onnx")).metadata_props}["lightning_distill"])
    assert meta["classes"][0] == "background" and len(meta["classes"]) == 9 and meta["spatial_dims"] == 2
    assert meta["preprocess"]["modality"] == "CT" and meta["preprocess"]["ct_window"] == [-175.0, 250.0]


def test_torchscript_carries_the_same_network_and_metadata(trained, tmp_path):
    ckpt, net, slices = trained
    assert main(["export", str(ckpt), str(tmp_path / "model.pt")]) == 0
    files = {"lightning_distill.json": ""}
    model = torch.jit.load(str(tmp_path / "model.pt"), _extra_files=files)
    with torch.no_grad():
        torch.testing.assert_close(model(slices), net(slices))  # the traced graph of the same ops: float32 tolerance
    assert json.loads(files["lightning_distill.json"])["preprocess"]["training_shape"] == [64, 64]


def test_export_refuses_an_unknown_ending_and_an_existing_file(trained, tmp_path, capsys):
    ckpt, _, _ = trained
    assert main(["export", str(ckpt), str(tmp_path / "model.h5")]) == 2
    assert "export to .onnx (ONNX) or .pt/.ts (TorchScript); got .h5" in capsys.readouterr().err
    (tmp_path / "there.onnx").write_text("x")
    assert main(["export", str(ckpt), str(tmp_path / "there.onnx")]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err and (tmp_path / "there.onnx").read_text() == "x"
