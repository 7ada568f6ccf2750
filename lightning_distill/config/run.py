"""The run config (``lightning-distill fit``, ``test``, ``predict``): :class:`RunConfig` and its sections.

A run config is a YAML file validated against :class:`RunConfig` (a file may start from another
with ``extends: other.yaml``, then override some keys); overrides use OmegaConf's dotlist
form (``data.train_fraction=0.25 distill.weight=0``), which is also what a W&B sweep agent passes
with ``${args_no_hyphens}``. ``trainer.*`` is passed to ``lightning.Trainer`` and checked against
its signature. A field's allowed values are declared with it (:func:`~.load.choice`).
"""

from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from lightning_distill.config.load import (LAYOUTS, MODALITIES, MR_NORMS, ON_MISSING, PHANTOM_MODALITIES, PHANTOM_VERSIONS,
                                           UNMAPPED, ConfigError, choice, load_schema)
from lightning_distill.registry import METHODS


def _method_names() -> List[str]:
    return list(METHODS)  # read when checked: a registry entry added at run time counts


@dataclass
class ShiftConfig:
    """A documented domain shift of phantom images (identity by default), for cross-domain tests.

    Applied to the windowed image ``x`` in [0, 1], in this order: resolution (down-sample by
    ``resolution`` then back, linear), intensity mapping ``x ** gamma``, contrast
    ``(x - 0.5) * contrast + 0.5 + brightness``, then Gaussian noise of std ``noise`` (per-subject
    seed); the result is clipped to [0, 1]. Labels are unchanged.
    """

    resolution: float = 1.0  # >= 1: down-sampling factor
    gamma: float = 1.0
    contrast: float = 1.0
    brightness: float = 0.0
    noise: float = 0.0


@dataclass
class PhantomConfig:
    """Synthetic phantom population (see :class:`lightning_distill.data.phantom.PhantomSpec`)."""

    seed: int = 0
    phases: List[str] = field(default_factory=lambda: ["noncontrast", "arterial", "venous"])
    noise_hu: List[float] = field(default_factory=lambda: [10.0, 25.0])
    blur: float = 0.6
    slice_z: List[float] = field(default_factory=lambda: [-0.6, 0.0])
    modality: str = choice("CT", PHANTOM_MODALITIES)  # CT | MR (MRI-like rendering of the same anatomy)
    version: str = choice("0.3", PHANTOM_VERSIONS)  # the generator: 0.3 (since 0.3.0, pinned) | 0.5 (learnable single-slice cues); see phantom.py
    shift: ShiftConfig = field(default_factory=ShiftConfig)


@dataclass
class NiftiConfig:
    """A NIfTI dataset and its preprocessing (see ``lightning_distill/data/nifti.py`` and ``preprocess.py``)."""

    root: Optional[str] = None  # dataset folder; ${oc.env:VAR,default} reads an environment variable
    layout: str = choice("auto", LAYOUTS)
    image_pattern: str = "images/*.nii.gz"  # folder layout: glob relative to root; {case} marks the case id (images/image_{case}.nii.gz)
    label_pattern: Optional[str] = "labels/{case}.nii.gz"  # folder layout: {case} = the case id (see image_pattern)
    # dataset label id (5 or "5") or name -> class name | ignore. Every label id that nothing maps follows
    # `unmapped` (see lightning_distill.data.labels.LabelMapping for the one rule of every layout).
    label_map: Dict[Any, str] = field(default_factory=dict)
    unmapped: str = choice("background", UNMAPPED)
    on_missing: str = choice("error", ON_MISSING)  # a label_map id or a class found in no label file
    cases: Optional[List[str]] = None  # keep only these case ids
    slice_mode: str = choice("file", ("file", "all"))  # 2D: file (one sample per file) | all (every axial slice of volumes)
    # 2D: validate on every axial slice of the val split's volumes in this folder (same layout and
    # preprocessing as root) instead of their samples in root, so that model selection sees every organ
    # when one slice per patient may miss one (CHAOS: experiments/chaos/student.yaml). Needs data.splits.
    val_root: Optional[str] = None
    require_foreground: bool = True  # an all-background label is a bad case
    modality: str = choice("CT", MODALITIES)
    ct_window: List[float] = field(default_factory=lambda: [-175.0, 250.0])
    mr_norm: str = choice("percentile", MR_NORMS)
    percentiles: List[float] = field(default_factory=lambda: [0.5, 99.5])
    orientation: Optional[str] = "RAS"
    spacing: Optional[List[float]] = None  # target mm; <= 0 keeps an axis
    crop_foreground: bool = False  # crop to the image above crop_threshold (after intensity scaling)
    crop_threshold: float = 0.05
    crop_margin: int = 4
    resize: str = choice("resize", ("resize", "pad_crop"))  # resize | pad_crop (to data.shape)
    open: str = choice("eager", ("eager", "lazy"))  # eager: read and check every case before the first batch | lazy: headers only at start, each case read when first used, nothing kept in memory (large datasets; docs/data.md)
    cache_dir: Optional[str] = None  # persistent cache of preprocessed cases (keyed by files and preprocessing); None: none


