"""Inference from a checkpoint: ``predict`` (NIfTI in, NIfTI masks out) and ``evaluate``.

Only the network weights are taken from a checkpoint (a student's teacher bank is not needed to
predict). A 2D student predicts 2D files directly and 3D volumes slice by slice; a 3D teacher
predicts volumes with sliding-window inference. Inputs are preprocessed exactly as in training; the
class probabilities are mapped back through the inverse of the spatial steps, so every mask has the
input's shape, orientation, affine and header.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import nibabel as nib
import numpy as np
import torch
from omegaconf import DictConfig

from lightning_distill import __version__
from lightning_distill.checkpoints import load_checkpoint, load_network
from lightning_distill.data.build import make_preprocess
from lightning_distill.data.dicom import Series, find_series, highdicom, is_dicom, read_series, write_seg
from lightning_distill.data.nifti import DataError, NIFTI_ENDINGS, check_nifti_file, load_nifti, reorient, slice_affine
from lightning_distill.devices import autocast_for, resolve_device
from lightning_distill.fingerprint import IntensityCheck, ct_window_of
from lightning_distill.io import save_nifti, staged_dir


Input = Union[Path, Series]  # a NIfTI file or a DICOM series


def list_inputs(path: str | Path) -> List[Input]:
    """The inputs of ``predict``: a NIfTI file, the NIfTI files of a folder, or, when there are none, the DICOM image
    series of a DICOM file or folder (:func:`lightning_distill.data.dicom.find_series`; one output per series)."""
    p = Path(path)
    if p.is_file():
        return [p] if p.name.endswith(NIFTI_ENDINGS) or not is_dicom(p) else list(find_series(p))
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.name.endswith(NIFTI_ENDINGS) and not f.name.startswith("."))
        if files:
            return files
        try:
            series = find_series(p)
        except DataError as e:
            raise DataError(f"{p}: no .nii or .nii.gz file in this folder, and no DICOM image series ({e})") from None
        skipped = series[0].skipped
        if skipped:
            print(f"{p}: left out " + "; ".join(f"{len(fs)} file(s): {why}" for why, fs in skipped.items()), flush=True)
        return list(series)
    raise FileNotFoundError(f"input {str(p)!r} does not exist")


def output_name(path: Input) -> str:
    """``case_0000.nii.gz`` -> ``case.nii.gz`` (nnU-Net image naming to label naming); a DICOM series:
    ``<SeriesInstanceUID>.nii.gz``."""
    if isinstance(path, Series):
        return f"{path.name}.nii.gz"
    for e in NIFTI_ENDINGS:
        if path.name.endswith(e):
            stem = path.name[: -len(e)]
            return (stem[:-5] if stem.endswith("_0000") else stem) + e
    return path.name


def output_names(files: Sequence[Input], out_dir: Path) -> Dict[Input, str]:
    """The mask name of every input (:func:`output_name`), refusing two inputs with the same mask name
    (``a.nii.gz`` and ``a_0000.nii.gz``) and a mask that would replace one of the inputs."""
    names: Dict[Path, str] = {}
    by_name: Dict[str, Path] = {}
    resolved = {f.resolve() for f in files if isinstance(f, Path)}
    for f in files:
        name = output_name(f)
        if name in by_name:
            raise DataError(f"{f}: its mask would be named {name}, like the mask of {by_name[name]} (masks drop the "
                            "nnU-Net channel suffix _0000); rename one of them or predict them into separate folders")
        if (out_dir / name).resolve() in resolved:
            raise DataError(f"{f}: its mask {out_dir / name} would replace an input file; choose another output folder")
        names[f], by_name[name] = name, f
    return names


def _squeezed_shape(shape: Sequence[int]) -> Tuple[int, ...]:
    """``shape`` without trailing singleton dimensions beyond the third (``(X, Y, Z, 1)`` -> ``(X, Y, Z)``)."""
    shape = tuple(shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape


def check_input(path: Input) -> None:
    """Raise :class:`DataError` naming ``path`` unless it is a complete 2D or 3D NIfTI image (the
    header reads, the data are all there; no voxel is decoded), or a DICOM series whose headers make one
    axial stack without gaps (:func:`lightning_distill.data.dicom.read_series`)."""
    if isinstance(path, Series):
        read_series(path, pixels=False)
        return
    shape = _squeezed_shape(check_nifti_file(path, "image")[0])
    if len(shape) not in (2, 3):
        raise DataError(f"{path}: expected a 2D or 3D image, got shape {shape}")


@torch.no_grad()
def predict_array(net: torch.nn.Module, cfg: DictConfig, data: np.ndarray, affine: np.ndarray,
                  observe: Optional[Callable[[np.ndarray], None]] = None, device: Optional[torch.device] = None,
                  batch_size: int = 16, sw_batch_size: Optional[int] = None) -> np.ndarray:
    """Label map (input shape) for one image array ``(X, Y)`` or ``(X, Y, Z)``.

    A 2D student predicts a 3D volume slice by slice: the volume is reoriented, and every axial slice
    is preprocessed on its own, exactly as a single-slice file would be; the slices go through the
    network ``batch_size`` at a time, and the stacked prediction is put back in the input's axis order.
    A 3D model predicts with MONAI's sliding window (``sw_batch_size`` windows per forward).

    Args:
        net: the network, in eval mode, on ``device``.
        observe: called with every preprocessed network input ``(C, X, Y, Z)`` (one per slice for a
            2D model predicting a volume), e.g. :meth:`lightning_distill.fingerprint.IntensityCheck.add`.
        device: where the network runs (default: the network's device); on CUDA under autocast
            (:func:`lightning_distill.devices.autocast_for`). Preprocessing and the inverse stay on the CPU.
        batch_size: slices per forward of a 2D model.
        sw_batch_size: windows per forward of a 3D model (default: the run config's ``sw_batch_size``).
    """
    # deferred: MONAI takes seconds to import; only sliding-window prediction needs it
    from monai.inferers import sliding_window_inference

    if batch_size < 1 or (sw_batch_size is not None and sw_batch_size < 1):
        raise ValueError(f"batch_size and sw_batch_size must be >= 1, got {batch_size} and {sw_batch_size}")
    device = device or next(net.parameters()).device
    autocast = autocast_for(device)
    two_d_file = data.ndim == 2
    vol = (data[..., None] if two_d_file else data)[None].astype(np.float32)
    if vol.ndim != 4:
        raise DataError(f"expected a 2D or 3D image, got shape {data.shape}")
    pre = make_preprocess(cfg)

    def prepare(image: np.ndarray, aff: np.ndarray):
        img, _, chain = pre(image, aff)
        if observe is not None:
            observe(img.as_tensor().numpy())
        return img, chain

    def finish(probs, img, chain) -> np.ndarray:
        return pre.invert(probs, img, chain).argmax(0).numpy().astype(np.uint8)

    if len(cfg.data.shape) == 2:  # student
        if vol.shape[-1] == 1:
            inputs = [prepare(vol, affine)]
        else:
            oriented, o_aff, undo = reorient(vol, affine, pre.orientation)
            inputs = [prepare(oriented[..., z:z + 1], slice_affine(o_aff, z)) for z in range(oriented.shape[-1])]
        probs: List[torch.Tensor] = []
        i = 0
        while i < len(inputs):  # batches of consecutive slices of one shape (C, X, Y, 1)
            shape = inputs[i][0].shape
            j = i + 1
            while j < len(inputs) and j - i < batch_size and inputs[j][0].shape == shape:
                j += 1
            x = torch.stack([img.as_tensor()[..., 0] for img, _ in inputs[i:j]]).to(device)
            with autocast:
                logits = net(x)
            probs.extend(torch.softmax(logits.float(), 1).cpu()[..., None].unbind(0))  # (K, X, Y, 1) each
            i = j
        preds = [finish(p, img, chain) for p, (img, chain) in zip(probs, inputs)]
        pred = preds[0] if vol.shape[-1] == 1 else undo(np.concatenate(preds, axis=-1))
    else:
        roi = list(cfg.data.patch_size or cfg.data.shape)
        img, chain = prepare(vol, affine)
        with autocast:
            logits = sliding_window_inference(img.as_tensor()[None].to(device), roi_size=roi, overlap=0.25,
                                              sw_batch_size=sw_batch_size or cfg.sw_batch_size, predictor=net)
        pred = finish(torch.softmax(logits.float(), 1)[0].cpu(), img, chain)
    return pred[..., 0] if two_d_file else pred


def _save_like(pred: np.ndarray, header, affine: np.ndarray, path: Path) -> None:
    hdr = header.copy()
    hdr.set_data_dtype(np.uint8)
    out = nib.Nifti1Image(pred, affine, hdr)
    out.header.set_slope_inter(1, 0)
    save_nifti(out, path)


def _predict_file(net: torch.nn.Module, cfg: DictConfig, path: Input, check: IntensityCheck, **kwargs):
    """``(mask, header, affine)`` of one input file or DICOM series; warns (``check``) if its intensities are unlike
    the training data's. ``kwargs``: :func:`predict_array`'s ``device``, ``batch_size``, ``sw_batch_size``."""
    if isinstance(path, Series):
        data, affine = read_series(path)
        header = nib.Nifti1Header()
        path = f"DICOM series {path.uid} ({len(path.files)} files)"
    else:
        data, affine, header = load_nifti(path, "image")
    if not np.all(np.isfinite(data)):
        raise DataError(f"{path}: image contains {int((~np.isfinite(data)).sum())} NaN or Inf voxels")
    data = data.reshape(_squeezed_shape(data.shape)).astype(np.float32)
    try:
        pred = predict_array(net, cfg, data, affine, observe=check.add, **kwargs)
    except DataError as e:
        raise DataError(f"{path}: {e}") from None
    check.finish(str(path), data)
    return pred, header, affine


def predict(checkpoint: str | Path, inputs: str | Path, output: str | Path, overrides: Sequence[str] = (),
            device: str = "auto", batch_size: int = 16, sw_batch_size: Optional[int] = None,
            dicom_seg: bool = False) -> List[Path]:
    """Predict masks for a NIfTI file or a folder of them; returns the written paths.

    Every input is checked before any inference (header readable, 2D or 3D after dropping trailing
    singleton dimensions, data complete: a ``.nii.gz`` stream is read to its end, a ``.nii`` file's
    size is compared with its header); a bad one raises :class:`DataError` naming it before any mask
    is written. A folder's masks are written into a temporary folder beside ``output`` and moved
    into it only when every input has been predicted, so a failure (e.g. NaN voxels found when the
    data are read) leaves ``output`` as it was; masks already there under other names are kept.
    Inputs whose intensities are unlike the training data's (the checkpoint's intensity
    fingerprint, see :mod:`lightning_distill.fingerprint`) get a warning naming the override to try.

    Args:
        checkpoint: a ``.ckpt`` written by ``fit``.
        inputs: a ``.nii``/``.nii.gz`` file or a folder of them.
        output: a file path when ``inputs`` is one file (a folder if it ends with ``/`` or is an
            existing folder), else a folder. Masks keep the input's file name with an nnU-Net channel
            suffix ``_0000`` dropped (``case_0000.nii.gz`` -> ``case.nii.gz``); two inputs with the
            same mask name (``a.nii.gz`` and ``a_0000.nii.gz``) are refused.
        overrides: ``key=value`` overrides of the checkpoint's config (e.g. preprocessing).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; on CUDA the network runs
            under autocast (bf16 or fp16, :func:`lightning_distill.devices.autocast_for`).
        batch_size: slices per forward of a 2D model predicting a volume.
        sw_batch_size: windows per forward of a 3D model's sliding window (default: the config's).
        dicom_seg: DICOM inputs only: also write each series' mask as a DICOM Segmentation referencing it
            (``<uid>.seg.dcm`` beside ``<uid>.nii.gz``; :func:`lightning_distill.data.dicom.write_seg`).

    Returns:
        The mask paths, in input order (uint8 label maps with the input's shape, affine and header).
    """
    dev = resolve_device(device)  # an impossible device is refused before anything is read
    ckpt, cfg = load_checkpoint(checkpoint, overrides)
    if cfg.input_transform != "none":
        raise ValueError(f"checkpoint {checkpoint} was trained on {cfg.input_transform} images, which are built from "
                         "labels: it cannot predict unlabelled images (predict with the student)")
    files = list_inputs(inputs)
    out = Path(output)
    single_file_out = Path(inputs).is_file() and len(files) == 1 and not (out.is_dir() or str(output).endswith(os.sep))
    names = {} if single_file_out else output_names(files, out)
    for f in files:
        check_input(f)
    net = load_network(ckpt, cfg).to(dev)
    check = IntensityCheck((ckpt.get("lightning_distill") or {}).get("intensity"), ct_window_of(cfg))
    opts = {"device": dev, "batch_size": batch_size, "sw_batch_size": sw_batch_size}
    if dicom_seg and not all(isinstance(f, Series) for f in files):
        raise ValueError(f"{inputs}: --dicom-seg writes a DICOM Segmentation of DICOM inputs; these are NIfTI files")
    if dicom_seg:
        highdicom()  # installed, or refused before any inference
    classes = [str(n) for n in ckpt["hyper_parameters"]["class_names"]]

    def one(f: Input, mask_path: Path) -> None:
        mask, header, affine = _predict_file(net, cfg, f, check, **opts)
        _save_like(mask, header, affine, mask_path)
        if dicom_seg:
            write_seg(f, mask, classes, seg_path(mask_path), f"lightning_distill {__version__}")

    if single_file_out and not dicom_seg:
        one(files[0], out)  # one file, written atomically
        return [out]
    if single_file_out:  # the mask and its DICOM-SEG: both or neither
        stage = out.parent / f".{out.name}.files"
        with staged_dir(stage, overwrite=True) as tmp:
            one(files[0], tmp / out.name)
        for p in sorted(stage.iterdir()):
            os.replace(p, out.parent / p.name)
        shutil.rmtree(stage, ignore_errors=True)
        return [out]
    with staged_dir(out, merge=True) as tmp:
        for f in files:
            one(f, tmp / names[f])
    return [out / names[f] for f in files]


def seg_path(mask_path: Path) -> Path:
    """The DICOM Segmentation beside a mask: ``<uid>.nii.gz`` -> ``<uid>.seg.dcm``."""
    name = mask_path.name
    for e in NIFTI_ENDINGS:
        if name.endswith(e):
            name = name[: -len(e)]
    return mask_path.with_name(f"{name}.seg.dcm")
