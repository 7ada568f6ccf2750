"""The Lightning module every method builds on (lightning_distill/modules.py): the weighted loss, the class check
of a checkpoint it resumes from, a test run's metrics, and the teacher-labelled and union slices of a batch."""

import os

import pytest
import torch

from conftest import REPO, TINY_TEACHER, assert_close_to_precision
from conftest import load_ckpt as _ckpt
from lightning_distill.data.nifti import IGNORE_INDEX
from lightning_distill.modules import weighted_sum


def test_weighted_sum_keeps_zero_weight_terms_in_the_graph_and_adds_nothing():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(3.0, requires_grad=True)
    loss = weighted_sum({"seg": a * 1.5, "dist": b * 2.0, "unweighted": b * 7.0}, {"seg": 2.0, "dist": 0.0})
    assert float(loss.detach()) == 6.0
    ga, gb = torch.autograd.grad(loss, (a, b))  # b is used (DDP's reducer needs every parameter) with a 0 gradient
    assert float(ga) == 3.0 and float(gb) == 0.0
    nan = weighted_sum({"seg": a * 1.0, "dist": b * float("nan")}, {"seg": 1.0, "dist": 0.0})
    assert float(nan.detach()) == 2.0  # a term that does not count cannot make the loss NaN


def test_module_refuses_a_checkpoint_of_another_class_set(teacher_bank):
    """Lightning calls ``on_load_checkpoint`` before loading weights: the class check comes first."""
    from lightning_distill.modules import SegmentationModule

    ckpt = _ckpt(teacher_bank / "checkpoints" / "last.ckpt")
    module = SegmentationModule(torch.nn.Conv3d(1, 3, 1), ["background", "liver", "kidney"])
    with pytest.raises(ValueError, match="not in the checkpoint: \\['kidney'\\]"):
        module.on_load_checkpoint(ckpt)


def test_module_test_run_reports_surface_dice(tmp_path):
    """A tiny untrained 3D teacher tested on phantom data: surface Dice in the summary, per case and logged."""
    import lightning as L

    from lightning_distill.config import load_config
    from lightning_distill.train import build_datamodule, build_module, build_source, class_names

    cfg = load_config(os.path.join(REPO, "experiments/teacher.yaml"),
                      [f"output_dir={tmp_path}", *TINY_TEACHER, "surface_tolerance_mm=2.5"])
    source = build_source(cfg)
    names = class_names(cfg, source)
    module = build_module(cfg, names)
    assert module.hparams.surface_tolerance == 2.5
    trainer = L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", devices=1)
    trainer.test(module, datamodule=build_datamodule(cfg, source), verbose=False)
    s = module.test_summary
    assert set(s["surface_dice"]) == set(s["dice"]) and "surface_dice_mean" in s
    assert all(v is None or 0.0 <= v <= 1.0 for v in s["surface_dice"].values())
    assert s["cases"] and all(set(c["surface_dice"]) == set(c["dice"]) for c in s["cases"])
    for c in s["cases"]:  # absent classes agree with Dice
        assert all((c["dice"][o] is None) == (c["surface_dice"][o] is None) for o in c["dice"])
    assert "test/surface_dice" in trainer.callback_metrics


# ------------------------------------------------------------------------------------------ teacher-labelled and union slices (issue 32)
def _student(arch="Unet", **transfer):
    from lightning_distill.methods.prototype import StudentModule
    from lightning_distill.networks import build_network

    torch.manual_seed(0)
    kwargs = {"decoder_channels": [16, 16, 8, 8, 8]} if arch == "Unet" else {}
    net = build_network(arch, 2, 1, 4, encoder="resnet18", kwargs=kwargs)
    m = StudentModule(net, ["background", "a", "b", "c"], bank=None, distill_weight=0.0)
    if transfer:
        m.set_transfer(**transfer)
    return m


