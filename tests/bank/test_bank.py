import os

import pytest
import torch

from conftest import FakeTrainer as _FakeTrainer  # tests/ is on sys.path (pytest's rootdir conftest)
from lightning_distill.data.phantom import CLASS_NAMES
from lightning_distill.losses import masked_class_mean
from lightning_distill.networks import build_network
from lightning_distill.methods.prototype import StudentModule
from lightning_distill.bank import Bank, PrototypeBank, load_bank, save_bank




def _batches(n=3, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        yield torch.randn(2, k, 4, 4, generator=g), torch.randint(0, k, (2, 1, 4, 4), generator=g)


def test_ema_and_start_fraction():
    names = ["background", "a", "b"]
    cb = PrototypeBank(names, momentum=0.5, start=0.5)
    t = _FakeTrainer()
    batches = list(_batches(n=2))
    cb.on_train_batch_end(t, None, {"logits": batches[0][0]}, {"label": batches[0][1]}, 0)
    assert cb.sums is None  # step 0 < 0.5 * max_steps: not accumulated
    t.global_step = 5
    for logits, labels in batches:
        cb.on_train_batch_end(t, None, {"logits": logits}, {"label": labels}, 0)
    m0, _ = masked_class_mean(torch.softmax(batches[0][0], 1), batches[0][1], 3)
    m1, _ = masked_class_mean(torch.softmax(batches[1][0], 1), batches[1][1], 3)
    assert torch.allclose(cb.prototypes, 0.5 * m0 + 0.5 * m1, atol=1e-6)


def test_bank_accumulates_every_temperature_and_the_student_reads_its_own(tmp_path):
    from lightning_distill.losses import masked_class_mean
    from lightning_distill.methods.prototype import StudentModule
    from lightning_distill.networks import build_network
    from lightning_distill.bank import PrototypeBank, load_bank, save_bank

    names = ["background", "a", "b", "c"]
    cb = PrototypeBank(names, tau=1.0, taus=[0.5, 1.0, 4.0], start=0.0)
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(2, 4, 4, 4, generator=g) * 3 for _ in range(3)]
    labels = [torch.randint(0, 4, (2, 1, 4, 4), generator=g) for _ in range(3)]
    for z, y in zip(logits, labels):
        cb.on_train_batch_end(_FakeTrainer(), None, {"logits": z}, {"label": y}, 0)
    bank = cb.bank()
    assert bank.taus == [0.5, 1.0, 4.0]
    for t in bank.taus:  # the mean of softmax(z / t) over each class's pixels, at every t
        expected, _ = masked_class_mean(torch.softmax(torch.cat(logits) / t, 1), torch.cat(labels), 4)
        assert torch.allclose(bank.at_tau(t), expected, atol=1e-6), t
    assert torch.equal(bank.at_tau(None), bank.prototypes) and torch.equal(bank.at_tau(1.0), bank.prototypes)
    save_bank(tmp_path / "b.pt", bank)
    loaded = load_bank(tmp_path / "b.pt")
    assert loaded.taus == [0.5, 1.0, 4.0] and torch.allclose(loaded.at_tau(4.0), bank.at_tau(4.0))
    with pytest.raises(ValueError, match=r"\[0.5, 1.0, 4.0\].*distill.tau=2"):
        loaded.at_tau(2.0)
    # a restored callback (checkpoint) continues every temperature
    again = PrototypeBank(names, tau=1.0, taus=[0.5, 4.0], start=0.0)
    again.load_state_dict(cb.state_dict())
    assert torch.allclose(again.bank().at_tau(0.5), bank.at_tau(0.5))

    net = build_network("Unet", 2, 1, 4, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    student = StudentModule(net, names, bank=loaded, tau=4.0)
    assert student.tau == 4.0 and torch.equal(student.teacher_prototypes, loaded.at_tau(4.0))
    with pytest.raises(ValueError, match="distill.tau=3"):
        StudentModule(net, names, bank=loaded, tau=3.0)


def test_bad_arguments():
    with pytest.raises(ValueError, match="space"):
        PrototypeBank(["a", "b"], space="logits")
    with pytest.raises(ValueError, match="feature_layer"):
        PrototypeBank(["a", "b"], space="feature")
    with pytest.raises(ValueError, match="momentum"):
        PrototypeBank(["a", "b"], momentum=1.5)


def test_bank_in_teacher_checkpoint_and_exported_file(teacher_bank):
    bank = load_bank(teacher_bank / "prototypes.pt")
    k = len(CLASS_NAMES)
    assert bank.prototypes.shape == (k, k) and bank.prototypes.dtype == torch.float32
    assert bank.class_names == list(CLASS_NAMES) and bank.space == "prob" and bank.tau == 1.0
    present = bank.present
    assert torch.allclose(bank.prototypes[present].sum(1), torch.ones(int(present.sum())), atol=1e-5)  # softmax rows
    for key in ("config", "checkpoint", "checkpoint_sha256", "version", "counts", "mode"):
        assert key in bank.meta or hasattr(bank, key)
    ckpt_path = bank.meta["checkpoint"]
    assert os.path.isfile(ckpt_path)
    from lightning_distill.io import file_sha256

    assert bank.meta["checkpoint_sha256"] == file_sha256(ckpt_path)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    states = [v for key, v in ckpt["callbacks"].items() if key.startswith("PrototypeBank")]
    assert len(states) == 1
    restored = PrototypeBank(CLASS_NAMES)
    restored.load_state_dict(states[0])
    assert torch.allclose(restored.prototypes, bank.prototypes)


def test_truncated_or_foreign_bank_file_gives_clear_error(tmp_path, teacher_bank):
    data = (teacher_bank / "prototypes.pt").read_bytes()
    bad = tmp_path / "truncated.pt"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated.pt"):
        load_bank(bad)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match="lacks the keys"):
        load_bank(foreign)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_bank(tmp_path / "missing.pt")


