"""Bank quality (issue 16 item 3): bank.source=final, the teacher's per-class reliability, bank.axial_range."""

import copy
import os
import warnings
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import REPO, TINY_TEACHER
from conftest import FakeTrainer as _FakeTrainer
from lightning_distill.config import load_config
from lightning_distill.losses import masked_class_mean
from lightning_distill.modules import SegmentationModule
from lightning_distill.networks import InputHook, build_network
from lightning_distill.bank import PrototypeBank, check_axial_range, class_reliability, final_bank, load_bank, phantom_axial_range, save_bank
from lightning_distill.io import file_sha256

TEACHER_YAML = os.path.join(REPO, "experiments/teacher.yaml")
NAMES = ["background", "a", "b"]




def _volumes(n=2, shape=(12, 12, 10), k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"image": torch.randn(1, 1, *shape, generator=g), "label": torch.randint(0, k, (1, 1, *shape), generator=g)}
            for _ in range(n)]


def _module(roi_size=None, seed=0):
    """A tiny 3D teacher whose train and eval modes differ (dropout, batch norm)."""
    torch.manual_seed(seed)
    net = build_network("UNet", 3, 1, len(NAMES), kwargs={"channels": [4, 8], "strides": [2], "num_res_units": 1,
                                                         "dropout": 0.3, "norm": "batch"})
    return SegmentationModule(net, NAMES, roi_size=roi_size)


# --------------------------------------------------------------------------------- final bank
def test_final_bank_is_the_mean_eval_mode_softmax_over_the_chosen_volumes():
    module = _module(roi_size=[8, 8, 8])  # volumes of 12 x 12 x 10: sliding window
    vols = _volumes(3)
    chosen = vols[:2]
    bank = final_bank(module, chosen, tau=1.0, taus=[0.5, 2.0])
    assert module.training  # the module's mode is restored
    module.eval()
    with torch.no_grad():
        logits = torch.cat([module.predict_logits(v["image"]) for v in chosen])
        train_logits = copy.deepcopy(module).train()(chosen[0]["image"])  # a copy: batch norm updates its statistics
    labels = torch.cat([v["label"] for v in chosen])
    assert not torch.allclose(train_logits, logits[:1], atol=1e-3)  # eval mode makes a difference here
    for tau in (0.5, 1.0, 2.0):
        expected, _ = masked_class_mean(torch.softmax(logits / tau, 1), labels, 3)
        assert torch.allclose(bank.at_tau(tau), expected, atol=1e-6)
    assert torch.equal(bank.counts, torch.stack([(labels == c).sum() for c in range(3)]).double())
    assert bank.meta["mode"] == "final" and bank.meta["volumes"] == 2 and bank.meta["axial_range"] is None
    # a Dataset and a DataLoader give the same bank as batch dicts
    ds = [{"image": v["image"][0], "label": v["label"][0]} for v in chosen]
    same = final_bank(module, torch.utils.data.DataLoader(ds, batch_size=2), tau=1.0)
    assert torch.allclose(same.prototypes, bank.prototypes, atol=1e-6)


def test_final_bank_in_feature_space_averages_the_head_input():
    module = _module()
    vols = _volumes(2)
    bank = final_bank(module, vols, space="feature", feature_layer="model.2")
    hook = InputHook(module.net, "model.2", detach=True)
    module.eval()
    feats = []
    with torch.no_grad():
        for v in vols:
            module.net(v["image"])
            feats.append(hook.pop())
    hook.remove()
    expected, _ = masked_class_mean(torch.cat(feats), torch.cat([v["label"] for v in vols]), 3)
    assert bank.prototypes.shape == expected.shape and torch.allclose(bank.prototypes, expected, atol=1e-5)
    assert type(module.net).__name__ == "UNet"  # the network is restored
    # through a sliding window the features are stitched like the logits (same shape of bank)
    windowed = final_bank(_module(roi_size=[8, 8, 8]), vols, space="feature", feature_layer="model.2")
    assert windowed.prototypes.shape == expected.shape and torch.isfinite(windowed.prototypes).all()


# --------------------------------------------------------------------------------- reliability
class _Oracle(nn.Module):
    """Predicts the class stored in its input image (one-hot logits)."""

    def __init__(self, k):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return F.one_hot(x[:, 0].long(), self.k).movedim(-1, 1).float() * 10 + self.w


