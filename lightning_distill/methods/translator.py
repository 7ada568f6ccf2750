"""Unpaired image-to-image translators (CycleGAN, Zhu et al. ICCV 2017) for CMEDL.

Two generator architectures, as the CMEDL paper tested more than one translator: ``resnet`` (the
CycleGAN ResNet generator: 7x7 stem, two stride-2 down-samplings, residual blocks, two
up-samplings, 7x7 output; instance norm, reflection padding) and ``unet`` (an encoder-decoder with
skip connections). Discriminators are PatchGANs (4x4 stride-2 convolutions, instance norm,
LeakyReLU 0.2) that score overlapping patches, trained with the least-squares GAN loss.

Images are single-channel in ``[0, 1]`` (windowed CT, normalised MR); generators map ``[0, 1]`` to
``(0, 1)`` (``tanh`` on ``2x - 1``, rescaled). One code path for 2D and 3D (``B C spatial...``).
"""

from __future__ import annotations

from typing import Callable, Dict

import torch
from monai.losses import PatchAdversarialLoss
from torch import Tensor, nn


def _layers(spatial_dims: int):
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    if spatial_dims == 2:
        return nn.Conv2d, nn.ConvTranspose2d, nn.InstanceNorm2d, nn.ReflectionPad2d
    return nn.Conv3d, nn.ConvTranspose3d, nn.InstanceNorm3d, nn.ReflectionPad3d


