"""A distillation method is one file plus one registry line (docs/architecture.md, issue 18)."""

import csv
import json
import textwrap

import pytest
import torch

from conftest import REPO

TOY = textwrap.dedent('''
    """A toy method: segmentation + weight * mean prediction entropy (a confidence penalty)."""
    import torch

    from lightning_distill.modules import SegmentationModule


    class EntropyModule(SegmentationModule):
        def __init__(self, net, class_names, weight=1.0, **kwargs):
            super().__init__(net, class_names, **kwargs)
            self.weight = float(weight)

        def term_weights(self):
            return {**super().term_weights(), "toy_entropy": self.weight}

        def extra_terms(self, batch, logits):
            p = torch.softmax(logits.float(), dim=1)
            return {"toy_entropy": -(p * torch.log(p.clamp_min(1e-8))).sum(1).mean()}


    def build(cfg, net, class_names, common):
        return EntropyModule(net, class_names, weight=cfg.distill.weight, **common)
''')


@pytest.fixture
def toy_method(tmp_path, monkeypatch):
    """``toy_kd.py`` on the path and its one line in the registry."""
    from lightning_distill.methods import METHODS

    (tmp_path / "toy_kd.py").write_text(TOY)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(METHODS, "toy", "toy_kd:build")
    return "toy"


def test_unknown_method_names_the_registered_ones(tmp_path):
    from lightning_distill.config import ConfigError, load_config
    from lightning_distill.methods import METHODS, method_builder

    with pytest.raises(ConfigError, match=r"distill.method='toy' is not one of .*'prototype'.*'cmedl'"):
        load_config(f"{REPO}/experiments/student.yaml", ["distill.method=toy"])
    with pytest.raises(KeyError, match=r"unknown distillation method 'toy'; valid: \['cmedl', 'pixel', 'prototype', 'sikd'\]"):
        method_builder("toy")
    assert set(METHODS) == {"prototype", "sikd", "pixel", "cmedl"}


@pytest.mark.parametrize("name", ["prototype", "sikd", "pixel", "cmedl"])
def test_at_weight_0_every_method_but_cmedl_builds_the_plain_baseline_and_loads_no_teacher(name, tiny_student):
    from lightning_distill.config import load_config
    from lightning_distill.methods import CMEDLModule, StudentModule
    from lightning_distill.train import build_module

    cfg = load_config(f"{REPO}/experiments/student.yaml", [*tiny_student, f"distill.method={name}", "distill.weight=0",
                                                           "distill.prototypes=null", "distill.teacher=/nonexistent.ckpt",
                                                           "cmedl.target.shape=[64,64]"])
    module = build_module(cfg, ["background", "a", "b"])
    if name == "cmedl":  # its translator and teacher train beside the student: never a baseline
        assert isinstance(module, CMEDLModule) and module.term_weights()["hint"] == 0
    else:
        assert type(module) is StudentModule and module.teacher_prototypes is None
        w = module.term_weights()
        assert w["dist_inter"] == 0 and w["dist_intra"] == 0 and {"seg_dice", "seg_ce"} <= set(w)


def test_a_method_added_as_one_file_and_one_registry_line_builds_its_weighted_loss(toy_method, tiny_student):
    from lightning_distill.config import load_config
    from lightning_distill.train import build_module

    cfg = load_config(f"{REPO}/experiments/student.yaml",
                      ["distill.method=toy", "distill.weight=0.5", "distill.prototypes=null", *tiny_student])
    module = build_module(cfg, ["background", "a", "b"])
    assert type(module).__name__ == "EntropyModule"
    torch.manual_seed(0)
    batch = {"image": torch.randn(2, 1, 64, 64), "label": torch.randint(0, 3, (2, 1, 64, 64))}
    out = module.model_step(batch, train=True)
    t = out["terms"]
    assert set(t) == {"seg_dice", "seg_ce", "toy_entropy"} and t["toy_entropy"].item() > 0
    expected = cfg.loss.dice_weight * t["seg_dice"] + cfg.loss.ce_weight * t["seg_ce"] + 0.5 * t["toy_entropy"]
    assert torch.allclose(out["loss"], expected)
    # the term's gradient reaches the network: it lowers the entropy when followed
    module.net.zero_grad()
    t["toy_entropy"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.net.parameters())