@dataclass
class DataConfig:
    source: str = choice("phantom", ("phantom", "nifti"))
    num_subjects: int = 160
    shape: List[int] = field(default_factory=lambda: [128, 128])
    val_subjects: int = 20
    test_subjects: int = 40
    train_fraction: float = 1.0
    train_subjects: Optional[int] = None
    split_seed: int = 0
    batch_size: int = 8
    eval_batch_size: Optional[int] = None
    num_workers: Any = "auto"  # loader workers; auto: 0 on CPU (the cores train), on a GPU min(8, cores / devices - 1)
    augment: bool = True
    spatial_augment: str = choice("none", ("none", "affine"))  # none | affine: random in-plane rotation/scale/shift of image and label (training; seeded, resumable)
    patch_size: Optional[List[int]] = None
    window: List[float] = field(default_factory=lambda: [-175.0, 250.0])
    splits: Optional[Dict[str, List[str]]] = None  # explicit {train, val, test} subject lists
    on_bad_case: str = choice("error", ("error", "skip"))  # error | skip (warn, listing every skipped case)
    phantom: PhantomConfig = field(default_factory=PhantomConfig)
    nifti: NiftiConfig = field(default_factory=NiftiConfig)


@dataclass
class ModelConfig:
    """Network by short name: MONAI ``UNet``/``DynUNet``/``SwinUNETR`` or any smp architecture."""

    name: str = "Unet"
    encoder: str = "resnet18"
    kwargs: Dict[str, Any] = field(default_factory=dict)
    skip_connections: bool = True  # False: smp encoder-decoders decode from the bottleneck only (SIKD teacher option)


@dataclass
class OptimConfig:
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: str = choice("cosine", ("cosine", "none"))


@dataclass
class LossConfig:
    """Segmentation loss ``dice_weight * Dice + ce_weight * CE``. The class-balance options make a
    class-balanced baseline, so that a gain from balancing the classes is not credited to a teacher:
    ``class_balance=inverse_frequency`` weights the CE of class k by ``N / (K * n_k)`` (``n_k`` its
    voxels in the training labels, sklearn's "balanced"); ``dice_batch=false`` takes the Dice per
    image (each image's classes weigh alike) instead of over the batch."""

    dice_weight: float = 1.0
    ce_weight: float = 1.0
    class_balance: str = choice("none", ("none", "inverse_frequency"))
    dice_batch: bool = True


@dataclass
class BankConfig:
    """Prototype bank accumulated during training (the teacher's is exported for the student)."""

    space: str = choice("prob", ("prob", "feature"))  # prob (K x K) | feature (K x D)
    tau: float = 1.0  # the temperature of the bank's `prototypes` (a student's default distill.tau)
    taus: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # also accumulated (prob space): distill.tau picks one
    source: str = choice("running", ("running", "final"))  # running: mean of the train-mode outputs over training batches (the paper) | final: after training, the best checkpoint in eval mode over whole volumes
    final_split: str = choice("both", ("train", "val", "both"))  # source=final: the whole volumes it runs over: train (not augmented) | val | both
    axial_range: Optional[List[float]] = None  # [lo, hi], 0 <= lo < hi <= 1: fractions of each volume's axial (last) axis, 0 = first (inferior) slice, whose voxels contribute; phantom z -> (z + 1) / 2: slice_z [-0.6, 0.0] is [0.2, 0.5] (see lightning_distill/bank/axial.py)
    momentum: Optional[float] = None  # None: running mean; (0, 1): EMA
    start: float = 0.5  # fraction of training steps before accumulation starts
    feature_layer: Optional[str] = None  # default: the network's head module
    export: str = "prototypes.pt"  # file name in output_dir


