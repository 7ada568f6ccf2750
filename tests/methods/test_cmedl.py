"""CMEDL: translator networks, gradient isolation, optimiser steps, data, CLI run and checkpoints."""

import os

import pytest
import torch

from conftest import REPO, TINY_STUDENT, assert_close_to_precision
from lightning_distill.methods.cmedl import CMEDLModule, default_hint_layers, hint_loss
from lightning_distill.methods.translator import build_generator, lsgan_loss, patch_discriminator
from lightning_distill.networks import build_network

NAMES = ["background", "a", "b"]
CMEDL = [*TINY_STUDENT, "distill.method=cmedl", "distill.prototypes=null", "cmedl.channels=8", "cmedl.blocks=2",
         "cmedl.disc_channels=8", "cmedl.target.num_subjects=8", "cmedl.target.shape=[64,64]",
         "cmedl.target.val_subjects=0", "cmedl.target.test_subjects=0", "cmedl.examples=2"]


@pytest.mark.parametrize("name,kw", [("resnet", {"blocks": 2}), ("unet", {"depth": 4})])
@pytest.mark.parametrize("dims", [2, 3])
def test_translator_output_shape_and_range(name, kw, dims):
    torch.manual_seed(0)
    g = build_generator(name, channels=4, spatial_dims=dims, **kw)
    shape = (2, 1) + (32,) * dims
    x = torch.rand(shape)
    y = g(x * 3 - 1)  # even far outside [0, 1] the output stays in it
    assert y.shape == x.shape
    assert float(y.detach().min()) >= 0.0 and float(y.detach().max()) <= 1.0
    d = patch_discriminator(channels=4, layers=3, spatial_dims=dims)
    s = d(x)
    assert s.shape[:2] == (2, 1) and all(n < 32 for n in s.shape[2:])


def _datamodule(cfg):
    """The run's data module with CMEDL's second modality, as ``fit`` builds it."""
    from lightning_distill.data.build import build_datamodule
    from lightning_distill.methods import target_config

    return build_datamodule(cfg, target=target_config(cfg))


def test_translator_factory_lists_valid_names_and_lsgan_targets():
    with pytest.raises(KeyError, match=r"\['resnet', 'unet'\]"):
        build_generator("pix2pixHD")
    assert lsgan_loss(torch.ones(3), True) == 0 and lsgan_loss(torch.ones(3), False) == 1
    with pytest.raises(ValueError, match="depth >= 2"):
        build_generator("unet", depth=1)


@pytest.mark.parametrize("shape", [(2, 1, 6, 6), (3, 1, 2, 2, 2), (1, 1, 33, 33)])
@pytest.mark.parametrize("real", [True, False])
def test_lsgan_loss_is_the_least_squares_loss_of_earlier_versions(shape, real):
    """``lsgan_loss`` (MONAI's PatchAdversarialLoss without its activation) gives the numbers and gradients of
    the hand-written loss it replaced, in float32 also for bfloat16 scores."""
    def frozen(s):  # lsgan_loss before MONAI
        return torch.nn.functional.mse_loss(s.float(), torch.full_like(s.float(), 1.0 if real else 0.0))

    torch.manual_seed(0)
    s = (3 * torch.randn(shape)).requires_grad_()
    new, old = lsgan_loss(s, real), frozen(s)
    # two implementations (MONAI's loss module vs mse_loss): equal to float32 precision, not bit for bit
    assert new.dtype == torch.float32
    assert_close_to_precision(new, old)
    assert_close_to_precision(*(torch.autograd.grad(v, s)[0] for v in (new, old)))
    b = s.detach().bfloat16()  # bfloat16 scores are cast to float32 first: float32 precision again
    assert lsgan_loss(b, real).dtype == torch.float32
    assert_close_to_precision(lsgan_loss(b, real), frozen(b))
    assert lsgan_loss(s, real) > 0 and lsgan_loss(torch.full(shape, float(real)), real) == 0


