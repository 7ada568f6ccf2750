"""A teacher network that stays frozen: no gradients, always in ``eval()``, run under ``no_grad``."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from lightning_distill.checkpoints import load_checkpoint, load_network
from lightning_distill.modules import check_checkpoint


class FrozenTeacher(nn.Module):
    """Wrap a trained network so that a student's training never changes it.

    Its parameters get ``requires_grad = False``; ``train()`` (which Lightning calls on the whole
    LightningModule every epoch) leaves it in ``eval()`` mode, so batch-norm statistics and dropout
    stay fixed; ``forward`` runs under ``torch.no_grad()``. Its weights are still part of the
    student's ``state_dict``, so a checkpoint can resume training.

    Args:
        net: the teacher network.
    """

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.net.eval()

    def train(self, mode: bool = True) -> "FrozenTeacher":
        super().train(False)
        return self

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def load_teacher_network(checkpoint: Optional[str], class_names: Sequence[str], why: str) -> nn.Module:
    """The network of a trained 2D teacher checkpoint (built from the checkpoint's own config).

    Args:
        checkpoint: the teacher's ``.ckpt`` (``distill.teacher``).
        class_names: the student's classes; the teacher's must be the same.
        why: what needs the teacher (for the error message), e.g. ``"distill.method=sikd"``.

    Raises:
        ValueError: no checkpoint given, or one of another class set.
    """

    if not checkpoint:
        raise ValueError(f"{why} needs distill.teacher: the 2D teacher's checkpoint (e.g. "
                         "runs/sikd_teacher/checkpoints/best.ckpt), or distill.weight=0 for the baseline")
    ckpt, tcfg = load_checkpoint(checkpoint)
    check_checkpoint(ckpt, class_names, f"teacher checkpoint {checkpoint}")
    return load_network(ckpt, tcfg)
