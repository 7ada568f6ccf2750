"""Inference from a checkpoint: ``predict`` (NIfTI in, NIfTI masks out) and ``evaluate``.

Only the network weights are taken from a checkpoint (a student's teacher bank is not needed to
predict). A 2D student predicts 2D files directly and 3D volumes slice by slice; a 3D teacher
predicts volumes with sliding-window inference. Inputs are preprocessed exactly as in training; the
class probabilities are mapped back through the inverse of the spatial steps, so every mask has the
input's shape, orientation, affine and header.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np
import torch
from omegaconf import DictConfig

from lightning_distill.config import load_config_dict
from lightning_distill.data.nifti import NIFTI_ENDINGS, DataError, load_nifti, reorient, slice_affine
from lightning_distill.io import save_nifti
from lightning_distill.train import build_net, make_preprocess


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> Tuple[dict, DictConfig]:
    """The raw checkpoint dict and its run config (with ``overrides`` applied)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # our own Lightning checkpoints
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(p)!r} could not be read ({type(e).__name__}: {e}); it is truncated or not a checkpoint") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "config" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {str(p)!r} has no lightning_distill config; was it written by `lightning-distill fit`?")
    return ckpt, load_config_dict(hp["config"], overrides, where=str(p))


def load_network(ckpt: dict, cfg: DictConfig) -> torch.nn.Module:
    names = list(ckpt["hyper_parameters"]["class_names"])
    net = build_net(cfg, len(names))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()


def list_inputs(path: str | Path) -> List[Path]:
    p = Path(path)
    if p.is_file():
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.endswith(NIFTI_ENDINGS) and not f.name.startswith("."))
        if not files:
            raise DataError(f"{p}: no .nii or .nii.gz file in this folder")
        return files
    raise FileNotFoundError(f"input {str(p)!r} does not exist")


def output_name(path: Path) -> str:
    """``case_0000.nii.gz`` -> ``case.nii.gz`` (nnU-Net image naming to label naming)."""
    for e in NIFTI_ENDINGS:
        if path.name.endswith(e):
            stem = path.name[: -len(e)]
            return (stem[:-5] if stem.endswith("_0000") else stem) + e
    return path.name


@torch.no_grad()
def predict_array(net: torch.nn.Module, cfg: DictConfig, data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Label map (input shape) for one image array ``(X, Y)`` or ``(X, Y, Z)``.

    A 2D student predicts a 3D volume slice by slice: the volume is reoriented, and every axial slice
    is preprocessed on its own, exactly as a single-slice file would be, then the stacked prediction
    is put back in the input's axis order.
    """
    from monai.inferers import sliding_window_inference

    two_d_file = data.ndim == 2
    vol = (data[..., None] if two_d_file else data)[None].astype(np.float32)
    if vol.ndim != 4:
        raise DataError(f"expected a 2D or 3D image, got shape {data.shape}")
    pre = make_preprocess(cfg)

    def one(image: np.ndarray, aff: np.ndarray, predictor) -> np.ndarray:
        img, _, chain = pre(image, aff)
        probs = predictor(img.as_tensor()[None])
        return pre.invert(probs, img, chain).argmax(0).numpy().astype(np.uint8)

    if len(cfg.data.shape) == 2:  # student
        def net2d(x):  # (1, C, X, Y, 1) -> (K, X, Y, 1)
            return torch.softmax(net(x[..., 0]).float(), 1)[0][..., None]

        if vol.shape[-1] == 1:
            pred = one(vol, affine, net2d)
        else:
            oriented, o_aff, undo = reorient(vol, affine, pre.orientation)
            pred = np.concatenate([one(oriented[..., z:z + 1], slice_affine(o_aff, z), net2d)
                                   for z in range(oriented.shape[-1])], axis=-1)
            pred = undo(pred)
    else:
        roi = list(cfg.data.patch_size or cfg.data.shape)

        def net3d(x):
            logits = sliding_window_inference(x, roi_size=roi, sw_batch_size=2, predictor=net, overlap=0.25)
            return torch.softmax(logits.float(), 1)[0]

        pred = one(vol, affine, net3d)
    return pred[..., 0] if two_d_file else pred


def _save_like(pred: np.ndarray, header, affine: np.ndarray, path: Path) -> None:
    import nibabel as nib

    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(pred, affine, hdr)
    out.header.set_slope_inter(1, 0)
    save_nifti(out, path)


def predict(checkpoint: str | Path, inputs: str | Path, output: str | Path, overrides: Sequence[str] = ()) -> List[Path]:
    """Predict masks for a NIfTI file or a folder of them; returns the written paths.

    ``output`` is a file path when ``inputs`` is one file (a folder if it ends with ``/`` or is an
    existing folder), else a folder; masks keep the input's file name (``_0000`` dropped).
    """
    ckpt, cfg = load_checkpoint(checkpoint, overrides)
    if cfg.input_transform != "none":
        raise ValueError(f"checkpoint {checkpoint} was trained on {cfg.input_transform} images, which are built from "
                         "labels: it cannot predict unlabelled images (predict with the student)")
    net = load_network(ckpt, cfg)
    files = list_inputs(inputs)
    out = Path(output)
    single_file_out = Path(inputs).is_file() and not (out.is_dir() or str(output).endswith(os.sep))
    written = []
    for f in files:
        data, affine, header = load_nifti(f, "image")
        if not np.all(np.isfinite(data)):
            raise DataError(f"{f}: image contains NaN or Inf voxels")
        data = np.squeeze(data) if data.ndim > 3 else data
        try:
            pred = predict_array(net, cfg, data.astype(np.float32), affine)
        except DataError as e:
            raise DataError(f"{f}: {e}") from None
        dest = out if single_file_out else out / output_name(f)
        _save_like(pred, header, affine, dest)
        written.append(dest)
    return written