def test_discriminator_layers_and_state_dict_keys_are_those_of_earlier_checkpoints():
    """CMEDL checkpoints hold ``d_a``/``d_b`` under these keys; widths double from ``channels`` up to 8x."""
    d = patch_discriminator(channels=4, layers=4)
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (1, 4, 2), (4, 8, 2), (8, 16, 2), (16, 32, 2), (32, 32, 1), (32, 1, 1)]
    assert list(d.state_dict()) == [f"body.{i}.{p}" for i in (0, 2, 5, 8, 11, 14) for p in ("weight", "bias")]
    assert sum(p.numel() for p in patch_discriminator(channels=32, layers=3, spatial_dims=3).parameters()) == 2771425


def test_hint_loss_and_default_layers():
    s, t = [torch.ones(1, 2, 4, 4), torch.zeros(1, 3, 2, 2)], [torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 2, 2)]
    assert hint_loss(s, t) == pytest.approx(0.5)  # mean of MSE 1 and MSE 0
    with pytest.raises(ValueError, match="differ in shape"):
        hint_loss([torch.ones(1, 2, 4, 4)], [torch.ones(1, 2, 2, 2)])
    with pytest.raises(ValueError, match="one teacher feature per student feature"):
        hint_loss([torch.ones(1)], [])
    unet = build_network("Unet", 2, 1, 3)
    assert default_hint_layers(unet) == ["decoder.blocks.3", "decoder.blocks.4"]
    assert default_hint_layers(build_network("FPN", 2, 1, 3)) == ["segmentation_head:input"]


def _module(translator=True, translator_seg=True, hint_weight=1.0):
    torch.manual_seed(0)
    net = lambda: build_network("Unet", 2, 1, 3, kwargs={"decoder_channels": [16, 8, 8, 8, 8]})  # noqa: E731
    nets = {}
    if translator:
        nets = dict(g_ab=build_generator("resnet", channels=4, blocks=1), g_ba=build_generator("resnet", channels=4, blocks=1),
                    d_a=patch_discriminator(channels=4), d_b=patch_discriminator(channels=4))
    return CMEDLModule(net(), NAMES, teacher=net(), hint_weight=hint_weight, translator_seg=translator_seg,
                       scheduler="none", **nets)


def _batch(b=2, n=64):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(b, 1, n, n, generator=g), "label": torch.randint(0, 3, (b, 1, n, n), generator=g),
            "image_b": torch.rand(b, 1, n, n, generator=g)}


def _reaches(term, module):
    params = list(module.parameters())
    grads = torch.autograd.grad(term, params, allow_unused=True, retain_graph=True)
    got = {id(p) for p, g in zip(params, grads) if g is not None and g.abs().sum() > 0}
    return {name for name in ("net", "teacher", "g_ab", "g_ba", "d_a", "d_b")
            if getattr(module, name) is not None and any(id(p) in got for p in getattr(module, name).parameters())}


@pytest.mark.parametrize("translator_seg", [True, False])
def test_gradients_reach_only_the_intended_networks(translator_seg):
    m = _module(translator_seg=translator_seg)
    m.train()
    terms = m.compute_terms(_batch())["terms"]
    assert set(terms) == {"seg_dice", "seg_ce", "teacher_dice", "teacher_ce", "hint", "gan_g", "cycle", "gan_d"}
    reach = {k: _reaches(v, m) for k, v in terms.items()}
    # the student learns only from its own segmentation loss and the hint
    assert reach["seg_dice"] == {"net"} and reach["seg_ce"] == {"net"}
    assert reach["hint"] == {"net"}  # teacher features are detached in the hint
    # the discriminators' loss reaches only the discriminators (fakes are detached)
    assert reach["gan_d"] == {"d_a", "d_b"}
    # the generators' adversarial term does not train the discriminators it goes through
    assert reach["gan_g"] == {"g_ab", "g_ba"} and reach["cycle"] == {"g_ab", "g_ba"}
    # the teacher's segmentation loss trains the teacher, and G_AB only when translator_seg
    assert reach["teacher_dice"] == ({"teacher", "g_ab"} if translator_seg else {"teacher"})
    assert all(p.requires_grad for p in m.parameters())  # the discriminators were unfrozen again


def test_without_translator_the_teacher_sees_the_student_images():
    m = _module(translator=False)
    m.train()
    out = m.compute_terms(_batch())
    assert set(out["terms"]) == {"seg_dice", "seg_ce", "teacher_dice", "teacher_ce", "hint"}
    assert _reaches(out["terms"]["hint"], m) == {"net"}
    with pytest.raises(ValueError, match="all four translator networks"):
        CMEDLModule(build_network("Unet", 2, 1, 3), NAMES, teacher=build_network("Unet", 2, 1, 3),
                    g_ab=build_generator("resnet", channels=4, blocks=1))