def test_a_method_added_as_one_file_and_one_registry_line_trains_end_to_end(toy_method, tiny_student, tmp_path):
    from lightning_distill.cli import main

    out = tmp_path / "toy_run"
    assert main(["fit", f"{REPO}/experiments/student.yaml", f"output_dir={out}", "distill.method=toy",
                 "distill.weight=0.5", "distill.prototypes=null", *tiny_student]) == 0
    rows = list(csv.DictReader(open(out / "logs" / "metrics.csv")))
    logged = [float(r["train/toy_entropy"]) for r in rows if r.get("train/toy_entropy")]
    assert len(logged) >= 4 and all(v > 0 for v in logged)  # logged at every step (log_every_n_steps=1)
    res = json.loads((out / "results.json").read_text())
    assert "method: toy" in (out / "config.yaml").read_text() and "dice" in res["test"]
    assert (out / "checkpoints" / "best.ckpt").is_file()
    again = tmp_path / "test.json"  # the checkpoint loads back through the registry
    assert main(["test", str(out / "checkpoints" / "best.ckpt"), f"--out={again}"]) == 0
    assert json.loads(again.read_text())["test"]["dice"] == pytest.approx(res["test"]["dice"])


# constructor argument -> the config key it comes from (the schema holds each default once; issue 34)
CONSTRUCTOR_KEYS = {
    "lr": "optim.lr", "weight_decay": "optim.weight_decay", "scheduler": "optim.scheduler", "dice_weight": "loss.dice_weight",
    "ce_weight": "loss.ce_weight", "dice_batch": "loss.dice_batch", "val_hd95": "val_hd95", "sw_batch_size": "sw_batch_size",
    "surface_tolerance": "surface_tolerance_mm", "input_transform": "input_transform", "distill_weight": "distill.weight",
    "beta": "distill.beta", "gamma": "distill.gamma", "geometry": "distill.geometry", "log_floor": "distill.log_floor",
    "min_pixels": "distill.min_pixels", "row_weight": "distill.row_weight", "min_reliability": "distill.min_reliability",
    "grad_every": "distill.grad_every", "mask_classes": "distill.mask_classes", "hint_weight": "distill.weight",
    "teacher_weight": "cmedl.teacher_weight", "adv_weight": "cmedl.adv_weight", "cycle_weight": "cmedl.cycle_weight",
    "identity_weight": "cmedl.identity_weight", "translator_seg": "cmedl.translator_seg", "gan_lr": "cmedl.gan_lr",
    "gan_betas": "cmedl.gan_betas", "hint_layers": "cmedl.hint_layers",
}


def test_module_constructors_default_to_the_schemas_defaults():
    """A module built in a notebook without a config behaves as `fit` with the default config (SIKD's weight was
    2.0 in its constructor, 1.0 in the schema)."""
    import inspect

    from omegaconf import OmegaConf

    from lightning_distill.config import RunConfig
    from lightning_distill.methods import CMEDLModule, PixelDistModule, SIKDModule, StudentModule
    from lightning_distill.modules import SegmentationModule

    schema = OmegaConf.structured(RunConfig)
    checked, differ = 0, []
    for cls in (SegmentationModule, StudentModule, SIKDModule, PixelDistModule, CMEDLModule):
        for name, p in inspect.signature(cls.__init__).parameters.items():
            if name not in CONSTRUCTOR_KEYS or p.default is inspect.Parameter.empty:
                continue
            want = OmegaConf.select(schema, CONSTRUCTOR_KEYS[name])
            want = OmegaConf.to_container(want) if OmegaConf.is_config(want) else want
            have = list(p.default) if isinstance(p.default, tuple) else p.default
            checked += 1
            if have != want:
                differ.append(f"{cls.__name__}({name}={p.default!r}) vs {CONSTRUCTOR_KEYS[name]}={want!r}")
    assert checked > 30
    assert not differ, differ
