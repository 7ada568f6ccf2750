"""``lightning-distill export``: a checkpoint's network as ONNX or TorchScript, for deployment without this package.

The exported model takes what the network took in training: the *preprocessed* image ``(B, C, X, Y)`` (2D) or
``(B, C, X, Y, Z)`` (3D), with the batch and spatial sizes free, and returns the class logits of the same spatial
size. How to preprocess (orientation, spacing, the CT window or MR normalisation, the training shape), the
class names and where it came from travel with the model: in the ONNX file's metadata (``lightning_distill``, a
JSON string) or the TorchScript file's extra file ``lightning_distill.json``. docs/cli.md shows a prediction with
onnxruntime alone.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Dict

import torch
from omegaconf import DictConfig

from lightning_distill import __version__
from lightning_distill.checkpoints import load_checkpoint, load_network
from lightning_distill.data.build import make_preprocess
from lightning_distill.io import atomic_write, file_sha256

FORMATS = {".onnx": "onnx", ".pt": "torchscript", ".ts": "torchscript"}
OPSET = 17


def export_metadata(checkpoint: str | Path, ckpt: Dict[str, Any], cfg: DictConfig) -> Dict[str, Any]:
    """What a deployed model needs besides its weights: classes, input layout and preprocessing, provenance (of the
    checkpoint file ``checkpoint``, read as ``ckpt`` with its run config ``cfg``)."""
    pre = make_preprocess(cfg)
    dims = len(cfg.data.shape)
    return {
        "classes": [str(n) for n in ckpt["hyper_parameters"]["class_names"]],
        "spatial_dims": dims,
        "input": f"(B, C, {'X, Y' if dims == 2 else 'X, Y, Z'}) float32, preprocessed as below; output: class logits, "
                 "same spatial size (argmax over C: the label map)",
        "in_channels": 1,  # every network of a run config takes one channel (networks.build_net)
        "preprocess": {"orientation": pre.orientation, "spacing": None if pre.spacing is None else list(pre.spacing),
                       "training_shape": list(cfg.data.shape), "patch_size": list(cfg.data.patch_size) if cfg.data.patch_size else None,
                       "source": str(cfg.data.source), **pre.intensity_settings()},
        "checkpoint": str(checkpoint), "checkpoint_sha256": file_sha256(checkpoint),
        "lightning_distill_version": __version__,
    }


def export(checkpoint: str | Path, output: str | Path, fmt: str | None = None, overwrite: bool = False) -> Path:
    """Write the checkpoint's network to ``output`` as ONNX (``.onnx``) or TorchScript (``.pt``/``.ts``).

    Args:
        checkpoint: a ``.ckpt`` of ``lightning-distill fit``.
        output: the model file (written whole or not at all).
        fmt: ``onnx`` or ``torchscript`` (default: from ``output``'s ending).
        overwrite: replace an existing ``output``.

    Raises:
        ValueError: an unknown format or ending; ONNX export without the ``onnx`` package (the install command named).
        FileExistsError: ``output`` exists without ``overwrite``.
    """
    out = Path(output)
    fmt = fmt or FORMATS.get(out.suffix)
    if fmt not in ("onnx", "torchscript"):
        raise ValueError(f"{out}: export to .onnx (ONNX) or .pt/.ts (TorchScript); got {out.suffix or 'no ending'}")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    ckpt, cfg = load_checkpoint(checkpoint)
    net = load_network(ckpt, cfg).eval().cpu()
    meta = export_metadata(checkpoint, ckpt, cfg)
    shape = list(cfg.data.patch_size or cfg.data.shape)
    example = torch.zeros(1, meta["in_channels"], *shape)
    axes = {0: "batch", **{2 + i: n for i, n in enumerate("xyz"[: len(shape)])}}
    if fmt == "onnx":
        try:
            import onnx  # deferred: only ONNX export needs it (the `export` extra)
        except ImportError:
            raise ValueError("ONNX export needs the onnx package: pip install 'lightning_distill[export]' "
                             "(or export TorchScript: model.pt)") from None

        def write(tmp: str) -> None:
            with torch.no_grad():
                torch.onnx.export(net, (example,), tmp, input_names=["image"], output_names=["logits"], opset_version=OPSET,
                                  dynamic_axes={"image": axes, "logits": axes}, dynamo=False)
            model = onnx.load(tmp)
            onnx.helper.set_model_props(model, {"lightning_distill": json.dumps(meta)})
            onnx.checker.check_model(model)
            onnx.save(model, tmp)
    else:
        def write(tmp: str) -> None:
            with torch.no_grad(), warnings.catch_warnings():
                # torch marks TorchScript deprecated in favour of torch.export; the format was asked for by name
                warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\..*` is deprecated")
                traced = torch.jit.trace(net, example, check_trace=False)
                torch.jit.save(traced, tmp, _extra_files={"lightning_distill.json": json.dumps(meta)})
    atomic_write(out, write)
    return out
