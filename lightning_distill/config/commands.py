"""The configs of ``lightning-distill bank build`` (:class:`BankBuildConfig`) and ``lightning-distill
teach`` (:class:`TeachConfig`): a trained model, a folder of volumes (or the phantom), inference."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig

from lightning_distill.config.load import MODEL_FORMATS, UNMAPPED, choice, load_schema, same_as
from lightning_distill.config.run import NiftiConfig, PhantomConfig


@dataclass
class BankModelSpec:
    """The trained 3D model a bank is computed from (see :mod:`lightning_distill.bank.build`)."""

    # checkpoint (of `lightning-distill fit`) | monai (state_dict file) | bundle (MONAI bundle dir) | torchscript
    format: str = choice("checkpoint", MODEL_FORMATS)
    path: Optional[str] = None  # the .ckpt, the state_dict file, the bundle directory, or the TorchScript file
    name: Optional[str] = None  # monai: a class of monai.networks.nets (SegResNet, SwinUNETR, UNet, DynUNet, ...)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # monai: the constructor's arguments (spatial_dims, in_channels, out_channels, ...)
    labels: Optional[List[str]] = None  # names of the model's output channels, in order (checkpoint: its class names)


@dataclass
class BankPreprocessConfig:
    """The model's own preprocessing (format checkpoint: taken from the checkpoint unless ``from_checkpoint=false``)."""

    from_checkpoint: bool = True
    # the same keys, defaults and choices as data.nifti's (NiftiConfig)
    orientation: Optional[str] = same_as(NiftiConfig, "orientation")
    spacing: Optional[List[float]] = same_as(NiftiConfig, "spacing")  # target mm; <= 0 keeps an axis; None: the file's grid
    modality: str = same_as(NiftiConfig, "modality")
    ct_window: List[float] = same_as(NiftiConfig, "ct_window")
    mr_norm: str = same_as(NiftiConfig, "mr_norm")
    percentiles: List[float] = same_as(NiftiConfig, "percentiles")
    crop_foreground: bool = same_as(NiftiConfig, "crop_foreground")
    crop_threshold: float = same_as(NiftiConfig, "crop_threshold")
    crop_margin: int = same_as(NiftiConfig, "crop_margin")


@dataclass
class BankDataSpec:
    root: Optional[str] = None  # a folder of volumes (nnU-Net, MSD or plain layout, as data.nifti.root)
    layout: str = same_as(NiftiConfig, "layout")
    image_pattern: str = same_as(NiftiConfig, "image_pattern")
    label_pattern: Optional[str] = same_as(NiftiConfig, "label_pattern")
    labels: str = choice("auto", ("auto", "use", "ignore"))  # auto: a case's label file when it has one, else pseudo-labels | use: every case needs one | ignore: pseudo-labels for every case
    label_map: Dict[Any, str] = same_as(NiftiConfig, "label_map")  # dataset label id or name -> bank class | ignore
    unmapped: str = choice("error", UNMAPPED)  # dataset label ids nothing maps
    cases: Optional[List[str]] = same_as(NiftiConfig, "cases")  # keep only these case ids
    cache_dir: Optional[str] = same_as(NiftiConfig, "cache_dir")  # persistent cache of preprocessed cases (data.nifti.cache_dir's format); None: none
    preprocess: BankPreprocessConfig = field(default_factory=BankPreprocessConfig)


@dataclass
class BankInferenceConfig:
    roi_size: Optional[List[int]] = None  # sliding-window ROI (None: the checkpoint's patch size, else the whole volume at once)
    overlap: float = 0.25
    sw_batch_size: int = 2
    mode: str = choice("gaussian", ("constant", "gaussian"))  # MONAI sliding_window_inference blending
    device: str = "auto"  # auto (cuda when available) | cpu | cuda | cuda:N


@dataclass
class BankOptions:
    tau: float = 1.0
    taus: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])
    axial_range: Optional[List[float]] = None  # [lo, hi] fractions of each volume's axial axis (see lightning_distill/bank/axial.py)


