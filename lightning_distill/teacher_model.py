"""A trained segmentation model from any of four formats, its class map, preprocessing and inference.

Shared by ``lightning-distill bank build`` (:mod:`lightning_distill.bank.build`: a prototype bank) and
``lightning-distill teach`` (:mod:`lightning_distill.teach`: teacher-labelled 2D slices), so that both
read a model, map its output channels and run it the same way:

* **Models** (``model.format``): ``checkpoint`` (a ``lightning-distill fit`` checkpoint: its network,
  class names, preprocessing and patch size), ``monai`` (any class of ``monai.networks.nets`` by
  ``model.name`` with its constructor arguments in ``model.kwargs`` and a ``state_dict`` file),
  ``bundle`` (a MONAI bundle directory: ``network_def`` of ``configs/inference.{json,yaml}`` and the
  weights ``models/model.pt``, or ``models/model.ts``) and ``torchscript`` (a ``torch.jit`` file).
  Nothing is downloaded. :class:`LoadedModel` records the format, the file and its SHA-256.
* **Classes** (:class:`ClassMap`): the model's output channels mapped to the run's classes.
* **Inference** (:func:`model_logits`): MONAI ``sliding_window_inference`` when the input is larger
  than the ROI, else one forward; eval mode, ``no_grad``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from lightning_distill.checkpoints import load_checkpoint, load_network
from lightning_distill.data.build import make_preprocess
from lightning_distill.data.nifti import IGNORE_INDEX, Case, discover
from lightning_distill.data.preprocess import Preprocess
from lightning_distill.io import file_sha256, listed

# ---------------------------------------------------------------------------------------- models
@dataclass
class LoadedModel:
    """A network ready for inference, with what is known about it."""

    net: nn.Module
    labels: List[str]  # names of its output channels
    source: Dict[str, Any]  # format, path, sha256 (and name/kwargs): recorded in the bank
    preprocess: Optional[Preprocess] = None  # a checkpoint's own
    roi_size: Optional[List[int]] = None  # a checkpoint's patch size
    in_channels: Optional[int] = None
    spatial_dims: int = 3  # a checkpoint's (the other formats: 3D)
    intensity: Optional[Dict[str, Any]] = None  # a checkpoint's intensity fingerprint (lightning_distill.fingerprint)


def _need_file(path: Optional[str], what: str) -> Path:
    if not path:
        raise ValueError(f"model.path is not set: give the {what}")
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"model.path {str(p)!r} does not exist (expected the {what})")
    return p


def _labels(spec: DictConfig, out_channels: Optional[int]) -> List[str]:
    if spec.labels:
        return [str(n) for n in spec.labels]
    if out_channels is None:
        raise ValueError("model.labels is not set and the number of the model's output channels is unknown: "
                         "list the names of its output channels in order (model.labels=[background,liver,...])")
    return [str(i) for i in range(out_channels)]


def _state_dict(path: Path) -> Dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling error means a bad file
        raise ValueError(f"{path}: could not be read as a state_dict ({type(e).__name__}: {e})") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: is not a state_dict (a mapping of parameter names to tensors)")
    return obj


def _load_into(net: nn.Module, state: Dict[str, torch.Tensor], path: Path) -> nn.Module:
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit the network ({str(e).splitlines()[0]} ...): "
                         "check model.name and model.kwargs") from None
    return net


def load_model(spec: DictConfig, dims: Sequence[int] = (3,)) -> LoadedModel:
    """The network of ``spec`` (a :class:`~lightning_distill.config.BankModelSpec`), in eval mode.

    ``dims``: the spatial dimensions accepted of a checkpoint's model (``bank build``: 3D only; ``teach``
    also runs a 2D model, the control of the third dimension). :attr:`LoadedModel.spatial_dims` says which.

    Raises:
        ValueError: unknown MONAI network name (the message lists valid ones), missing or unreadable
            weights, weights that do not fit the network; the message names the file.
        FileNotFoundError: ``model.path`` does not exist.
    """
    fmt = spec.format
    if fmt == "checkpoint":

        path = _need_file(spec.path, "checkpoint of `lightning-distill fit`")
        ckpt, cfg = load_checkpoint(path)
        if len(cfg.data.shape) not in dims:
            raise ValueError(f"{path}: a {len(cfg.data.shape)}D model; {' or '.join(f'{d}D' for d in dims)} expected here")
        pre = make_preprocess(cfg)
        # its input grid (2D: one plane, Z = 1), or sliding patches
        pre.shape = (list(cfg.data.shape) + [1] * (3 - len(cfg.data.shape))) if cfg.data.patch_size is None else None
        roi = list(cfg.data.patch_size) if cfg.data.patch_size else None
        names = [str(n) for n in ckpt["hyper_parameters"]["class_names"]]
        return LoadedModel(load_network(ckpt, cfg), names, {"format": fmt, "path": str(path), "sha256": file_sha256(path)},
                           pre, roi, in_channels=1, spatial_dims=len(cfg.data.shape),
                           intensity=(ckpt.get("lightning_distill") or {}).get("intensity"))
    if fmt == "monai":
        # deferred: MONAI takes seconds to import; only a 3D model's inference needs it
        import monai.networks.nets as nets

        path = _need_file(spec.path, "state_dict file of the MONAI network")
        valid = sorted(n for n in dir(nets) if isinstance(getattr(nets, n), type) and issubclass(getattr(nets, n), nn.Module))
        if not spec.name or spec.name not in valid:
            raise ValueError(f"model.name={spec.name!r} is not a network of monai.networks.nets; valid: {valid}")
        kwargs = OmegaConf.to_container(spec.kwargs)
        try:
            net = getattr(nets, spec.name)(**kwargs)
        except TypeError as e:
            raise ValueError(f"model.kwargs do not fit monai.networks.nets.{spec.name}: {e}") from None
        net = _load_into(net, _state_dict(path), path)
        out = kwargs.get("out_channels")
        return LoadedModel(net.eval(), _labels(spec, out), {"format": fmt, "path": str(path), "sha256": file_sha256(path),
                                                           "name": spec.name, "kwargs": kwargs},
                           in_channels=kwargs.get("in_channels"))
    if fmt == "bundle":
        return _load_bundle(spec)
    if fmt == "torchscript":
        path = _need_file(spec.path, "TorchScript file")
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: could not be read as TorchScript ({type(e).__name__}: {e})") from None
        return LoadedModel(net.eval(), _labels(spec, None), {"format": fmt, "path": str(path), "sha256": file_sha256(path)})
    raise ValueError(f"unknown model.format {fmt!r}; valid: checkpoint, monai, bundle, torchscript")


def _load_bundle(spec: DictConfig) -> LoadedModel:
    """A MONAI bundle directory: ``configs/inference.{json,yaml,yml}`` (its ``network_def``) and
    ``models/model.pt`` (a state_dict), or ``models/model.ts`` (TorchScript)."""
    # deferred: MONAI takes seconds to import; only a 3D model's inference needs it
    from monai.bundle import ConfigParser

    if not spec.path or not Path(spec.path).is_dir():
        raise FileNotFoundError(f"model.path {spec.path!r} is not a MONAI bundle directory")
    root = Path(spec.path)
    weights, ts = root / "models" / "model.pt", root / "models" / "model.ts"
    configs = [root / "configs" / f"inference.{e}" for e in ("json", "yaml", "yml")]
    config = next((c for c in configs if c.is_file()), None)
    if config is not None and weights.is_file():
        parser = ConfigParser()
        parser.read_config(str(config))
        if "network_def" not in parser.config:
            raise ValueError(f"{config}: has no network_def")
        try:
            net = parser.get_parsed_content("network_def")
        except Exception as e:  # noqa: BLE001 - MONAI raises several kinds for a bad definition
            raise ValueError(f"{config}: network_def could not be built ({type(e).__name__}: {e})") from None
        net = _load_into(net, _state_dict(weights), weights)
        out = getattr(net, "out_channels", None)
        return LoadedModel(net.eval(), _labels(spec, out), {"format": "bundle", "path": str(root), "weights": str(weights),
                                                           "sha256": file_sha256(weights), "config": str(config)})
    if ts.is_file():
        net = torch.jit.load(str(ts), map_location="cpu")
        return LoadedModel(net.eval(), _labels(spec, None), {"format": "bundle", "path": str(root), "weights": str(ts),
                                                           "sha256": file_sha256(ts)})
    raise FileNotFoundError(f"{root}: not a MONAI bundle with weights: expected configs/inference.json (or .yaml) with "
                            "models/model.pt, or models/model.ts")


# ---------------------------------------------------------------------------------------- classes
@dataclass
class ClassMap:
    """Model output channels -> bank classes (see the module docstring).

    Attributes:
        matrix: ``(M, K)`` 0/1: channel m adds to bank class k; a row of zeros is an ignored channel.
        how: per model label, where it goes (``liver``, ``background (unmapped)``, ``ignore``).
    """

    model_labels: List[str]
    classes: List[str]
    class_map: Dict[Any, str] = field(default_factory=dict)
    unmapped: str = "error"

    def __post_init__(self):
        m, names = list(self.model_labels), list(self.classes)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"classes must be distinct names, background first; got {names}")
        if len(set(m)) != len(m):
            raise ValueError(f"model.labels must be distinct; got {m}")
        target: Dict[int, str] = {i: n for i, n in enumerate(m) if n in names}
        for key, dst in dict(self.class_map).items():
            i = self._channel(key)
            if dst != "ignore" and dst not in names:
                raise ValueError(f"class_map sends model label {key!r} to {dst!r}, which is not a bank class "
                                 f"(classes: {names}, or 'ignore')")
            target[i] = dst
        left = [m[i] for i in range(len(m)) if i not in target]
        if left and self.unmapped == "error":
            raise ValueError(f"model labels {left} map to no bank class: add them to class_map (or set "
                             f"unmapped=background or unmapped=ignore); bank classes: {names}")
        for i in range(len(m)):
            target.setdefault(i, names[0] if self.unmapped == "background" else "ignore")
        missing = [n for n in names if n not in target.values()]
        if missing:
            raise ValueError(f"bank classes {missing} receive no model label: map one to each in class_map "
                             f"(model labels: {m})")
        self.matrix = torch.zeros(len(m), len(names))
        for i, dst in target.items():
            if dst != "ignore":
                self.matrix[i, names.index(dst)] = 1.0
        self.how = {m[i]: dst + (" (unmapped)" if m[i] in left else "") for i, dst in sorted(target.items())}

    def _channel(self, key) -> int:
        m = list(self.model_labels)
        if isinstance(key, str) and key in m:
            return m.index(key)
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            i = int(key)
            if 0 <= i < len(m):
                return i
            raise ValueError(f"class_map names model channel {i}, but the model has {len(m)} output channels")
        raise ValueError(f"class_map names model label {key!r}, which the model does not have (its labels: {m})")

    def probabilities(self, logits: torch.Tensor, tau: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(mapped, renormalised)`` ``(B, K, *spatial)`` probabilities of ``(B, M, *spatial)`` logits at ``tau``."""
        if logits.shape[1] != self.matrix.shape[0]:
            raise ValueError(f"the model predicts {logits.shape[1]} channels, model.labels names {self.matrix.shape[0]}: "
                             f"{list(self.model_labels)}")
        p = torch.softmax(logits.float() / tau, dim=1)
        mapped = torch.einsum("bm...,mk->bk...", p, self.matrix.to(p))
        return mapped, mapped / mapped.sum(dim=1, keepdim=True).clamp_min(1e-12)