def _fit_args(out, *extra):
    return ["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={out}", *CMEDL, *extra]


def test_every_optimiser_steps_and_max_steps_counts_batches(tmp_path):
    import lightning as L

    from lightning_distill.config import load_config
    from lightning_distill.train import build_module

    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), CMEDL[:-1] + ["trainer.max_steps=3"])
    L.seed_everything(0)
    module = build_module(cfg, NAMES_PHANTOM())
    dm = _datamodule(cfg)
    before = {k: [p.detach().clone() for p in getattr(module, k).parameters()] for k in ("net", "teacher", "g_ab", "g_ba", "d_a", "d_b")}
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3 and trainer.fit_loop.epoch_loop.batch_progress.total.completed == 3
    for k, ps in before.items():
        changed = sum(not torch.equal(a, b) for a, b in zip(ps, getattr(module, k).parameters()))
        assert changed > 0.9 * len(ps), f"{k}: only {changed}/{len(ps)} parameter tensors changed"
    opts = module.optimizers()
    assert [len(o.optimizer.state) > 0 for o in opts] == [True, True, True]  # generators, discriminators, segmenters


def NAMES_PHANTOM():
    from lightning_distill.data.phantom import CLASS_NAMES

    return list(CLASS_NAMES)


def test_unpaired_batches_and_shape_mismatch(tmp_path):
    from lightning_distill.config import load_config

    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), CMEDL)
    dm = _datamodule(cfg)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_b"].shape == batch["image"].shape and "label" in batch
    assert all(i.startswith("phantom1_") for i in batch["id_b"])  # the target population (other subjects)
    assert not set(dm.target_ids) & set(dm.train_ids)
    bad = load_config(os.path.join(REPO, "experiments/student.yaml"), CMEDL + ["cmedl.target.shape=[32,32]"])
    with pytest.raises(ValueError, match="differ in shape"):
        _datamodule(bad).train_dataloader()


def test_config_errors():
    from lightning_distill.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="cmedl.translator"):
        load_config(None, ["cmedl.translator=pix2pix"])
    with pytest.raises(ConfigError, match="cycle_weight"):
        load_config(None, ["cmedl.cycle_weigth=3"])
    with pytest.raises(ConfigError, match="cmedl.target.source"):
        load_config(None, ["cmedl.target.source=dicom"])