@dataclass
class BankBuildConfig:
    """``lightning-distill bank build``: a prototype bank from a trained 3D model over a folder of volumes."""

    model: BankModelSpec = field(default_factory=BankModelSpec)
    classes: Optional[List[str]] = None  # the bank's classes, background first (default: the model's labels)
    class_map: Dict[Any, str] = field(default_factory=dict)  # model label (name or channel index) -> bank class | ignore
    unmapped: str = choice("error", UNMAPPED)  # model labels nothing maps
    threshold: float = 0.9  # unlabelled volumes: keep voxels whose class probability is at least this
    # a volume whose intensities are unlike the model's training data (checkpoint format: its fingerprint, checked
    # before inference): warn (and use it) | error (stop, naming the file)
    on_shift: str = choice("warn", ("warn", "error"))
    data: BankDataSpec = field(default_factory=BankDataSpec)
    inference: BankInferenceConfig = field(default_factory=BankInferenceConfig)
    bank: BankOptions = field(default_factory=BankOptions)
    output: str = "runs/bank/prototypes.pt"
    processes: int = 1  # local worker processes (volumes sharded, sums all-reduced); under torchrun: its world
    save_every: int = 10  # volumes between writes of the resumable state (<output>.partial/)
    overwrite: bool = False


# ------------------------------------------------------------------------------ lightning-distill teach
@dataclass
class TeachLevels:
    """Which axial planes of each volume become slices. Levels are fractions of the volume's axial
    (last) axis in the student's orientation: 0 its first plane (inferior for RAS/LAS), 1 its last."""

    mode: str = choice("range", ("range", "match"))  # range: planes in [lo, hi] | match: the levels of the student's own single slices (see match)
    range: List[float] = field(default_factory=lambda: [0.0, 1.0])  # mode=range: [lo, hi], 0 <= lo <= hi <= 1
    # mode=match: a folder of single slices written by `lightning-distill slices` (its slice of each volume), or, when
    # null, the student's config: its phantom slice_z range (phantom students only)
    match: Optional[str] = None
    per_volume: int = 5  # planes per volume, drawn without replacement (every plane in range when fewer)
    seed: int = 0  # the draw of the planes (per volume: this seed and the volume's id)


@dataclass
class TeachDataSpec(BankDataSpec):
    """The volumes: a NIfTI folder (the keys of ``bank build``'s ``data``) or the phantom, rendered on the fly."""

    source: str = choice("nifti", ("nifti", "phantom"))
    attributes: Optional[str] = None  # nifti: a CSV with a `case` column and per-volume attributes (e.g. phase), recorded per slice
    num_subjects: int = 400  # phantom: volumes phantom<seed>_0000 ... (the teacher population of experiments/teacher.yaml)
    shape: List[int] = field(default_factory=lambda: [64, 64, 48])  # phantom: the volume grid (X, Y, Z)
    phantom: PhantomConfig = field(default_factory=lambda: PhantomConfig(seed=1, noise_hu=[10.0, 35.0]))


@dataclass
class TeachModelSpec(BankModelSpec):
    """``teach``'s model: any format of ``bank build``, or none (no model: ground-truth slices only, the union route)."""

    format: str = choice("checkpoint", (*MODEL_FORMATS, "none"))


@dataclass
class TeachConfig:
    """``lightning-distill teach``: 2D training slices of volumes, labelled by a trained model (see
    :mod:`lightning_distill.teach`)."""

    model: TeachModelSpec = field(default_factory=TeachModelSpec)
    student: Optional[str] = None  # the student's run config (YAML): its preprocessing, data.shape and classes
    classes: Optional[List[str]] = None  # default: the student's classes
    class_map: Dict[Any, str] = field(default_factory=dict)  # model label (name or channel index) -> class | ignore
    unmapped: str = choice("error", UNMAPPED)  # model labels nothing maps
    tau: float = 1.0  # temperature of the stored probabilities
    data: TeachDataSpec = field(default_factory=TeachDataSpec)
    inference: BankInferenceConfig = field(default_factory=BankInferenceConfig)
    levels: TeachLevels = field(default_factory=TeachLevels)
    output: str = "runs/teach"  # a folder (written whole at the end; <output>.partial holds a run in progress)
    processes: int = 1  # local worker processes (volumes sharded); under torchrun: its world
    overwrite: bool = False


def load_bank_build_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``bank build`` config: ``path`` (YAML) over :class:`BankBuildConfig`, then ``key=value`` overrides.

    Raises:
        ConfigError: unknown key (with the valid ones), wrong type, or a value outside its choices.
        FileNotFoundError: the YAML file does not exist.
    """
    return load_schema(BankBuildConfig, path, overrides, "bank config")


def load_teach_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``teach`` config: ``path`` (YAML) over :class:`TeachConfig`, then ``key=value`` overrides.

    Raises:
        ConfigError: unknown key (with the valid ones), wrong type, or a value outside its choices.
        FileNotFoundError: the YAML file does not exist.
    """
    return load_schema(TeachConfig, path, overrides, "teach config")
