"""Network factories keyed by short names.

* 3D (the teacher): MONAI ``UNet`` (default), ``DynUNet``, ``SwinUNETR``.
* 2D (the student): any segmentation-models-pytorch architecture (``Unet``, ``FPN``,
  ``DeepLabV3Plus``, ...) with any of its encoders; ``encoder_weights`` is always ``None`` by default
  (nothing is downloaded at run time).

Each network also has a *head* module name: the module whose input is the penultimate feature map
(used by feature-space prototypes and feature distillation through forward hooks).
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import torch
from omegaconf import OmegaConf
from torch import nn

from lightning_distill.io import listed


def _monai_unet(spatial_dims: int, in_channels: int, out_channels: int, **kw) -> nn.Module:
    from monai.networks.nets import UNet  # deferred: MONAI takes seconds to import; only a MONAI network needs it

    kw.setdefault("channels", (16, 32, 64, 128))
    kw.setdefault("strides", (2,) * (len(kw["channels"]) - 1))
    kw.setdefault("num_res_units", 1)
    return UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kw)


def _monai_dynunet(spatial_dims: int, in_channels: int, out_channels: int, **kw) -> nn.Module:
    from monai.networks.nets import DynUNet  # deferred: MONAI takes seconds to import; only a MONAI network needs it

    depth = int(kw.pop("depth", 4))
    kw.setdefault("kernel_size", [3] * depth)
    kw.setdefault("strides", [1] + [2] * (depth - 1))
    kw.setdefault("upsample_kernel_size", [2] * (depth - 1))
    kw.setdefault("filters", [16 * 2**i for i in range(depth)])
    return DynUNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kw)


def _monai_swinunetr(spatial_dims: int, in_channels: int, out_channels: int, **kw) -> nn.Module:
    from monai.networks.nets import SwinUNETR  # deferred: MONAI takes seconds to import; only a MONAI network needs it

    kw.setdefault("feature_size", 12)
    return SwinUNETR(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kw)


MONAI_NETWORKS: Dict[str, Callable[..., nn.Module]] = {
    "UNet": _monai_unet,
    "DynUNet": _monai_dynunet,
    "SwinUNETR": _monai_swinunetr,
}
MONAI_HEADS = {"UNet": "model.2", "DynUNet": "output_block", "SwinUNETR": "out"}


def smp_architectures() -> Dict[str, type]:
    """segmentation-models-pytorch architectures by class name (``Unet``, ``FPN``, ...)."""
    # deferred: smp (and timm) take seconds to import; only 2D networks need it
    import segmentation_models_pytorch as smp

    return {cls.__name__: cls for cls in smp.MODEL_ARCHITECTURES_MAPPING.values()}


def build_network(
    name: str,
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    encoder: str = "resnet18",
    kwargs: Optional[Mapping[str, Any]] = None,
    skip_connections: bool = True,
) -> nn.Module:
    """Build a segmentation network by short name.

    Args:
        name: a MONAI name (3D: ``UNet``, ``DynUNet``, ``SwinUNETR``; also usable in 2D) or an smp
            architecture (2D only).
        spatial_dims: 2 or 3.
        in_channels: image channels.
        out_channels: number of classes K.
        encoder: smp encoder name (ignored by MONAI networks).
        kwargs: extra constructor arguments.
        skip_connections: ``False`` decodes from the bottleneck only (smp encoder-decoders: every
            encoder feature but the deepest is zeroed by a forward hook); SIKD's U-Net teacher option.

    Raises:
        KeyError: unknown name; the message lists the valid names.
        ValueError: an smp architecture asked for in 3D; ``kwargs`` the network does not take (naming them
            and the constructor's arguments).
    """
    kw = dict(kwargs or {})
    if name in MONAI_NETWORKS:
        # deferred: MONAI takes seconds to import; only a MONAI network needs it
        import monai.networks.nets as monai_nets

        _check_kwargs(name, getattr(monai_nets, name), kw, extra=("depth",) if name == "DynUNet" else ())
        return MONAI_NETWORKS[name](spatial_dims, in_channels, out_channels, **kw)
    archs = smp_architectures()
    if name in archs:
        if spatial_dims != 2:
            raise ValueError(f"segmentation-models-pytorch architecture {name!r} is 2D only; for 3D use one of {sorted(MONAI_NETWORKS)}")
        # deferred: smp (and timm) take seconds to import; only 2D networks need it
        import segmentation_models_pytorch as smp

        kw.setdefault("encoder_weights", None)
        _check_kwargs(name, archs[name], kw)
        net = smp.create_model(name, encoder_name=encoder, in_channels=in_channels, classes=out_channels, **kw)
        if not skip_connections:
            drop_skip_connections(net)
        return net
    if not skip_connections:
        raise ValueError(f"skip_connections=False is for segmentation-models-pytorch encoder-decoders, not {name!r}")
    raise KeyError(
        f"unknown network {name!r}; valid names: MONAI (2D/3D) {sorted(MONAI_NETWORKS)}, "
        f"segmentation-models-pytorch (2D) {sorted(archs)}"
    )


def _check_kwargs(name: str, network_class: type, kw: Mapping[str, Any], extra: Sequence[str] = ()) -> None:
    """``ValueError`` naming the ``model.kwargs`` entries ``network_class`` does not take (``extra``: the
    package's own keys, e.g. DynUNet's ``depth``). Classes that take ``**kwargs`` are not checked."""

    try:
        params = inspect.signature(network_class).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in kw if k not in params and k not in extra)
    if unknown:
        valid = [p for p in params if p not in ("self", "spatial_dims", "in_channels", "out_channels", "classes",
                                                   "encoder_name")]
        raise ValueError(f"model.kwargs {unknown} are not arguments of the network {name!r}; it takes {valid} "
                         f"(remove an entry with ~model.kwargs.<name>)")


def drop_skip_connections(net: nn.Module) -> nn.Module:
    """Make an smp encoder-decoder decode from its deepest feature only (no skip connections).

    A forward hook on ``net.encoder`` replaces every feature map but the last by zeros of the same
    shape, so the decoder's layers and weights are unchanged but receive no encoder detail.
    """
    if not hasattr(net, "encoder"):
        raise ValueError(f"{type(net).__name__} has no `encoder` module: cannot drop its skip connections")

    def hook(module, inputs, features):
        return [torch.zeros_like(f) for f in features[:-1]] + [features[-1]]

    net.encoder.register_forward_hook(hook)
    return net


def head_module_name(name: str) -> str:
    """Name of the module whose *input* is the penultimate feature map of network ``name``."""
    return MONAI_HEADS.get(name, "segmentation_head")


class InputHook:
    """Keep the input (or output) of a submodule found by name, through a forward hook.

    Args:
        net: the network.
        module_name: dotted name as in ``net.named_modules()``.
        which: ``"input"`` (the first positional input) or ``"output"``.
        detach: store a detached tensor.
    """

    def __init__(self, net: nn.Module, module_name: str, which: str = "input", detach: bool = False):
        modules = dict(net.named_modules())
        if module_name not in modules:
            near = [n for n in modules if n and (module_name.split(".")[0] in n)] or [n for n in modules if n][:20]
            raise KeyError(f"module {module_name!r} not found in {type(net).__name__}; some valid names: {listed(near, 20)}")
        if which not in ("input", "output"):
            raise ValueError(f"which must be 'input' or 'output', got {which!r}")
        self.which, self.detach, self.value = which, detach, None
        self.handle = modules[module_name].register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        v = inputs[0] if self.which == "input" else output
        self.value = v.detach() if self.detach else v

    def pop(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the hooked module has not run since the last pop()")
        v, self.value = self.value, None
        return v

    def remove(self) -> None:
        self.handle.remove()


def build_net(cfg: Any, num_classes: int) -> nn.Module:
    """The network of a run config (2D or 3D by ``len(cfg.data.shape)``, one input channel, ``num_classes`` outputs)."""
    return build_network(cfg.model.name, len(cfg.data.shape), 1, num_classes, encoder=cfg.model.encoder,
                         kwargs=OmegaConf.to_container(cfg.model.kwargs), skip_connections=cfg.model.skip_connections)