def test_student_refuses_bank_with_other_class_names(tmp_path):
    names = ["background", "liver", "spleen"]
    path = tmp_path / "bank.pt"
    save_bank(path, Bank(torch.eye(3), torch.ones(3), ["background", "liver", "kidney"], 1.0, "prob"))
    net = build_network("Unet", 2, 1, 3, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    with pytest.raises(ValueError, match="kidney"):
        StudentModule(net, names, bank=load_bank(path))
    save_bank(path, Bank(torch.eye(3), torch.ones(3), ["background", "spleen", "liver"], 1.0, "prob"))
    with pytest.raises(ValueError, match="another order"):
        StudentModule(net, names, bank=load_bank(path))
    StudentModule(net, names, bank=Bank(torch.eye(3), torch.ones(3), names, 1.0, "prob"))  # accepted


def test_student_step_gradient_reaches_student_not_bank():
    names = ["background", "a", "b"]
    bank = Bank(torch.softmax(torch.randn(3, 3), 1), torch.ones(3), names, 1.0, "prob")
    net = build_network("Unet", 2, 1, 3, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    module = StudentModule(net, names, bank=bank)
    before = module.teacher_prototypes.clone()
    batch = {"image": torch.randn(2, 1, 32, 32), "label": torch.randint(0, 3, (2, 1, 32, 32))}
    out = module.model_step(batch)
    assert {"seg_dice", "seg_ce", "dist_inter", "dist_intra"} <= set(out["terms"])
    out["terms"]["dist_inter"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())
    assert not module.teacher_prototypes.requires_grad and torch.equal(module.teacher_prototypes, before)
    assert "teacher_prototypes" in module.state_dict()  # checkpoints carry the bank


def test_ignore_index_pixels_count_in_no_loss_and_no_metric():
    names = ["background", "a", "b"]
    net = build_network("Unet", 2, 1, 3, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    module = StudentModule(net, names, bank=Bank(torch.softmax(torch.randn(3, 3), 1), torch.ones(3), names, 1.0, "prob"))
    label = torch.randint(0, 3, (2, 1, 32, 32))
    logits = torch.randn(2, 3, 32, 32)
    ignored = label.clone()
    ignored[:, :, :8] = 255
    terms = module.seg_terms(logits, ignored)
    assert all(torch.isfinite(v) for v in terms.values())
    # changing the logits at ignored pixels changes nothing
    other = logits.clone()
    other[:, :, :8] = torch.randn(2, 3, 8, 32) * 10
    terms2 = module.seg_terms(other, ignored)
    assert all(torch.allclose(terms[k], terms2[k], atol=1e-6) for k in terms)
    pred, lab = module._eval_pair(other, ignored)
    assert (lab != 255).all() and (pred[:, :, :8] == 0).all()


def test_masked_class_leaves_both_dist_terms():
    """distill.mask_classes=[spleen]: the spleen's prototype (its pixels' predictions) no longer enters
    either DIST term; without the mask it does. Unknown names are refused with the valid list."""
    names = ["background", "liver", "kidney", "aorta", "spleen"]
    torch.manual_seed(0)
    bank = Bank(torch.softmax(torch.randn(5, 5) * 2, 1), torch.ones(5), names, 1.0, "prob")
    net = build_network("Unet", 2, 1, 5, encoder="resnet18", kwargs={"decoder_channels": [16, 16, 8, 8, 8]})
    label = torch.arange(5).repeat_interleave(8).view(1, 1, 1, 40).expand(2, 1, 40, 40).clone()
    spleen = (label == 4).expand(2, 5, 40, 40)

    def grad_at_spleen(mask):
        module = StudentModule(net, names, bank=bank, mask_classes=mask)
        logits = torch.randn(2, 5, 40, 40, generator=torch.Generator().manual_seed(1), requires_grad=True)
        terms = module.extra_terms({"label": label}, logits)
        (terms["dist_inter"] + terms["dist_intra"]).backward()
        return logits.grad[spleen].abs().max().item(), logits.grad[~spleen].abs().max().item()

    at_spleen, elsewhere = grad_at_spleen([])
    assert at_spleen > 1e-6 and elsewhere > 1e-6
    at_spleen, elsewhere = grad_at_spleen(["spleen"])
    assert at_spleen == 0.0 and elsewhere > 1e-6
    with pytest.raises(ValueError, match="not classes of this run.*liver"):
        StudentModule(net, names, bank=bank, mask_classes=["spleeen"])
    with pytest.raises(ValueError, match="needs a teacher bank"):
        StudentModule(net, names, mask_classes=["spleen"])