def _vol(pred, label):
    return {"image": torch.tensor(pred, dtype=torch.float32).view(1, 1, 2, 2, 2),
            "label": torch.tensor(label).view(1, 1, 2, 2, 2)}


def test_reliability_figures_on_a_known_example():
    names = ["background", "a", "b", "c"]
    vols = [_vol([0, 1, 1, 0, 2, 1, 2, 0], [0, 1, 1, 1, 2, 2, 0, 0]),
            _vol([1, 0, 0, 0, 0, 0, 0, 2], [1, 1, 0, 0, 0, 0, 0, 255])]  # 255: ignored, its prediction too
    rel = class_reliability(_Oracle(4), vols, names)
    # a: TP 2 + 1, predicted 3 + 1, true 3 + 2; b: TP 1, predicted 2, true 2; c: never there
    assert rel["a"] == pytest.approx({"dice": 6 / 9, "precision": 3 / 4, "recall": 3 / 5, "voxels": 5})
    assert rel["b"] == pytest.approx({"dice": 0.5, "precision": 0.5, "recall": 0.5, "voxels": 2})
    assert rel["c"] == {"dice": None, "precision": None, "recall": None, "voxels": 0}
    assert "background" not in rel
    bg = class_reliability(_Oracle(4), vols, names, include_background=True)["background"]
    assert bg == pytest.approx({"dice": 14 / 17, "precision": 7 / 9, "recall": 7 / 8, "voxels": 8})
    assert all(type(v) in (float, int, type(None)) for r in rel.values() for v in r.values())  # plain values


# --------------------------------------------------------------------------------- axial range
def test_phantom_slices_lie_at_the_documented_axial_fraction():
    from lightning_distill.data.phantom import PhantomSpec, render_slice, render_volume

    spec = PhantomSpec(seed=3)
    vol = render_volume(spec, 1, (16, 16, 9))["label"]
    for i in (0, 2, 5, 8):
        z = 2 * (i / 8) - 1  # fraction i / (Z - 1) -> phantom z
        assert (render_slice(spec, 1, (16, 16), z=z)["label"] == vol[..., i]).all()
    assert phantom_axial_range([-0.5, -0.1]) == pytest.approx([0.25, 0.45])
    with pytest.raises(ValueError, match="phantom z range"):
        phantom_axial_range([0.5, -0.5])


def test_axial_range_excludes_voxels_outside_it_in_both_sources(tmp_path):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, 9, generator=g)
    label = torch.randint(0, 3, (2, 1, 4, 4, 9), generator=g)
    label[..., 4:] = torch.where(label[..., 4:] == 2, 1, label[..., 4:])  # class b only in slices 0-3
    label[..., :2] = torch.where(label[..., :2] == 2, 0, label[..., :2])  # ... and 2-3
    before = label.clone()
    # fractions i / 8: [0.25, 0.45] keeps slices 2 and 3
    expected, _ = masked_class_mean(torch.softmax(logits[..., 2:4], 1), label[..., 2:4], 3)
    cb = PrototypeBank(NAMES, start=0.0, axial_range=[0.25, 0.45])
    cb.on_train_batch_end(_FakeTrainer(), None, {"logits": logits}, {"label": label}, 0)
    assert torch.equal(label, before)  # the labels the loss sees are not changed
    assert torch.allclose(cb.prototypes, expected, atol=1e-6)
    assert cb.counts.tolist() == [float((label[..., 2:4] == c).sum()) for c in range(3)]
    assert cb.bank().meta["axial_range"] == [0.25, 0.45]
    # the final bank masks the same voxels
    fb = final_bank(_Identity(), [{"image": logits, "label": label}], NAMES, axial_range=[0.25, 0.45])
    assert torch.allclose(fb.prototypes, expected, atol=1e-6) and fb.meta["axial_range"] == [0.25, 0.45]
    save_bank(tmp_path / "b.pt", fb)
    assert load_bank(tmp_path / "b.pt").meta["axial_range"] == [0.25, 0.45]
    # a range without any voxel of b: a warning names it, its row is 0 with count 0
    with pytest.warns(UserWarning, match=r"no voxel of the classes \['b'\] in bank.axial_range=\[0.5, 1.0\]"):
        fb = final_bank(_Identity(), [{"image": logits, "label": label}], NAMES, axial_range=[0.5, 1.0])
    assert fb.counts[2] == 0 and (fb.prototypes[2] == 0).all() and not fb.present[2]
    # the reliability is over the same voxels
    rel = class_reliability(_Identity(), [{"image": logits, "label": label}], NAMES, axial_range=[0.25, 0.45])
    assert rel["a"]["voxels"] == int((label[..., 2:4] == 1).sum())


