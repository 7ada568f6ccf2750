"""Transfer through data (issue 32): the losses of teacher-labelled slices, the extra samples of a batch, and a
student that learns what the teacher knows from its slices."""

import os

import numpy as np
import pytest
import torch

from lightning_distill.data.nifti import IGNORE_INDEX
from lightning_distill.losses.transfer import hard_transfer_loss, one_hot_target, retemper, soft_transfer_loss

from conftest import REPO, TINY_TEACHER, assert_close_to_precision


def _logits(seed=0, shape=(2, 5, 6, 7)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 2.0


# ------------------------------------------------------------------------------------------------ losses
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_soft_loss_and_its_gradient_vanish_when_the_student_equals_the_teacher(tau):
    z = _logits().requires_grad_()
    teacher = torch.softmax(z.detach() / tau, 1)
    loss = soft_transfer_loss(z, teacher, tau)
    (g,) = torch.autograd.grad(loss, z)
    # KL of a distribution with itself, summed over 5 float32 terms per pixel: 0 up to float32 rounding of log p
    assert abs(float(loss.detach())) <= 1e-6
    assert float(g.abs().max()) <= 1e-7
    # and a student that differs has a positive loss, which a gradient step lowers
    z2 = _logits(1).requires_grad_()
    l2 = soft_transfer_loss(z2, teacher, tau)
    (g2,) = torch.autograd.grad(l2, z2)
    assert float(l2.detach()) > 0.05
    assert float(soft_transfer_loss(z2.detach() - 50.0 * g2, teacher, tau)) < float(l2.detach())


def test_soft_loss_is_tau_squared_times_the_mean_pixel_kl():
    z, t = _logits(2), torch.softmax(_logits(3), 1)
    tau = 2.0
    q = torch.softmax(z / tau, 1)
    kl = (t * (t.log() - q.log())).sum(1).mean()
    assert_close_to_precision(soft_transfer_loss(z, t, tau), tau ** 2 * kl, rel=1e-5)  # another summation of the same KL
    mask = torch.zeros(2, 1, 6, 7, dtype=torch.bool)
    mask[:, :, :3] = True
    kl_masked = (t * (t.log() - q.log())).sum(1)[:, :3].mean()
    assert_close_to_precision(soft_transfer_loss(z, t, tau, mask=mask), tau ** 2 * kl_masked, rel=1e-5)


def test_hard_loss_gives_pixels_under_the_threshold_exactly_no_gradient():
    z = _logits(4).requires_grad_()
    t = torch.softmax(_logits(5), 1)
    conf = t.max(1).values
    threshold = float(conf.median())
    loss = hard_transfer_loss(z, t, conf, threshold)
    (g,) = torch.autograd.grad(loss, z)
    low = (conf < threshold)[:, None].expand_as(g)
    assert low.any() and (~low).any()
    assert torch.count_nonzero(g[low]) == 0  # ignored pixels: no term at all, so exactly zero
    assert float(g[~low].abs().sum()) > 0
    # the loss is CE on the teacher's argmax over the kept pixels
    keep = conf >= threshold
    expect = torch.nn.functional.cross_entropy(z.detach(), t.argmax(1).masked_fill(~keep, IGNORE_INDEX), ignore_index=IGNORE_INDEX)
    assert_close_to_precision(loss, expect)
    # nothing kept: 0, still a tensor of the graph
    none = hard_transfer_loss(z, t, conf, 1.1)
    assert float(none.detach()) == 0.0 and none.requires_grad


def test_retemper_reads_stored_probabilities_at_another_temperature():
    z = _logits(6)
    p1 = torch.softmax(z, 1)
    for tau in (0.5, 2.0, 4.0):
        assert_close_to_precision(retemper(p1, 1.0, tau), torch.softmax(z / tau, 1), rel=1e-5)
    # from float16 storage (what teach writes): within float16 rounding, raised to the power tau_from / tau_to
    assert torch.allclose(retemper(p1.half(), 1.0, 2.0), torch.softmax(z / 2.0, 1), atol=2e-3)


def test_one_hot_target_leaves_ignored_pixels_out():
    label = torch.tensor([[[[0, 2], [IGNORE_INDEX, 1]]]])
    oh = one_hot_target(label, 3)
    assert oh.shape == (1, 3, 2, 2)
    assert oh[0, :, 1, 0].sum() == 0 and oh[0, 2, 0, 1] == 1 and oh[0, 1, 1, 1] == 1


# ------------------------------------------------------------------------------------------------ the module
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


# ------------------------------------------------------------------------------------------------ the data
def test_extra_draws_are_a_function_of_the_sample_key():
    from lightning_distill.data.datamodules import ExtraDraws

    class Toy(torch.utils.data.Dataset):
        def __init__(self, n, tag):
            self.n, self.tag = n, tag

        def __len__(self):
            return self.n

        def __getitem__(self, key):
            i, seed = key if isinstance(key, tuple) else (key, 0)
            return {"image": torch.full((1, 2, 2), float(i)), "label": torch.zeros(1, 2, 2, dtype=torch.long),
                    "soft": torch.full((3, 2, 2), float(seed % 7)), "id": f"{self.tag}{i}"}

    d = ExtraDraws(Toy(5, "a"), {"transfer": (Toy(50, "t"), 3), "union": (Toy(40, "u"), 2)})
    x, y = d[(1, 123)], d[(1, 123)]
    assert x["transfer_image"].shape == (3, 1, 2, 2) and x["union_label"].shape == (2, 1, 2, 2)
    assert x["transfer_id"] == y["transfer_id"] and x["union_id"] == y["union_id"]
    assert torch.equal(x["transfer_soft"], y["transfer_soft"])  # the same draw, the same computation
    others = {d[(1, s)]["transfer_id"] for s in range(20)}
    assert len(others) > 10  # other seeds draw other partners
    with pytest.raises(ValueError, match="empty"):
        ExtraDraws(Toy(5, "a"), {"transfer": (Toy(0, "t"), 1)})


def test_a_run_config_refuses_transfer_outside_a_2d_prototype_student(tmp_path):
    from lightning_distill.config import load_config
    from lightning_distill.data.build import build_source, transfer_sources

    cfg = load_config(os.path.join(REPO, "experiments/sikd.yaml"), ["transfer.union=/nowhere"])
    with pytest.raises(ValueError, match="distill.method=prototype"):
        transfer_sources(cfg, build_source(load_config(os.path.join(REPO, "experiments/student.yaml"))))
    cfg = load_config(os.path.join(REPO, "experiments/teacher.yaml"), ["transfer.slices=/nowhere", *TINY_TEACHER])
    with pytest.raises(ValueError, match="2D students"):
        transfer_sources(cfg, build_source(cfg))


# ------------------------------------------------------------------------------------------------ a run
def test_a_student_trains_with_teacher_slices_union_and_prototype_dist(tmp_path, tiny_student, teach_folder, teacher_bank):
    import csv

    from lightning_distill.cli import main

    out = tmp_path / "student"
    assert main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={out}", *tiny_student,
                 f"distill.prototypes={teacher_bank / 'prototypes.pt'}", f"transfer.slices={teach_folder}",
                 f"transfer.union={teach_folder}", "transfer.ratio=2", "transfer.weight=0.5"]) == 0
    with open(out / "logs" / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for term in ("train/transfer", "train/dist_inter", "train/seg_ce"):  # each term logged
        values = [float(r[term]) for r in rows if r.get(term)]
        assert values and all(np.isfinite(values)), term
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    record = ckpt["lightning_distill"]["transfer"]
    assert record["transfer"]["slices"] == 30 and record["union"]["volumes"] == 6
    assert record["transfer"]["model_sha256"] and record["transfer"]["labelled_by"] == "3D model"
    assert "intensity" in ckpt["lightning_distill"]  # the input fingerprint is recorded as before


def test_select_keeps_the_volumes_of_an_attribute(teach_folder):
    import json

    from lightning_distill.data.nifti import DataError
    from lightning_distill.data.phantom import CLASS_NAMES
    from lightning_distill.data.transfer import TeacherSlices

    meta = json.loads((teach_folder / "dataset.json").read_text())
    phases = {v["attributes"]["phase"] for v in meta["volumes"].values()}
    every = TeacherSlices(teach_folder, CLASS_NAMES)
    for phase in phases:
        some = TeacherSlices(teach_folder, CLASS_NAMES, select={"phase": [phase]})
        keep = [vid for vid, v in meta["volumes"].items() if v["attributes"]["phase"] == phase]
        assert {i.split("@")[0] for i in some.ids} == set(keep)
        assert len(some.ids) + some.left_out["select"] == len(every.ids)
    sample = every.load(every.ids[0])
    assert sample["soft"].shape == (len(CLASS_NAMES) + 1, 64, 64) and sample["image"].shape == (1, 64, 64)
    with pytest.raises(DataError, match="not attributes"):
        TeacherSlices(teach_folder, CLASS_NAMES, select={"contrast": ["x"]})
    with pytest.raises(DataError, match="classes"):
        TeacherSlices(teach_folder, list(CLASS_NAMES[:-1]))


@pytest.mark.slow
def test_a_student_taught_only_by_slices_reproduces_the_teacher_on_held_out_slices(tmp_path):
    """The transfer term alone (segmentation loss weight 0) teaches a 2D student the 3D teacher's labelling: on
    slices of other volumes of the same population, the student's argmax agrees with the teacher's."""
    from lightning_distill.cli import main
    from lightning_distill.data.phantom import CLASS_NAMES
    from lightning_distill.data.transfer import TeacherSlices
    from lightning_distill.checkpoints import load_checkpoint, load_network

    teacher = tmp_path / "teacher"
    over = [o for o in TINY_TEACHER if not o.startswith(("trainer.max_steps", "data.num_subjects"))]
    assert main(["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={teacher}", *over,
                 "data.num_subjects=24", "trainer.max_steps=120", "pictures=0"]) == 0
    ckpt = teacher / "checkpoints" / "best.ckpt"
    common = [f"model.path={ckpt}", f"student={os.path.join(REPO, 'experiments/student.yaml')}", "data.num_subjects=80",
              "data.shape=[32,32,16]"]
    train_ids = "[" + ",".join(f"phantom1_{i:04d}" for i in range(60)) + "]"
    held_ids = "[" + ",".join(f"phantom1_{i:04d}" for i in range(60, 80)) + "]"
    assert main(["teach", os.path.join(REPO, "experiments/teach.yaml"), *common, f"data.cases={train_ids}",
                 f"output={tmp_path / 'train'}"]) == 0
    assert main(["teach", os.path.join(REPO, "experiments/teach.yaml"), *common, f"data.cases={held_ids}",
                 f"output={tmp_path / 'held'}"]) == 0
    student = tmp_path / "student"
    assert main(["fit", os.path.join(REPO, "experiments/baseline.yaml"), f"output_dir={student}", "pictures=0",
                 "data.num_subjects=16", "data.val_subjects=4", "data.test_subjects=4", "data.batch_size=4",
                 "model.kwargs.decoder_channels=[32,16,16,8,8]", "loss.dice_weight=0", "loss.ce_weight=0",
                 f"transfer.slices={tmp_path / 'train'}", "transfer.ratio=2", "trainer.max_steps=300",
                 "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=100",
                 "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false"]) == 0
    ck, cfg = load_checkpoint(student / "checkpoints" / "last.ckpt")
    net = load_network(ck, cfg).eval()
    held = TeacherSlices(tmp_path / "held", CLASS_NAMES)
    agree, fg_agree, fg = 0, 0, 0
    with torch.no_grad():
        for sid in held.ids:
            s = held.load(sid)
            mine = net(torch.from_numpy(s["image"])[None]).argmax(1)[0].numpy()
            theirs = s["soft"][:-1].argmax(0)
            agree += int((mine == theirs).sum())
            fg += int((theirs > 0).sum())
            fg_agree += int(((mine == theirs) & (theirs > 0)).sum())
    total = len(held.ids) * 64 * 64
    print(f"student vs teacher on {len(held.ids)} held-out slices: pixel agreement {agree / total:.3f}, "
          f"on the teacher's organ pixels {fg_agree / fg:.3f}")
    assert agree / total >= 0.9
    assert fg_agree / fg >= 0.6  # not by background alone (0.737 measured on a 2-core AMD EPYC)


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
