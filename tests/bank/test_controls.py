"""Controls of a distillation experiment (issue 17): banks without the teacher's content, and a
class-balanced baseline, so that a gain is credited to the teacher only when the controls lack it."""

import json
import os

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from lightning_distill.losses.prototype import GEOMETRIES, identity_distances, prototype_dist_loss
from lightning_distill.bank import Bank, control_bank



@pytest.fixture(scope="module")
def bank():
    with open(os.path.join(REPO, "tests", "fixtures", "default_teacher_bank.json")) as f:
        d = json.load(f)
    p = torch.tensor(d["prototypes"])
    counts = torch.tensor(d["counts"], dtype=torch.float64)
    counts[5] = 0  # one class the bank never saw: its row must stay 0 under every control
    p[5] = 0
    return Bank(p, counts, d["class_names"], 1.0, "prob", {}, {2.0: torch.softmax(p.clamp_min(1e-4).log() / 2, 1) * (counts > 0)[:, None]})


def test_identity_and_flat_controls_carry_nothing_beyond_the_labels(bank):
    k = len(bank.class_names)
    seen = bank.present
    ident = control_bank(bank, "identity")
    assert torch.equal(ident.prototypes[seen], torch.eye(k)[seen]) and (ident.prototypes[~seen] == 0).all()
    flat = control_bank(bank, "flat")
    p = flat.prototypes
    assert torch.allclose(p.diagonal()[seen], bank.prototypes.diagonal()[seen])  # the teacher's confidence kept
    assert torch.allclose(p[seen].sum(1), torch.ones(int(seen.sum())), atol=1e-5)
    assert torch.allclose(p[0, 1:], p[0, 1].expand(k - 1))  # the rest spread evenly
    # a student with no knowledge beyond the labels (the identity) is at distance 0 from the identity
    # control in every geometry, and from the flat control's rows (inter) too: neither has a confusion
    # pattern. The flat control's columns (intra) keep the teacher's per-class confidences (each entry
    # of a column is another class's leftover mass), which is what it is meant to keep.
    for control, terms in ((ident, (0, 1)), (flat, (0,))):
        for g, pair in identity_distances(control.prototypes, present=seen).items():
            assert all(abs(pair[t]) < 1e-5 for t in terms), (control.meta["control"], g, pair)
    assert control_bank(bank, "none") is bank
    assert ident.meta["control"] == "identity" and torch.equal(ident.at_tau(2.0)[seen], torch.eye(k)[seen])


def test_shuffled_control_keeps_the_numbers_not_their_order(bank):
    k = len(bank.class_names)
    a, b, c = (control_bank(bank, "shuffled", seed=s) for s in (0, 0, 1))
    assert torch.equal(a.prototypes, b.prototypes) and not torch.equal(a.prototypes, c.prototypes)  # seeded
    for i in range(k):
        orig, shuf = bank.prototypes[i], a.prototypes[i]
        assert shuf[i] == orig[i]  # diagonal kept
        others = [j for j in range(k) if j != i]
        assert torch.equal(shuf[others].sort().values, orig[others].sort().values)  # same numbers
    assert not torch.equal(a.prototypes, bank.prototypes)
    assert torch.allclose(a.at_tau(2.0).sum(1), bank.at_tau(2.0).sum(1), atol=1e-6)  # every tau shuffled alike
    # the geometries that see confusions tell the shuffled bank from the teacher's; prob barely does
    seen = bank.present
    d = {g: float(prototype_dist_loss(a.prototypes, bank.prototypes, seen, geometry=g)) for g in GEOMETRIES}
    assert d["logprob"] > 0.3 and d["offdiag"] > 0.5 and d["prob"] < 0.05, d


def test_control_errors(bank):
    with pytest.raises(ValueError, match="identity"):
        control_bank(bank, "random")
    feat = Bank(torch.randn(3, 8), torch.ones(3), ["background", "a", "b"], 1.0, "feature")
    with pytest.raises(ValueError, match="feature"):
        control_bank(feat, "flat")


def test_student_run_reads_the_control_bank(tmp_path, teacher_bank, tiny_student):
    from lightning_distill.config import load_config
    from lightning_distill.bank import load_bank
    from lightning_distill.train import build_module

    path = teacher_bank / "prototypes.pt"
    cfg = load_config(os.path.join(REPO, "experiments", "student.yaml"),
                      [*tiny_student, f"distill.prototypes={path}", "distill.bank_control=shuffled", "seed=3"])
    module = build_module(cfg, load_bank(path).class_names)
    expected = control_bank(load_bank(path), "shuffled", seed=3).prototypes
    assert torch.equal(module.teacher_prototypes, expected)
    with pytest.raises(ValueError, match="bank_control"):
        build_module(load_config(os.path.join(REPO, "experiments", "baseline.yaml"), [*tiny_student, "distill.bank_control=flat"]),
                     load_bank(path).class_names)


# ----------------------------------------------------------------------------- class-balanced baseline
def test_balanced_weights_and_weighted_ce_and_per_image_dice():
    from lightning_distill.modules import SegmentationModule
    from lightning_distill.networks import build_network
    from lightning_distill.data.build import balanced_class_weights

    assert balanced_class_weights([90, 9, 1, 0]) == pytest.approx([100 / (4 * 90), 100 / (4 * 9), 100 / 4, 1.0])
    names = ["background", "a", "b"]
    net = build_network("Unet", 2, 1, 3, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 8, 8, generator=g)
    label = torch.randint(0, 3, (2, 1, 8, 8), generator=g)
    plain = SegmentationModule(net, names)
    weighted = SegmentationModule(net, names)
    weighted.set_ce_class_weights([0.5, 2.0, 4.0])
    w = torch.tensor([0.5, 2.0, 4.0])
    assert torch.allclose(weighted.seg_terms(logits, label)["seg_ce"], F.cross_entropy(logits, label[:, 0], weight=w))
    assert not torch.allclose(weighted.seg_terms(logits, label)["seg_ce"], plain.seg_terms(logits, label)["seg_ce"])
    with pytest.raises(ValueError, match="3 classes"):
        weighted.set_ce_class_weights([1.0, 2.0])
    per_image = SegmentationModule(net, names, dice_batch=False)
    one = [per_image.seg_terms(logits[i:i + 1], label[i:i + 1])["seg_dice"] for i in range(2)]
    assert torch.allclose(per_image.seg_terms(logits, label)["seg_dice"], torch.stack(one).mean(), atol=1e-6)
    assert "ce_class_weights" not in weighted.state_dict()  # derived from the data by `fit`, not a weight


def test_class_balanced_baseline_fit_records_its_weights(tmp_path, tiny_student, capsys):
    from lightning_distill.cli import main

    out = tmp_path / "balanced"
    assert main(["fit", os.path.join(REPO, "experiments", "baseline.yaml"), f"output_dir={out}", *tiny_student,
                 "loss.class_balance=inverse_frequency", "loss.dice_batch=false"]) == 0
    assert "CE weights background" in capsys.readouterr().out
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    weights = ckpt["lightning_distill"]["ce_class_weights"]
    assert weights["background"] < 1 < weights["spleen"]  # the rare organ weighs more than the background