class _Identity(nn.Module):
    def forward(self, x):
        return x


def test_running_bank_warns_once_about_classes_with_no_voxel(tmp_path):
    logits = torch.randn(1, 3, 2, 2, 5)
    label = torch.zeros(1, 1, 2, 2, 5, dtype=torch.long)
    label[..., 4] = 1  # a only in the last slice, b nowhere
    cb = PrototypeBank(NAMES, start=0.0, axial_range=[0.0, 0.5], export_path=str(tmp_path / "p.pt"))
    cb.on_train_batch_end(_FakeTrainer(), None, {"logits": logits}, {"label": label}, 0)
    with pytest.warns(UserWarning, match=r"no voxel of the classes \['a', 'b'\]"):
        cb.export(_FakeTrainer())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cb.export(_FakeTrainer())  # the runner exports twice: one warning
    assert load_bank(tmp_path / "p.pt").counts.tolist() == [12.0, 0.0, 0.0]


@pytest.mark.parametrize("bad", [[0.5, 0.2], [0.3, 0.3], [0.0, 1.5], [0.3], [0.1, 0.2, 0.3], "ab", [float("nan"), 1.0]])
def test_bad_axial_ranges_are_refused_naming_the_key(bad):
    with pytest.raises(ValueError, match=r"bank.axial_range must be \[lo, hi\] with 0 <= lo < hi <= 1"):
        check_axial_range(bad)
    with pytest.raises(ValueError, match="bank.axial_range"):
        PrototypeBank(NAMES, axial_range=bad)


def test_axial_range_errors_point_to_the_phantom_conversion_and_need_3d():
    with pytest.raises(ValueError, match=r"\(z \+ 1\) / 2"):
        check_axial_range([-0.5, -0.1])
    cb = PrototypeBank(NAMES, start=0.0, axial_range=[0.2, 0.8])
    with pytest.raises(ValueError, match="needs 3D volumes"):
        cb.on_train_batch_end(_FakeTrainer(), None, {"logits": torch.randn(2, 3, 4, 4)}, {"label": torch.zeros(2, 1, 4, 4)}, 0)


def test_fit_refuses_bad_bank_settings_before_training():
    from lightning_distill.bank.teacher import check_bank_config

    def check(*overrides, stage="teacher", val=("x",)):
        cfg = load_config(TEACHER_YAML, [f"stage={stage}", *overrides])
        return check_bank_config(cfg, SimpleNamespace(splits={"val": list(val)}))

    assert check("bank.axial_range=[0.25,0.45]") == (0.25, 0.45)
    with pytest.raises(ValueError, match="bank.axial_range must be"):
        check("bank.axial_range=[0.45,0.25]")
    with pytest.raises(ValueError, match="bank.axial_range needs a 3D teacher"):
        check("bank.axial_range=[0.2,0.4]", "data.shape=[64,64]")
    with pytest.raises(ValueError, match="data.patch_size=.*use bank.source=final"):
        check("bank.axial_range=[0.2,0.4]", "data.patch_size=[32,32,24]")
    assert check("bank.axial_range=[0.2,0.4]", "data.patch_size=[32,32,24]", "bank.source=final") == (0.2, 0.4)
    assert check("bank.axial_range=[0.2,0.4]", "data.patch_size=[32,32,48]") == (0.2, 0.4)  # whole axial axis
    with pytest.raises(ValueError, match="bank.source=final with bank.final_split=val needs validation subjects"):
        check("bank.source=final", "bank.final_split=val", val=())
    with pytest.raises(ValueError, match="bank.source=final set in a student run"):
        check("bank.source=final", stage="student")
    with pytest.raises(ValueError, match="bank.axial_range set in a student run"):
        check("bank.axial_range=[0.2,0.4]", stage="student")