@dataclass
class DistillConfig:
    """Student distillation. ``method``: ``prototype`` (the core: lambda * (beta * inter + gamma * intra)
    prototype DIST against the teacher's bank), ``sikd`` (weight * MSE to a class-mean teacher's
    penultimate features), ``pixel`` (pixel-wise DIST with a paired 2D teacher) or ``cmedl``
    (weight * feature hint from a teacher trained concurrently on translated images; see ``cmedl``)."""

    method: str = choice("prototype", _method_names)  # a name of lightning_distill.registry.METHODS
    weight: float = 1.0  # lambda; 0 = baseline
    teacher: Optional[str] = None  # sikd / pixel: the 2D teacher's checkpoint (.ckpt of `lightning-distill fit`)
    prototypes: Optional[str] = None  # path of the teacher's prototypes.pt
    beta: float = 1.0
    gamma: float = 1.0
    tau: Optional[float] = None  # softmax temperature of the student AND the bank matrix read (one of the bank's taus); default: the bank's tau
    geometry: str = choice("prob", ("prob", "logprob", "offdiag"))  # prob: Pearson on probability rows (the paper) | logprob: on clamped log-probabilities | offdiag: on the off-diagonal part only
    log_floor: float = 1.0e-4  # logprob: probabilities are clamped here before the log
    min_pixels: int = 16  # a class is 'present' in a batch with at least this many labelled pixels
    row_weight: str = choice("none", ("none", "reliability"))  # none | reliability: inter rows weighted by the teacher's held-out Dice of the class (bank metadata)
    min_reliability: float = 0.0  # rows of classes whose teacher held-out Dice is below this are left out
    mask_classes: List[str] = field(default_factory=list)  # class names left out of both DIST terms, as if the bank lacked them (e.g. [spleen]: a diagnosis run)
    bank_control: str = choice("none", ("none", "identity", "flat", "shuffled"))  # none | identity | flat | shuffled: the teacher's bank with its content taken out (controls; bank.controls.control_bank)
    grad_every: int = 25  # every N steps log train/dist_grad_ratio (|grad of lambda*DIST| / |grad of seg loss| on the logits); 0: never
    feature_layer: Optional[str] = None  # feature-space banks / sikd: the student's head module (input = penultimate features)


@dataclass
class CMEDLConfig:
    """CMEDL (``distill.method=cmedl``): concurrent translator + teacher + student; ``distill.weight``
    is the hint weight. ``data`` is the student's labelled modality A, ``cmedl.target`` the teacher's
    modality B (unpaired images; its labels, if any, are not used). See
    :mod:`lightning_distill.methods.cmedl`. Loss weights, hint layers and ``translator_seg`` are not
    given by the paper's public sources: the defaults are CycleGAN's where it has one."""

    target: DataConfig = field(default_factory=lambda: DataConfig(phantom=PhantomConfig(seed=1, modality="MR")))
    translator: str = choice("resnet", ("resnet", "unet", "none"))  # resnet | unet | none (no translation: the teacher sees the student's images)
    channels: int = 32  # generator width (CycleGAN: 64)
    blocks: int = 6  # resnet: residual blocks; unet: depth (levels)
    disc_channels: int = 32  # PatchGAN width (CycleGAN: 64)
    disc_layers: int = 3  # 3 = the 70x70 PatchGAN
    hint_layers: Optional[List[str]] = None  # module names (output; 'name:input' for the input); default: last two decoder blocks
    teacher_weight: float = 1.0  # the teacher's segmentation loss
    adv_weight: float = 1.0
    cycle_weight: float = 10.0
    identity_weight: float = 0.0
    translator_seg: bool = True  # the teacher's segmentation loss also trains the A->B generator
    gan_lr: float = 2.0e-4
    gan_betas: List[float] = field(default_factory=lambda: [0.5, 0.999])
    examples: int = 4  # translated examples in output_dir/translations.png


