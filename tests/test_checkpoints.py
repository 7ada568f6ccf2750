"""What a checkpoint carries (lightning_distill/checkpoints.py reads it back)."""

import torch

from conftest import load_ckpt as _ckpt
from lightning_distill.bank import load_bank


def test_checkpoints_carry_config_classes_bank_and_version(teacher_bank):
    from lightning_distill import __version__
    from lightning_distill.config import load_config_dict

    exported = load_bank(teacher_bank / "prototypes.pt")
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = _ckpt(teacher_bank / "checkpoints" / name)
        meta = ckpt["lightning_distill"]
        assert meta["version"] == __version__
        assert meta["class_names"] == exported.class_names
        assert load_config_dict(meta["config"]).stage == "teacher"  # the resolved config validates
    carried = load_bank(teacher_bank / "checkpoints" / "last.ckpt")  # the bank as it was at the end
    assert torch.equal(carried.prototypes, exported.prototypes) and torch.equal(carried.counts, exported.counts)