def pseudo_labels(mapped: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(B, 1, *spatial)`` bank classes of the highest mapped probability, ``IGNORE_INDEX`` where it is
    below ``threshold`` (``mapped``: before renormalising, so ignored labels' mass counts against it)."""
    conf, cls = mapped.max(dim=1, keepdim=True)
    return torch.where(conf >= threshold, cls, torch.full_like(cls, IGNORE_INDEX))


# ---------------------------------------------------------------------------------------- running it
def model_preprocess(cfg: DictConfig, model: LoadedModel) -> Preprocess:
    """The model's preprocessing: a checkpoint's own (unless ``data.preprocess.from_checkpoint=false``), else
    ``data.preprocess``'s settings."""
    p = cfg.data.preprocess
    if model.preprocess is not None and p.from_checkpoint:
        return model.preprocess
    return Preprocess(orientation=p.orientation, spacing=list(p.spacing) if p.spacing else None, modality=p.modality,
                      ct_window=tuple(p.ct_window), mr_norm=p.mr_norm, percentiles=tuple(p.percentiles),
                      crop_foreground=p.crop_foreground, crop_threshold=p.crop_threshold, crop_margin=p.crop_margin)


def list_cases(cfg: DictConfig) -> Tuple[List[Case], Dict[int, str]]:
    """The volumes of ``cfg.data`` (sorted by case id; ``data.cases`` keeps some) and the dataset's label names.
    ``data.labels=ignore`` drops every label file."""
    d = cfg.data
    if not d.root:
        raise ValueError("data.root is not set: give the folder of volumes")
    index = discover(d.root, d.layout, d.image_pattern, d.label_pattern if d.labels != "ignore" else None,
                     require_labels=d.labels == "use")
    cases = sorted(index.cases, key=lambda c: c.case_id)
    if d.cases is not None:
        known = {c.case_id for c in cases}
        unknown = [c for c in d.cases if c not in known]
        if unknown:
            raise ValueError(f"data.cases lists cases that are not in {d.root}: {listed(unknown)}")
        keep = set(d.cases)
        cases = [c for c in cases if c.case_id in keep]
    if not cases:
        raise ValueError(f"{d.root}: no volumes found")
    if d.labels == "ignore":
        cases = [Case(c.case_id, c.images) for c in cases]
    return cases, index.labels


def inference_device(name: str, rank_local: int) -> torch.device:
    """``inference.device`` (``auto``: this process's CUDA device when there is one, else the CPU)."""
    if name == "auto":
        return torch.device(f"cuda:{rank_local}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(name)


def model_logits(net: nn.Module, x: torch.Tensor, roi: Optional[Sequence[int]], inference: DictConfig,
                 where: str = "") -> torch.Tensor:
    """float32 logits ``(B, M, *spatial)`` of ``x`` ``(B, C, *spatial)``: MONAI ``sliding_window_inference``
    (``inference.sw_batch_size``, ``overlap``, ``mode``) when ``x`` is larger than ``roi``, else one forward;
    under ``no_grad``. A tuple output (deep supervision) gives its first element.

    Raises:
        ValueError: the output's spatial shape is not the input's (not a segmentation network); ``where``
            names the input.
    """
    # deferred: MONAI takes seconds to import; only a 3D model's inference needs it
    from monai.inferers import sliding_window_inference

    with torch.no_grad():
        if roi is not None and any(s > r for s, r in zip(x.shape[2:], roi)):
            logits = sliding_window_inference(x, roi_size=list(roi), sw_batch_size=int(inference.sw_batch_size),
                                              predictor=net, overlap=float(inference.overlap), mode=inference.mode)
        else:
            logits = net(x)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    logits = torch.as_tensor(logits).float()
    if logits.shape[2:] != x.shape[2:]:
        raise ValueError(f"the model's output {tuple(logits.shape[2:])} does not match its input {tuple(x.shape[2:])}"
                         f"{' (' + where + ')' if where else ''}; is it a segmentation network?")
    return logits
