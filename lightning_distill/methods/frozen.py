"""A teacher network that stays frozen: no gradients, always in ``eval()``, run under ``no_grad``."""

from __future__ import annotations

import torch
from torch import Tensor, nn


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