def _batch(n=2, r=1, k=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    soft = torch.softmax(torch.randn(n, r, k, size, size, generator=g), 2)
    conf = soft.max(2, keepdim=True).values
    return {"image": torch.rand(n, 1, size, size, generator=g), "label": torch.randint(0, k, (n, 1, size, size), generator=g),
            "transfer_image": torch.rand(n, r, 1, size, size, generator=g),
            "transfer_soft": torch.cat([soft, conf], 2),
            "transfer_label": torch.randint(0, k, (n, r, 1, size, size), generator=g),
            "union_image": torch.rand(n, r, 1, size, size, generator=g),
            "union_label": torch.randint(0, k, (n, r, 1, size, size), generator=g)}


def test_the_transfer_term_is_weighted_logged_and_reads_the_teacher_samples_only():
    m = _student(mode="soft", weight=0.5)
    b = _batch()
    out = m.model_step({k: v for k, v in b.items() if not k.startswith("union")})
    assert set(out["terms"]) == {"seg_dice", "seg_ce", "transfer"} and out["logits"].shape == (2, 4, 32, 32)
    assert m.term_weights()["transfer"] == 0.5
    expect = out["terms"]["seg_dice"] + out["terms"]["seg_ce"] + 0.5 * out["terms"]["transfer"]
    assert_close_to_precision(out["loss"], expect)
    # the transfer term's gradient reaches the network only through the teacher slices' logits: with the labelled
    # images replaced, the term is the same (BatchNorm in eval mode, so samples do not mix)
    m.eval()
    a = m.model_step({k: v for k, v in b.items() if not k.startswith("union")})["terms"]["transfer"]
    b2 = dict(b, image=torch.rand(2, 1, 32, 32))
    c = m.model_step({k: v for k, v in b2.items() if not k.startswith("union")})["terms"]["transfer"]
    assert_close_to_precision(a, c)


@pytest.mark.parametrize("arch", ["Unet", "FPN", "DeepLabV3Plus", "Linknet", "UnetPlusPlus"])
def test_every_smp_architecture_learns_from_teacher_and_union_slices(arch):
    m = _student(arch, mode="soft")
    b = _batch(r=2)
    out = m.model_step(b)
    assert out["logits"].shape == (2 + 4, 4, 32, 32) and torch.isfinite(out["loss"])
    out["loss"].backward()
    grads = [p.grad for p in m.net.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_union_slices_join_the_labelled_samples_and_no_transfer_term_without_set_transfer():
    m = _student()
    b = _batch(r=2)
    out = m.model_step({k: v for k, v in b.items() if not k.startswith("transfer")})
    assert "transfer" not in out["terms"]
    assert out["logits"].shape == (2 + 4, 4, 32, 32)  # 2 labelled + 2 x 2 union
    m.eval()
    expect = m.seg_terms(m.net(torch.cat([b["image"], b["union_image"].flatten(0, 1)])),
                         torch.cat([b["label"], b["union_label"].flatten(0, 1)]))
    got = m.model_step({k: v for k, v in b.items() if not k.startswith("transfer")})["terms"]
    assert_close_to_precision(got["seg_ce"], expect["seg_ce"])


@pytest.mark.parametrize("mode", ["soft", "hard"])
def test_the_truth_control_puts_the_ground_truth_through_the_same_channel(mode):
    m = _student(mode=mode, target="truth").eval()
    b = _batch(seed=3)
    b["transfer_label"][0, 0, 0, :4] = IGNORE_INDEX
    out = m.model_step({k: v for k, v in b.items() if not k.startswith("union")})
    logits = m.net(b["transfer_image"].flatten(0, 1))
    label = b["transfer_label"].flatten(0, 1)
    ce = torch.nn.functional.cross_entropy(logits, label[:, 0], ignore_index=IGNORE_INDEX)
    # soft on a one-hot target is the CE over the labelled pixels (KL minus the target's zero entropy)
    assert_close_to_precision(out["terms"]["transfer"], ce, rel=1e-5)


def test_transfer_settings_are_checked():
    m = _student()
    for kwargs in ({"mode": "medium"}, {"target": "oracle"}, {"tau": 0.0}, {"threshold": 1.5}):
        with pytest.raises(ValueError):
            m.set_transfer(**kwargs)


def test_a_feature_space_bank_reads_the_labelled_rows_and_its_figure_sees_both_losses():
    from lightning_distill.methods.prototype import StudentModule
    from lightning_distill.networks import build_network
    from lightning_distill.bank import Bank

    torch.manual_seed(0)
    net = build_network("Unet", 2, 1, 4, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    bank = Bank(torch.randn(4, 6), torch.ones(4), ["background", "a", "b", "c"], 1.0, "feature")
    m = StudentModule(net, ["background", "a", "b", "c"], bank=bank, distill_weight=1.0, min_pixels=1)
    m.set_transfer(mode="soft")
    b = {k: v for k, v in _batch().items() if not k.startswith("union")}
    out = m.model_step(b)
    assert m.student_batch_prototypes.shape == (4, 6) and torch.isfinite(out["loss"])
    figures = m.contribution_figures(out, m._distill_input)
    assert figures["train/seg_grad_norm"] > 0 and figures["train/dist_grad_norm"] > 0
