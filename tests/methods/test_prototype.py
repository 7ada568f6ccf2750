"""The prototype-DIST student (lightning_distill/methods/prototype.py): which classes count, the bank's reliability as
row weights, and a fit with each geometry (issue 16)."""

import os

import pytest
import torch

from conftest import REPO
from lightning_distill.losses.prototype import prototype_dist_terms


def test_min_pixels_decides_which_classes_are_present():
    from lightning_distill.losses.prototype import class_means, masked_class_sums
    from lightning_distill.methods.prototype import StudentModule
    from lightning_distill.networks import build_network
    from lightning_distill.bank import Bank

    names = ["background", "a", "b", "c", "d"]
    bank = Bank(torch.softmax(torch.randn(5, 5) + 3 * torch.eye(5), 1), torch.ones(5), names, 1.0, "prob")
    net = build_network("Unet", 2, 1, 5, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    label = torch.zeros(2, 1, 32, 32, dtype=torch.long)
    label[0, 0, :8, :8] = 1  # 64 pixels
    label[0, 0, 10:14, 10:14] = 2  # 16 pixels
    label[1, 0, 20:22, 20:22] = 3  # 4 pixels
    label[1, 0, 30, 30] = 4  # 1 pixel
    logits = torch.randn(2, 5, 32, 32)
    for min_pixels, present in ((1, [1, 1, 1, 1, 1]), (16, [1, 1, 1, 0, 0]), (65, [1, 0, 0, 0, 0])):
        module = StudentModule(net, names, bank=bank, min_pixels=min_pixels, geometry="logprob")
        terms = module.extra_terms({"label": label}, logits)
        sums, counts = masked_class_sums(torch.softmax(logits, 1), label, 5)
        expected = prototype_dist_terms(class_means(sums, counts), bank.prototypes, torch.tensor(present, dtype=torch.bool),
                                        geometry="logprob")
        assert torch.allclose(terms["dist_inter"], expected[0]) and torch.allclose(terms["dist_intra"], expected[1])
    with pytest.raises(ValueError, match="min_pixels"):
        StudentModule(net, names, bank=bank, min_pixels=0)


def test_reliability_weights_come_from_the_bank():
    from lightning_distill.methods.prototype import StudentModule, row_weights
    from lightning_distill.networks import build_network
    from lightning_distill.bank import Bank

    names = ["background", "a", "b", "c"]
    bank = Bank(torch.softmax(torch.randn(4, 4) + 3 * torch.eye(4), 1), torch.ones(4), names, 1.0, "prob")
    assert row_weights(bank) is None
    with pytest.raises(ValueError, match="reliability"):
        row_weights(bank, "reliability")
    bank.meta["reliability"] = {"a": {"dice": 0.9}, "b": {"dice": 0.4}, "c": {"dice": 0.7}}
    assert row_weights(bank, "reliability").tolist() == pytest.approx([1.0, 0.9, 0.4, 0.7])
    assert row_weights(bank, "none", min_reliability=0.5).tolist() == [1.0, 1.0, 0.0, 1.0]
    assert row_weights(bank, "reliability", min_reliability=0.5).tolist() == pytest.approx([1.0, 0.9, 0.0, 0.7])
    net = build_network("Unet", 2, 1, 4, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    module = StudentModule(net, names, bank=bank, row_weight="reliability", min_reliability=0.5)
    assert module.teacher_row_weights.tolist() == pytest.approx([1.0, 0.9, 0.0, 0.7])


@pytest.mark.parametrize("geometry,extra", [
    ("logprob", ["distill.tau=2", "distill.row_weight=reliability"]),
    pytest.param("offdiag", ["distill.min_reliability=0.01"], marks=pytest.mark.slow),
    pytest.param("prob", ["distill.tau=0.5", "distill.min_pixels=1"], marks=pytest.mark.slow),
])
def test_student_fit_with_each_geometry_logs_the_contribution_figure(tmp_path, teacher_bank, tiny_student, geometry, extra):
    import csv
    import math

    from lightning_distill.cli import main

    out = tmp_path / geometry
    assert main(["fit", os.path.join(REPO, "experiments", "student.yaml"), f"output_dir={out}",
                 *tiny_student, f"distill.prototypes={teacher_bank / 'prototypes.pt'}", f"distill.geometry={geometry}",
                 "distill.grad_every=2", *extra]) == 0
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    ratios = [float(r["train/dist_grad_ratio"]) for r in rows if r.get("train/dist_grad_ratio")]
    assert len(ratios) == 2 and all(math.isfinite(v) and v >= 0 for v in ratios)  # steps 0 and 2 of 4
    assert any(v > 0 for v in ratios)  # with lambda = 1 the term moves the logits
    from lightning_distill.bank import load_bank

    own = load_bank(out / "student_prototypes.pt")
    tau = float(next((e.split("=")[1] for e in extra if e.startswith("distill.tau=")), 1.0))
    assert own.tau == tau  # the student's own bank is at the temperature it was compared at