@dataclass
class TransferConfig:
    """Transfer through data (docs/methods.md): slices written by ``lightning-distill teach`` beside the
    student's labelled single slices. ``slices``: the teacher's probabilities per pixel as a target
    (``weight * transfer`` loss; ``mode`` soft: ``tau^2 * KL(teacher || student)``, hard: CE on the
    teacher's argmax where its confidence >= ``threshold``); ``union``: those slices' ground truth joins
    the labelled set (Dice + CE). Both may be set, also with prototype DIST."""

    slices: Optional[str] = None  # a `teach` folder: its teacher-labelled slices (null: no transfer term)
    mode: str = choice("soft", ("soft", "hard"))
    target: str = choice("teacher", ("teacher", "truth"))  # teacher | truth (control: the slices' ground truth through the same channel)
    weight: float = 1.0  # of the transfer term
    ratio: int = 1  # teacher slices per labelled slice in a training batch
    tau: Optional[float] = None  # soft: temperature of student and teacher (null: the folder's; another: re-tempered)
    threshold: float = 0.9  # hard: pixels whose teacher confidence is below it get no loss
    union: Optional[str] = None  # a `teach` folder (model.format=none is enough): its ground-truth slices join the labelled set
    union_ratio: int = 1  # union slices per labelled slice in a training batch
    select: Dict[str, List[str]] = field(default_factory=dict)  # keep slices of volumes with these attributes, e.g. {phase: [noncontrast]}


@dataclass
class CheckpointConfig:
    """What ``checkpoints/`` keeps: ``best.ckpt`` (by ``val/dice``) and, with ``save_last``, ``last.ckpt``
    (after every validation and, with ``every_n_steps``, every that many training steps, so a
    pre-empted run loses at most that many steps; ``resume=auto`` continues from it)."""

    save_last: bool = True
    every_n_steps: Optional[int] = 100  # also write last.ckpt every N training steps (null: only after validation)
    weights_only: bool = False  # drop optimizer/scheduler state (1/3 of the size; such a file cannot resume training)
    # a last.ckpt write (not the final one) is skipped sooner than this many minutes after the previous one;
    # auto: 0 on CPU (every every_n_steps and validation), 5 on a GPU (a write costs seconds of GPU time there)
    min_minutes: Any = "auto"


@dataclass
class AccelConfig:
    """Throughput options (docs/gpu.md); ``auto`` chooses from the device at run time and ``fit`` prints it."""

    channels_last: Any = "auto"  # auto: on CUDA for 2D networks (tensor cores), off on CPU | true | false
    compile: bool = False  # torch.compile the network in place (net.compile(): checkpoint keys keep their names)
    matmul_precision: str = choice("auto", ("auto", "highest", "high", "medium"))  # torch.set_float32_matmul_precision: auto (high on CUDA: TF32) | highest | high | medium


@dataclass
class RunConfig:
    stage: str = choice("student", ("teacher", "student"))
    output_dir: str = "runs/student"
    seed: int = 0
    resume: Optional[str] = None  # a checkpoint to continue training from, or `auto`: <output_dir>/checkpoints/last.ckpt if it exists
    classes: Optional[List[str]] = None  # default: the data source's class names
    logger: str = choice("csv", ("csv", "wandb", "tensorboard", "none"))  # csv | wandb (offline unless WANDB_MODE says otherwise) | tensorboard (if installed) | none
    pictures: int = 4  # validation samples drawn as overlays after each validation (0: no pictures)
    pictures_min_minutes: Any = "auto"  # draw at most this often (and once at the end); auto: 0 on CPU, 10 on a GPU
    input_transform: str = choice("none", ("none", "class_mean"))  # none | class_mean (SIKD teacher: train and test on class-wise averaged images)
    val_hd95: bool = False
    surface_tolerance_mm: Optional[float] = None  # surface Dice tolerance (mm); None = one voxel (the largest spacing)
    sw_batch_size: int = 2  # sliding-window inference (3D validation/test/predict): windows per forward (GPU: 4-16)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    bank: BankConfig = field(default_factory=BankConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    cmedl: CMEDLConfig = field(default_factory=CMEDLConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    accel: AccelConfig = field(default_factory=AccelConfig)
    trainer: Dict[str, Any] = field(default_factory=dict)