def test_fit_through_the_cli_checkpoint_round_trip_and_resume(tmp_path):
    import json

    from lightning_distill.cli import main
    from lightning_distill.checkpoints import load_checkpoint, load_network
    from lightning_distill.train import build_module

    out = tmp_path / "cmedl"
    assert main(_fit_args(out, "trainer.max_steps=4", "trainer.check_val_every_n_epoch=null",
                          "trainer.val_check_interval=2")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["test"]["dice_mean"] is not None and (out / "translations.png").stat().st_size > 1000
    metrics = (out / "logs" / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("train/hint", "train/gan_g", "train/gan_d", "train/cycle", "train/teacher_dice", "val/teacher_dice", "val/dice"):
        assert key in metrics
    # round trip: the checkpoint restores all five networks; the student alone predicts
    ckpt, cfg = load_checkpoint(out / "checkpoints" / "last.ckpt")
    fresh = build_module(cfg, NAMES_PHANTOM())
    fresh.load_state_dict(ckpt["state_dict"])
    assert {k.split(".")[0] for k in ckpt["state_dict"]} >= {"net", "teacher", "g_ab", "g_ba", "d_a", "d_b"}
    assert len(ckpt["optimizer_states"]) == 3
    student = load_network(ckpt, cfg)
    x = torch.rand(1, 1, 64, 64)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(student(x), fresh.net(x))
        assert torch.equal(fresh.g_ab(x), fresh.g_ab(x)) and 0 <= float(fresh.g_ab(x).min())
    # evaluating the student needs neither the translator nor the teacher's modality data
    assert main(["test", res["checkpoint"], "--out", str(tmp_path / "eval.json"),
                 "cmedl.target.source=nifti", f"cmedl.target.nifti.root={tmp_path / 'absent'}"]) == 0
    assert json.loads((tmp_path / "eval.json").read_text())["test"]["dice_mean"] == pytest.approx(res["test"]["dice_mean"])
    # resume from the last checkpoint (optimizer states of all three optimisers) to 6 steps
    import lightning as L


    module = build_module(cfg, NAMES_PHANTOM())
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(module, datamodule=_datamodule(cfg), ckpt_path=str(out / "checkpoints" / "last.ckpt"))
    assert trainer.global_step == 6
    assert not torch.equal(module.g_ab.body[1].weight, fresh.g_ab.body[1].weight)  # the generator trained on


def test_target_modality_from_nifti_files(tmp_path):
    """The teacher's modality can be a NIfTI dataset (here MRI-like phantom slices exported as files)."""
    from lightning_distill.config import load_config
    from lightning_distill.data.phantom import PhantomSpec
    from lightning_distill.data.sources import PhantomSource, export_phantom

    export_phantom(PhantomSource(PhantomSpec(seed=5, modality="MR"), 6, (48, 48)), tmp_path / "mr")
    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"),
                      CMEDL + ["cmedl.target.source=nifti", f"cmedl.target.nifti.root={tmp_path / 'mr'}",
                               "cmedl.target.nifti.modality=MR", "cmedl.target.nifti.label_pattern=null"])
    dm = _datamodule(cfg)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image_b"].shape == batch["image"].shape  # resized to data.shape by the MR preprocessing
    b = batch["image_b"]
    assert len(dm.target_ids) == 6 and b.std() > 0.05
    assert -0.3 < float(b.min()) and float(b.max()) < 1.3  # percentile-normalised to [0, 1], then augmented


TINY_CMEDL = [o for o in CMEDL if not o.startswith(("distill.", "cmedl.target.shape"))] + ["cmedl.target.shape=[64,64]"]


@pytest.mark.parametrize("setting,student,teacher,translate", [
    ("cmedl.yaml", "CT", "MR", True),         # informative teacher: MRI teaches CT
    ("cmedl_weak.yaml", "MR", "CT", True),    # weak teacher: CT teaches MRI
    ("cmedl_equal.yaml", "MR", "MR", False),  # equal teacher: MRI teaches MRI
])
def test_paper_settings_fast_dev_run(tmp_path, setting, student, teacher, translate):
    import json

    from lightning_distill.cli import main
    from lightning_distill.config import load_config

    path = os.path.join(REPO, "experiments", setting)
    cfg = load_config(path, TINY_CMEDL)
    assert (cfg.data.phantom.modality, cfg.cmedl.target.phantom.modality) == (student, teacher)
    assert (cfg.cmedl.translator != "none") == translate and cfg.distill.method == "cmedl"
    out = tmp_path / "run"
    assert main(["fit", path, f"output_dir={out}", *TINY_CMEDL, "trainer.fast_dev_run=true"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["test"]["num_cases"] > 0 and (out / "translations.png").is_file()


def test_fp16_gradient_scaler_updates_once_per_batch(tmp_path):
    """16-mixed: the three optimisers step through one GradScaler, updated once per batch (the precision
    plugin alone updated it after each optimiser, three times a batch). Lightning maps 16-mixed to bf16 on
    CPU, so the CPU GradScaler is given explicitly."""
    import lightning as L
    from lightning.pytorch.plugins import MixedPrecision

    from lightning_distill.config import load_config
    from lightning_distill.train import build_module

    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), CMEDL[:-1] + ["trainer.max_steps=3"])
    L.seed_everything(0)
    module, dm = build_module(cfg, NAMES_PHANTOM()), _datamodule(cfg)
    scaler = torch.amp.GradScaler("cpu")
    updates, steps = [], []
    real_update, real_step = scaler.update, scaler.step
    scaler.update = lambda *a, **k: (updates.append(1), real_update(*a, **k))[1]
    scaler.step = lambda opt, *a, **k: (steps.append(type(opt).__name__), real_step(opt, *a, **k))[1]
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, accelerator="cpu",
                        plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 3
    assert len(updates) == 3 and len(steps) == 9, (updates, steps)
    assert all(len(o.optimizer.state) > 0 for o in module.optimizers())