def test_final_split_volumes_are_whole_and_not_augmented(capsys):
    from lightning_distill.bank.teacher import final_volumes
    from lightning_distill.data.build import build_datamodule

    cfg = load_config(TEACHER_YAML, [*TINY_TEACHER, "data.patch_size=[16,16,8]"])
    dm = build_datamodule(cfg)
    (train,), split = final_volumes(dm, "train")
    assert split == "train" and train.ids == dm.train_ids and not train.augment and train.patch_size is None
    assert train.cache is dm.datasets["train"].cache
    both, split = final_volumes(dm, "both")
    assert split == "both" and [d.ids for d in both] == [dm.train_ids, dm.splits["val"]]
    dm = build_datamodule(load_config(TEACHER_YAML, [*TINY_TEACHER, "data.val_subjects=0"]))
    volumes, split = final_volumes(dm, "both")
    assert split == "train" and len(volumes) == 1 and "no validation split" in capsys.readouterr().out


# --------------------------------------------------------------------------------- fit
def test_running_teacher_bank_records_its_reliability(teacher_bank):
    bank = load_bank(teacher_bank / "prototypes.pt")
    assert bank.meta["mode"] == "running_mean" and bank.meta["axial_range"] is None
    rel = bank.meta["reliability"]
    assert list(rel) == bank.class_names[1:] and bank.meta["reliability_split"] == "val"
    assert bank.meta["reliability_checkpoint"].endswith("best.ckpt")
    assert all(set(r) == {"dice", "precision", "recall", "voxels"} for r in rel.values())
    assert sum(r["voxels"] for r in rel.values()) > 0


@pytest.mark.slow
def test_teacher_fit_with_a_final_bank_that_the_student_loads(tmp_path, capsys):
    from lightning_distill.cli import main
    from lightning_distill.methods.prototype import StudentModule, row_weights

    out = tmp_path / "teacher"
    assert main(["fit", TEACHER_YAML, f"output_dir={out}", *TINY_TEACHER, "trainer.max_steps=2", "pictures=0",
                 "logger=none", "bank.source=final", "bank.final_split=val", "bank.axial_range=[0.25,0.45]"]) == 0
    printed = capsys.readouterr().out
    assert "teacher reliability on 2 validation volumes" in printed and "final prototype bank (2 volumes" in printed
    bank = load_bank(out / "prototypes.pt")
    best = out / "checkpoints" / "best.ckpt"
    assert bank.meta["mode"] == "final" and bank.meta["final_split"] == "val" and bank.meta["volumes"] == 2
    assert bank.meta["checkpoint"] == str(best) and bank.meta["checkpoint_sha256"] == file_sha256(best)
    assert bank.meta["axial_range"] == [0.25, 0.45] and bank.meta["reliability_split"] == "val"
    assert set(bank.meta["reliability"]) == set(bank.class_names[1:]) and bank.taus == [0.5, 1.0, 2.0, 4.0]
    assert torch.allclose(bank.prototypes[bank.present].sum(1), torch.ones(int(bank.present.sum())), atol=1e-5)
    ckpt = torch.load(best, map_location="cpu", weights_only=False)
    assert not [k for k in ckpt.get("callbacks", {}) if k.startswith("PrototypeBank")]  # no running bank
    names = bank.class_names
    net = build_network("Unet", 2, 1, len(names), encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    student = StudentModule(net, names, bank=bank, tau=2.0)
    assert torch.equal(student.teacher_prototypes, bank.at_tau(2.0))
    assert row_weights(bank, "reliability").shape == (len(names),)


@pytest.mark.slow
def test_teacher_fit_without_validation_records_no_reliability(tmp_path, capsys):
    from lightning_distill.cli import main

    out = tmp_path / "teacher"
    with pytest.warns(UserWarning, match="no validation split"):
        assert main(["fit", TEACHER_YAML, f"output_dir={out}", *TINY_TEACHER, "data.val_subjects=0",
                     "trainer.max_steps=2", "pictures=0", "logger=none", "bank.source=final"]) == 0
    assert "the prototype bank records no per-class reliability" in capsys.readouterr().out
    bank = load_bank(out / "prototypes.pt")
    assert "reliability" not in bank.meta and bank.meta["final_split"] == "train" and bank.meta["volumes"] == 6
    assert bank.meta["checkpoint"].endswith("last.ckpt")