@functools.lru_cache(maxsize=1)
def _defaults() -> DictConfig:
    """The run schema's defaults, built once (read-only)."""
    return OmegaConf.structured(RunConfig)


def _value(cfg: DictConfig, key: str) -> Any:
    """``cfg``'s value at ``key``, or the schema's default (a config written by an older version may lack it)."""
    return OmegaConf.select(cfg, key, default=OmegaConf.select(_defaults(), key))


def is_baseline(cfg: DictConfig) -> bool:
    """Whether a run is the plain 2D model: a student that learns from its labels only. ``distill.weight=0``
    (no teacher term; CMEDL, which trains a translator and a teacher beside its student, is never one) and no
    teacher-labelled slices (``transfer.slices``); ground-truth slices (``transfer.union``) and class
    balancing keep a run a baseline of its own kind (:func:`run_label` tells them apart)."""
    return (_value(cfg, "stage") == "student" and float(_value(cfg, "distill.weight")) == 0
            and _value(cfg, "distill.method") != "cmedl" and not _value(cfg, "transfer.slices"))


def run_label(cfg: DictConfig) -> str:
    """A run's kind in a table: ``teacher``, ``baseline`` (:func:`is_baseline`; ``balanced baseline`` and
    ``+union`` with those options), ``distilled`` (prototype DIST), ``transfer`` (teacher-labelled slices,
    ``transfer+distilled`` with DIST on too), or the method's name (``sikd``, ``pixel``, ``cmedl``)."""
    if _value(cfg, "stage") == "teacher":
        return "teacher"
    if is_baseline(cfg):
        kind = "balanced baseline" if _value(cfg, "loss.class_balance") != "none" else "baseline"
        return kind + ("+union" if _value(cfg, "transfer.union") else "")
    method = _value(cfg, "distill.method")
    if method != "prototype":
        return str(method)
    if _value(cfg, "transfer.slices"):
        return "transfer+distilled" if float(_value(cfg, "distill.weight")) != 0 else "transfer"
    return "distilled"


def check_trainer(cfg: DictConfig, where: str) -> None:
    """``trainer.*`` keys are ``lightning.Trainer`` arguments; the ones the package sets itself are refused."""
    import lightning as L  # deferred: the config is read before anything heavy (e.g. `--help`, sweeps)

    trainer = OmegaConf.to_container(cfg.trainer)
    valid = [p for p in inspect.signature(L.Trainer.__init__).parameters if p != "self"]
    for k in trainer:
        if k not in valid:
            near = difflib.get_close_matches(k, valid, n=3, cutoff=0.5)
            raise ConfigError(f"{where}: unknown key 'trainer.{k}' (passed to lightning.Trainer)."
                              + (f" Did you mean {', '.join('trainer.' + n for n in near)}?" if near else "")
                              + f" Valid trainer keys: {', '.join(valid)}")
    for k in ("callbacks", "logger", "default_root_dir"):
        if k in trainer:
            raise ConfigError(f"{where}: 'trainer.{k}' is set by lightning_distill itself (use output_dir / logger)")


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` (YAML) over the schema defaults, then apply ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, or a value outside the allowed choices.
        FileNotFoundError: the YAML file does not exist.
    """
    return load_schema(RunConfig, path, overrides, "config", checks=[check_trainer])


def load_config_dict(values: Dict[str, Any], overrides: Sequence[str] = (), where: str = "config") -> DictConfig:
    """Validate a config given as a dict (e.g. the one saved in a checkpoint), then apply overrides; the same
    checks as :func:`load_config`."""
    return load_schema(RunConfig, None, overrides, where, values=values, checks=[check_trainer])