class _Residual(nn.Module):
    def __init__(self, ch: int, spatial_dims: int):
        super().__init__()
        conv, _, norm, pad = _layers(spatial_dims)
        self.body = nn.Sequential(pad(1), conv(ch, ch, 3), norm(ch), nn.ReLU(True), pad(1), conv(ch, ch, 3), norm(ch))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class _Centred(nn.Module):
    """Feeds ``2x - 1`` (images in ``[0, 1]`` -> ``[-1, 1]``) to ``body``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return self.body(2.0 * x - 1.0)


class _UnitRange(nn.Module):
    """Wraps a network that works on ``[-1, 1]`` images so it maps ``[0, 1]`` to ``(0, 1)``."""

    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x: Tensor) -> Tensor:
        return (torch.tanh(self.body(2.0 * x - 1.0)) + 1.0) * 0.5


def resnet_generator(in_channels: int = 1, out_channels: int = 1, channels: int = 32, blocks: int = 6,
                     spatial_dims: int = 2) -> nn.Module:
    """CycleGAN's ResNet generator (c7s1-ch, d2ch, d4ch, ``blocks`` x R4ch, u2ch, uch, c7s1-out).

    Args:
        in_channels, out_channels: image channels.
        channels: width of the first layer (CycleGAN: 64; smaller here for CPU budgets).
        blocks: residual blocks at 1/4 resolution (CycleGAN: 6 for 128², 9 for 256²).
        spatial_dims: 2 or 3.

    Returns:
        a module mapping ``(B, in, *S)`` in ``[0, 1]`` to ``(B, out, *S)`` in ``(0, 1)``; every
        spatial size must be divisible by 4.
    """
    conv, convt, norm, pad = _layers(spatial_dims)
    c = channels
    layers = [pad(3), conv(in_channels, c, 7), norm(c), nn.ReLU(True),
              conv(c, 2 * c, 3, stride=2, padding=1), norm(2 * c), nn.ReLU(True),
              conv(2 * c, 4 * c, 3, stride=2, padding=1), norm(4 * c), nn.ReLU(True)]
    layers += [_Residual(4 * c, spatial_dims) for _ in range(blocks)]
    layers += [convt(4 * c, 2 * c, 3, stride=2, padding=1, output_padding=1), norm(2 * c), nn.ReLU(True),
               convt(2 * c, c, 3, stride=2, padding=1, output_padding=1), norm(c), nn.ReLU(True),
               pad(3), conv(c, out_channels, 7)]
    return _UnitRange(nn.Sequential(*layers))


class _UNetGenerator(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, channels: int, depth: int, spatial_dims: int):
        super().__init__()
        conv, convt, norm, _ = _layers(spatial_dims)
        widths = [channels * 2 ** min(i, 3) for i in range(depth)]
        self.down = nn.ModuleList()
        prev = in_channels
        for i, w in enumerate(widths):  # stride-2 4x4 convolutions (pix2pix / CycleGAN U-Net)
            block = [conv(prev, w, 4, stride=2, padding=1)]
            if 0 < i < depth - 1:
                block.append(norm(w))
            self.down.append(nn.Sequential(nn.LeakyReLU(0.2, True) if i else nn.Identity(), *block))
            prev = w
        self.up = nn.ModuleList()
        for i in reversed(range(depth)):
            w_in = widths[i] * (1 if i == depth - 1 else 2)
            w_out = out_channels if i == 0 else widths[i - 1]
            block = [nn.ReLU(True), convt(w_in, w_out, 4, stride=2, padding=1)]
            if i > 0:
                block.append(norm(w_out))
            self.up.append(nn.Sequential(*block))

    def forward(self, x: Tensor) -> Tensor:
        skips = []
        for d in self.down:
            x = d(x)
            skips.append(x)
        skips.pop()
        for u in self.up:
            x = u(x)
            if skips:
                x = torch.cat([x, skips.pop()], 1)
        return x


def unet_generator(in_channels: int = 1, out_channels: int = 1, channels: int = 32, depth: int = 5,
                   spatial_dims: int = 2) -> nn.Module:
    """A U-Net generator (pix2pix/CycleGAN ``unet_*``): ``depth`` stride-2 levels with skip connections.

    Every spatial size must be divisible by ``2 ** depth``. Maps ``[0, 1]`` to ``(0, 1)``.
    """
    if depth < 2:
        raise ValueError(f"unet_generator needs depth >= 2, got {depth}")
    return _UnitRange(_UNetGenerator(in_channels, out_channels, channels, depth, spatial_dims))


def patch_discriminator(in_channels: int = 1, channels: int = 32, layers: int = 3, spatial_dims: int = 2) -> nn.Module:
    """PatchGAN discriminator (CycleGAN's ``n_layers=3`` is the 70x70 PatchGAN): one score per patch.

    Input images are in ``[0, 1]`` and are mapped to ``[-1, 1]`` first; output ``(B, 1, *S')``
    unbounded scores (least-squares GAN: real -> 1, fake -> 0). Widths double up to 8x ``channels``.
    Not MONAI's ``PatchDiscriminator``: its N(0, 0.02) init, uncapped widths and key names would change CMEDL runs.
    """
    conv, _, norm, _ = _layers(spatial_dims)
    seq = [conv(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
    w = channels
    for i in range(1, layers + 1):
        w_next = channels * 2 ** min(i, 3)
        seq += [conv(w, w_next, 4, stride=2 if i < layers else 1, padding=1), norm(w_next), nn.LeakyReLU(0.2, True)]
        w = w_next
    seq.append(conv(w, 1, 4, stride=1, padding=1))
    return _Centred(nn.Sequential(*seq))


GENERATORS: Dict[str, Callable[..., nn.Module]] = {"resnet": resnet_generator, "unet": unet_generator}


def build_generator(name: str, **kwargs) -> nn.Module:
    """A generator by short name (``resnet`` | ``unet``).

    Raises:
        KeyError: unknown name; the message lists the valid names.
    """
    if name not in GENERATORS:
        raise KeyError(f"unknown translator {name!r}; valid names: {sorted(GENERATORS)} (or 'none' for no translation)")
    return GENERATORS[name](**kwargs)


# without its default LeakyReLU(0.05) on the scores, MONAI's least-squares loss is the plain LSGAN loss
_LSGAN = PatchAdversarialLoss(criterion="least_squares", no_activation_leastsq=True)


def lsgan_loss(scores: Tensor, real: bool) -> Tensor:
    """Least-squares GAN loss (Mao et al. 2017): ``mean((D(x) - target)^2)`` in float32, target 1 for real, 0 for fake.

    The same loss for discriminator and generator terms (a generator asks for ``real=True``).
    """
    return _LSGAN(scores.float(), target_is_real=real, for_discriminator=True)
