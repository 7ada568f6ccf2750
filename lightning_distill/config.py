"""Run configuration: structured OmegaConf schemas, YAML files and ``key=value`` overrides.

A run config is a YAML file validated against :class:`RunConfig` (a file may start from another
with ``extends: other.yaml``, then override some keys); overrides use OmegaConf's dotlist
form (``data.train_fraction=0.25 distill.weight=0``), which is also what a W&B sweep agent passes
with ``${args_no_hyphens}``. Unknown keys and wrong types fail with a :class:`ConfigError` that names
the key and lists the valid keys nearby. ``trainer.*`` is passed to ``lightning.Trainer`` and checked
against its signature.
"""

from __future__ import annotations

import difflib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from lightning_distill.registry import METHODS


class ConfigError(ValueError):
    """A config file or override is invalid; the message says which key and what is allowed."""


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
    modality: str = "CT"  # CT | MR (MRI-like rendering of the same anatomy)
    version: str = "0.3"  # the generator: 0.3 (since 0.3.0, pinned) | 0.5 (learnable single-slice cues); see phantom.py
    shift: ShiftConfig = field(default_factory=ShiftConfig)


@dataclass
class NiftiConfig:
    """A NIfTI dataset and its preprocessing (see ``lightning_distill/data/nifti.py`` and ``preprocess.py``)."""

    root: Optional[str] = None  # dataset folder; ${oc.env:VAR,default} reads an environment variable
    layout: str = "auto"  # auto | nnunet | msd | folder
    image_pattern: str = "images/*.nii.gz"  # folder layout: glob relative to root; {case} marks the case id (images/image_{case}.nii.gz)
    label_pattern: Optional[str] = "labels/{case}.nii.gz"  # folder layout: {case} = the case id (see image_pattern)
    # dataset label id (5 or "5") or name -> class name | ignore. Every label id that nothing maps follows
    # `unmapped` (see lightning_distill.data.nifti.LabelMapping for the one rule of every layout).
    label_map: Dict[Any, str] = field(default_factory=dict)
    unmapped: str = "background"  # background | ignore | error
    on_missing: str = "error"  # error | warn: a label_map id or a class found in no label file
    cases: Optional[List[str]] = None  # keep only these case ids
    slice_mode: str = "file"  # 2D: file (one sample per file) | all (every axial slice of volumes)
    # 2D: validate on every axial slice of the val split's volumes in this folder (same layout and
    # preprocessing as root) instead of their samples in root, so that model selection sees every organ
    # when one slice per patient may miss one (CHAOS: experiments/chaos/student.yaml). Needs data.splits.
    val_root: Optional[str] = None
    require_foreground: bool = True  # an all-background label is a bad case
    modality: str = "CT"  # CT | MR | none
    ct_window: List[float] = field(default_factory=lambda: [-175.0, 250.0])
    mr_norm: str = "percentile"  # percentile | zscore
    percentiles: List[float] = field(default_factory=lambda: [0.5, 99.5])
    orientation: Optional[str] = "RAS"
    spacing: Optional[List[float]] = None  # target mm; <= 0 keeps an axis
    crop_foreground: bool = False  # crop to the image above crop_threshold (after intensity scaling)
    crop_threshold: float = 0.05
    crop_margin: int = 4
    resize: str = "resize"  # resize | pad_crop (to data.shape)
    open: str = "eager"  # eager: read and check every case before the first batch | lazy: headers only at start, each case read when first used, nothing kept in memory (large datasets; docs/data.md)
    cache_dir: Optional[str] = None  # persistent cache of preprocessed cases (keyed by files and preprocessing); None: none


@dataclass
class DataConfig:
    source: str = "phantom"  # phantom | nifti
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
    spatial_augment: str = "none"  # none | affine: random in-plane rotation/scale/shift of image and label (training; seeded, resumable)
    patch_size: Optional[List[int]] = None
    window: List[float] = field(default_factory=lambda: [-175.0, 250.0])
    splits: Optional[Dict[str, List[str]]] = None  # explicit {train, val, test} subject lists
    on_bad_case: str = "error"  # error | skip (warn, listing every skipped case)
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
    scheduler: str = "cosine"


@dataclass
class LossConfig:
    """Segmentation loss ``dice_weight * Dice + ce_weight * CE``. The class-balance options make a
    class-balanced baseline, so that a gain from balancing the classes is not credited to a teacher:
    ``class_balance=inverse_frequency`` weights the CE of class k by ``N / (K * n_k)`` (``n_k`` its
    voxels in the training labels, sklearn's "balanced"); ``dice_batch=false`` takes the Dice per
    image (each image's classes weigh alike) instead of over the batch."""

    dice_weight: float = 1.0
    ce_weight: float = 1.0
    class_balance: str = "none"  # none | inverse_frequency
    dice_batch: bool = True


@dataclass
class BankConfig:
    """Prototype bank accumulated during training (the teacher's is exported for the student)."""

    space: str = "prob"  # prob (K x K) | feature (K x D)
    tau: float = 1.0  # the temperature of the bank's `prototypes` (a student's default distill.tau)
    taus: List[float] = field(default_factory=lambda: [0.5, 1.0, 2.0, 4.0])  # also accumulated (prob space): distill.tau picks one
    source: str = "running"  # running: mean of the train-mode outputs over training batches (the paper) | final: after training, the best checkpoint in eval mode over whole volumes
    final_split: str = "both"  # source=final: the whole volumes it runs over: train (not augmented) | val | both
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

    method: str = "prototype"  # a name of lightning_distill.registry.METHODS: prototype | sikd | pixel | cmedl
    weight: float = 1.0  # lambda; 0 = baseline
    teacher: Optional[str] = None  # sikd / pixel: the 2D teacher's checkpoint (.ckpt of `lightning-distill fit`)
    prototypes: Optional[str] = None  # path of the teacher's prototypes.pt
    beta: float = 1.0
    gamma: float = 1.0
    tau: Optional[float] = None  # softmax temperature of the student AND the bank matrix read (one of the bank's taus); default: the bank's tau
    geometry: str = "prob"  # prob: Pearson on probability rows (the paper) | logprob: on clamped log-probabilities | offdiag: on the off-diagonal part only
    log_floor: float = 1.0e-4  # logprob: probabilities are clamped here before the log
    min_pixels: int = 16  # a class is 'present' in a batch with at least this many labelled pixels
    row_weight: str = "none"  # none | reliability: inter rows weighted by the teacher's held-out Dice of the class (bank metadata)
    min_reliability: float = 0.0  # rows of classes whose teacher held-out Dice is below this are left out
    mask_classes: List[str] = field(default_factory=list)  # class names left out of both DIST terms, as if the bank lacked them (e.g. [spleen]: a diagnosis run)
    bank_control: str = "none"  # none | identity | flat | shuffled: the teacher's bank with its content taken out (controls; bank.controls.control_bank)
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
    translator: str = "resnet"  # resnet | unet | none (no translation: the teacher sees the student's images)
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
    mode: str = "soft"  # soft | hard
    target: str = "teacher"  # teacher | truth (control: the slices' ground truth through the same channel)
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
    matmul_precision: str = "auto"  # torch.set_float32_matmul_precision: auto (high on CUDA: TF32) | highest | high | medium


@dataclass
class RunConfig:
    stage: str = "student"  # teacher | student
    output_dir: str = "runs/student"
    seed: int = 0
    resume: Optional[str] = None  # a checkpoint to continue training from, or `auto`: <output_dir>/checkpoints/last.ckpt if it exists
    classes: Optional[List[str]] = None  # default: the data source's class names
    logger: str = "csv"  # csv | wandb (offline unless WANDB_MODE says otherwise) | tensorboard (if installed) | none
    pictures: int = 4  # validation samples drawn as overlays after each validation (0: no pictures)
    pictures_min_minutes: Any = "auto"  # draw at most this often (and once at the end); auto: 0 on CPU, 10 on a GPU
    input_transform: str = "none"  # none | class_mean (SIKD teacher: train and test on class-wise averaged images)
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


_CHOICES = {"stage": ("teacher", "student"), "accel.matmul_precision": ("auto", "highest", "high", "medium"), "logger": ("csv", "wandb", "tensorboard", "none"), "data.source": ("phantom", "nifti"), "data.on_bad_case": ("error", "skip"), "data.spatial_augment": ("none", "affine"),
            "data.nifti.layout": ("auto", "nnunet", "msd", "folder"), "data.nifti.unmapped": ("background", "ignore", "error"),
            "data.nifti.on_missing": ("error", "warn"),
            "data.nifti.slice_mode": ("file", "all"), "data.nifti.modality": ("CT", "MR", "none"),
            "data.phantom.modality": ("CT", "MR"), "data.phantom.version": ("0.3", "0.5"),
            "data.nifti.mr_norm": ("percentile", "zscore"), "data.nifti.open": ("eager", "lazy"), "data.nifti.resize": ("resize", "pad_crop"),
            "bank.space": ("prob", "feature"), "bank.source": ("running", "final"), "bank.final_split": ("train", "val", "both"),
            "distill.geometry": ("prob", "logprob", "offdiag"), "distill.bank_control": ("none", "identity", "flat", "shuffled"), "distill.row_weight": ("none", "reliability"),
            "cmedl.translator": ("resnet", "unet", "none"),
            "input_transform": ("none", "class_mean"), "optim.scheduler": ("cosine", "none"),
            "loss.class_balance": ("none", "inverse_frequency"), "transfer.mode": ("soft", "hard"),
            "transfer.target": ("teacher", "truth")}


_FREE_FORM = ("trainer", "data.splits", "transfer.select", "data.nifti.label_map", "cmedl.target.splits", "cmedl.target.nifti.label_map",
              "class_map", "data.label_map")  # the last two: BankBuildConfig


def _free_form(key: str) -> bool:
    """Mappings whose keys the schema does not fix."""
    return key in _FREE_FORM or key.endswith("kwargs")


def _all_keys(node: Any, prefix: str = "") -> List[str]:
    keys = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            child = node._get_node(k)
            if isinstance(child, DictConfig) and not _free_form(full):
                keys.extend(_all_keys(child, full + "."))
    return keys


def _explain(e: OmegaConfBaseException, where: str, schema: type = None) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    schema_keys = _all_keys(OmegaConf.structured(schema or RunConfig))
    if isinstance(e, (ConfigKeyError, ConfigAttributeError)):
        near = difflib.get_close_matches(key, schema_keys, n=5, cutoff=0.5)
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        siblings = [k for k in schema_keys if (k.rsplit(".", 1)[0] if "." in k else "") == parent]
        msg = f"{where}: unknown config key {key!r}."
        if near:
            msg += f" Did you mean {', '.join(repr(n) for n in near)}?"
        msg += f" Valid keys{' under ' + repr(parent) if parent else ''}: {', '.join(siblings)}"
        return ConfigError(msg)
    return ConfigError(f"{where}: invalid value for {key!r}: {e.msg if hasattr(e, 'msg') else e}")


def _check_trainer(trainer: Dict[str, Any], where: str) -> None:
    import lightning as L

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


def file_layers(path: Path, seen: Sequence[Path] = ()) -> List[tuple]:
    """``(path, config)`` of the YAML file and, first, of the files it ``extends`` (relative path)."""
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'extends' forms a cycle ({' -> '.join(map(str, [*seen, path]))})")
    if not path.is_file():
        raise FileNotFoundError(f"config file {str(path)!r} does not exist")
    try:
        node = OmegaConf.load(path)
    except Exception as e:  # yaml errors
        raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{path}: a config file must be a mapping of keys to values")
    base = node.pop("extends", None)
    layers = file_layers(path.parent / str(base), [*seen, path]) if base else []
    return [*layers, (path, node)]


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """Load ``path`` (YAML) over the schema defaults, then apply ``key=value`` overrides.

    Raises:
        ConfigError: unknown key, wrong type, or a value outside the allowed choices.
        FileNotFoundError: the YAML file does not exist.
    """
    cfg = OmegaConf.structured(RunConfig)
    try:
        if path is not None:
            p = Path(path)
            if not p.is_file():
                raise FileNotFoundError(f"config file {str(p)!r} does not exist")
            for source, layer in file_layers(p):
                try:
                    cfg = OmegaConf.merge(cfg, layer)
                except OmegaConfBaseException as e:
                    raise _explain(e, str(source)) from None
    except OmegaConfBaseException as e:
        raise _explain(e, str(path)) from None
    cfg = apply_overrides(cfg, overrides)
    where = str(path) if path else "config"
    _check_trainer(OmegaConf.to_container(cfg.trainer), where)
    checks = {**_CHOICES, **{"cmedl.target." + k[5:]: c for k, c in _CHOICES.items() if k.startswith("data.")},
              "distill.method": tuple(METHODS)}
    for key, choices in checks.items():
        v = OmegaConf.select(cfg, key)
        if v not in choices:
            raise ConfigError(f"{where}: {key}={v!r} is not one of {list(choices)}")
    return cfg


def load_config_dict(values: Dict[str, Any], overrides: Sequence[str] = (), where: str = "config") -> DictConfig:
    """Validate a config given as a dict (e.g. the one saved in a checkpoint), then apply overrides."""
    cfg = OmegaConf.structured(RunConfig)
    try:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(values))
    except OmegaConfBaseException as e:
        raise _explain(e, where) from None
    return apply_overrides(cfg, overrides)


def apply_overrides(cfg: DictConfig, overrides: Sequence[str], schema: type = None) -> DictConfig:
    """Apply ``key=value`` overrides; ``~key`` deletes an entry of a free-form mapping.

    Deleting is for ``model.kwargs``, ``trainer``, ``data.nifti.label_map`` and the like, e.g.
    ``~model.kwargs.decoder_channels`` when switching to an architecture without that argument
    (merging ``model.kwargs={}`` would keep the old entries).
    """
    bad = [o for o in overrides if "=" not in o and not o.startswith("~")]
    if bad:
        raise ConfigError(f"overrides must be key=value (or ~key to delete a mapping entry), got {bad}")
    for o in overrides:
        if o.startswith("~"):
            key = o[1:].split("=", 1)[0]
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if not isinstance(node, DictConfig) or leaf not in node:
                raise ConfigError(f"command-line override {o!r}: there is no {key!r} to delete")
            if not _free_form(parent):
                raise ConfigError(f"command-line override {o!r}: {key!r} is a schema key; only entries of free-form "
                                  f"mappings ({', '.join(_FREE_FORM)}, *.kwargs) can be deleted")
            del node[leaf]
        else:
            try:
                cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([_spaced_mapping(o)]))
            except OmegaConfBaseException as e:
                raise _explain(e, "command-line override", schema) from None
    return cfg


def _spaced_mapping(override: str) -> str:
    """``key={a:b,5:c}`` -> ``key={a: b,5: c}``: YAML reads ``a:b`` in a flow mapping as one key, so a
    mapping written without a space after its colons would silently become ``{'a:b': None}``. Colons
    inside quotes and ``${...}`` interpolations are left alone."""
    key, _, value = override.partition("=")
    v = value.strip()
    if not (v.startswith("{") and v.endswith("}")):
        return override
    out, quote, depth = [], None, 0
    for i, ch in enumerate(v):
        out.append(ch)
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "$" and v[i + 1:i + 2] == "{":
            depth += 1
        elif ch == "}" and depth:
            depth -= 1
        elif ch == ":" and not depth and v[i + 1:i + 2] not in (" ", ""):
            out.append(" ")
    return f"{key}={''.join(out)}"


def to_dict(cfg: DictConfig) -> Dict[str, Any]:
    return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]


def flat_keys(d: Any, prefix: str = "") -> Dict[str, Any]:
    """A nested dict as ``{"a.b.c": value}``; an empty dict is a value (``{"a.b": {}}``)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    items: Dict[str, Any] = {}
    for k, v in d.items():
        items.update(flat_keys(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return items


def config_key(cfg: DictConfig, ignore: Sequence[str] = ()) -> str:
    """A short hash of ``cfg`` without its top-level keys ``ignore`` (settings of how a command runs, not of what
    it computes): a resumed ``bank build`` or ``teach`` must have the same."""
    import hashlib
    import json

    c = OmegaConf.to_container(cfg)
    for k in ignore:
        c.pop(k, None)
    return hashlib.sha256(json.dumps(c, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------ lightning-distill bank build
@dataclass
class BankModelSpec:
    """The trained 3D model a bank is computed from (see :mod:`lightning_distill.bank.build`)."""

    format: str = "checkpoint"  # checkpoint (of `lightning-distill fit`) | monai (state_dict file) | bundle (MONAI bundle dir) | torchscript
    path: Optional[str] = None  # the .ckpt, the state_dict file, the bundle directory, or the TorchScript file
    name: Optional[str] = None  # monai: a class of monai.networks.nets (SegResNet, SwinUNETR, UNet, DynUNet, ...)
    kwargs: Dict[str, Any] = field(default_factory=dict)  # monai: the constructor's arguments (spatial_dims, in_channels, out_channels, ...)
    labels: Optional[List[str]] = None  # names of the model's output channels, in order (checkpoint: its class names)


@dataclass
class BankPreprocessConfig:
    """The model's own preprocessing (format checkpoint: taken from the checkpoint unless ``from_checkpoint=false``)."""

    from_checkpoint: bool = True
    orientation: Optional[str] = "RAS"
    spacing: Optional[List[float]] = None  # target mm; <= 0 keeps an axis; None: the file's grid
    modality: str = "CT"  # CT | MR | none
    ct_window: List[float] = field(default_factory=lambda: [-175.0, 250.0])
    mr_norm: str = "percentile"  # percentile | zscore
    percentiles: List[float] = field(default_factory=lambda: [0.5, 99.5])
    crop_foreground: bool = False
    crop_threshold: float = 0.05
    crop_margin: int = 4


@dataclass
class BankDataSpec:
    root: Optional[str] = None  # a folder of volumes (nnU-Net, MSD or plain layout, as data.nifti.root)
    layout: str = "auto"  # auto | nnunet | msd | folder
    image_pattern: str = "images/*.nii.gz"
    label_pattern: Optional[str] = "labels/{case}.nii.gz"
    labels: str = "auto"  # auto: a case's label file when it has one, else pseudo-labels | use: every case needs one | ignore: pseudo-labels for every case
    label_map: Dict[Any, str] = field(default_factory=dict)  # dataset label id or name -> bank class | ignore
    unmapped: str = "error"  # dataset label ids nothing maps: background | ignore | error
    cases: Optional[List[str]] = None  # keep only these case ids
    cache_dir: Optional[str] = None  # persistent cache of preprocessed cases (data.nifti.cache_dir's format); None: none
    preprocess: BankPreprocessConfig = field(default_factory=BankPreprocessConfig)


@dataclass
class BankInferenceConfig:
    roi_size: Optional[List[int]] = None  # sliding-window ROI (None: the checkpoint's patch size, else the whole volume at once)
    overlap: float = 0.25
    sw_batch_size: int = 2
    mode: str = "gaussian"  # constant | gaussian (MONAI sliding_window_inference blending)
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
    unmapped: str = "error"  # model labels nothing maps: background | ignore | error
    threshold: float = 0.9  # unlabelled volumes: keep voxels whose class probability is at least this
    data: BankDataSpec = field(default_factory=BankDataSpec)
    inference: BankInferenceConfig = field(default_factory=BankInferenceConfig)
    bank: BankOptions = field(default_factory=BankOptions)
    output: str = "runs/bank/prototypes.pt"
    processes: int = 1  # local worker processes (volumes sharded, sums all-reduced); under torchrun: its world
    save_every: int = 10  # volumes between writes of the resumable state (<output>.partial/)
    overwrite: bool = False


_BANK_CHOICES = {"model.format": ("checkpoint", "monai", "bundle", "torchscript"),
                 "unmapped": ("background", "ignore", "error"), "data.unmapped": ("background", "ignore", "error"),
                 "data.labels": ("auto", "use", "ignore"), "data.layout": ("auto", "nnunet", "msd", "folder"),
                 "data.preprocess.modality": ("CT", "MR", "none"), "data.preprocess.mr_norm": ("percentile", "zscore"),
                 "inference.mode": ("constant", "gaussian")}


def load_bank_build_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``bank build`` config: ``path`` (YAML) over :class:`BankBuildConfig`, then ``key=value`` overrides.

    Raises:
        ConfigError: unknown key (with the valid ones), wrong type, or a value outside its choices.
        FileNotFoundError: the YAML file does not exist.
    """
    return _load_schema(BankBuildConfig, _BANK_CHOICES, path, overrides, "bank config")


def _load_schema(schema: type, choices: Dict[str, Sequence[str]], path: Optional[str | Path], overrides: Sequence[str],
                 what: str) -> DictConfig:
    """``path`` (YAML, ``extends`` followed) over ``schema``'s defaults, then ``key=value`` overrides, then
    every key of ``choices`` checked."""
    cfg = OmegaConf.structured(schema)
    where = str(path) if path else what
    if path is not None:
        for source, layer in file_layers(Path(path)):
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as e:
                raise _explain(e, str(source), schema) from None
    cfg = apply_overrides(cfg, overrides, schema)
    for key, allowed in choices.items():
        v = OmegaConf.select(cfg, key)
        if v not in allowed:
            raise ConfigError(f"{where}: {key}={v!r} is not one of {list(allowed)}")
    return cfg


# ------------------------------------------------------------------------------ lightning-distill teach
@dataclass
class TeachLevels:
    """Which axial planes of each volume become slices. Levels are fractions of the volume's axial
    (last) axis in the student's orientation: 0 its first plane (inferior for RAS/LAS), 1 its last."""

    mode: str = "range"  # range: planes in [lo, hi] | match: the levels of the student's own single slices (see match)
    range: List[float] = field(default_factory=lambda: [0.0, 1.0])  # mode=range: [lo, hi], 0 <= lo <= hi <= 1
    # mode=match: a folder of single slices written by `lightning-distill slices` (its slice of each volume), or, when
    # null, the student's config: its phantom slice_z range (phantom students only)
    match: Optional[str] = None
    per_volume: int = 5  # planes per volume, drawn without replacement (every plane in range when fewer)
    seed: int = 0  # the draw of the planes (per volume: this seed and the volume's id)


@dataclass
class TeachDataSpec(BankDataSpec):
    """The volumes: a NIfTI folder (the keys of ``bank build``'s ``data``) or the phantom, rendered on the fly."""

    source: str = "nifti"  # nifti | phantom
    attributes: Optional[str] = None  # nifti: a CSV with a `case` column and per-volume attributes (e.g. phase), recorded per slice
    num_subjects: int = 400  # phantom: volumes phantom<seed>_0000 ... (the teacher population of experiments/teacher.yaml)
    shape: List[int] = field(default_factory=lambda: [64, 64, 48])  # phantom: the volume grid (X, Y, Z)
    phantom: PhantomConfig = field(default_factory=lambda: PhantomConfig(seed=1, noise_hu=[10.0, 35.0]))


@dataclass
class TeachConfig:
    """``lightning-distill teach``: 2D training slices of volumes, labelled by a trained model (see
    :mod:`lightning_distill.teach`)."""

    model: BankModelSpec = field(default_factory=BankModelSpec)  # format none: no model (ground-truth slices only: the union route)
    student: Optional[str] = None  # the student's run config (YAML): its preprocessing, data.shape and classes
    classes: Optional[List[str]] = None  # default: the student's classes
    class_map: Dict[Any, str] = field(default_factory=dict)  # model label (name or channel index) -> class | ignore
    unmapped: str = "error"  # model labels nothing maps: background | ignore | error
    tau: float = 1.0  # temperature of the stored probabilities
    data: TeachDataSpec = field(default_factory=TeachDataSpec)
    inference: BankInferenceConfig = field(default_factory=BankInferenceConfig)
    levels: TeachLevels = field(default_factory=TeachLevels)
    output: str = "runs/teach"  # a folder (written whole at the end; <output>.partial holds a run in progress)
    processes: int = 1  # local worker processes (volumes sharded); under torchrun: its world
    overwrite: bool = False


_TEACH_CHOICES = {**_BANK_CHOICES, "model.format": ("checkpoint", "monai", "bundle", "torchscript", "none"),
                  "data.source": ("nifti", "phantom"), "levels.mode": ("range", "match"),
                  **{k: v for k, v in _CHOICES.items() if k.startswith("data.phantom.")}}


def load_teach_config(path: Optional[str | Path] = None, overrides: Sequence[str] = ()) -> DictConfig:
    """The ``teach`` config: ``path`` (YAML) over :class:`TeachConfig`, then ``key=value`` overrides.

    Raises:
        ConfigError: unknown key (with the valid ones), wrong type, or a value outside its choices.
        FileNotFoundError: the YAML file does not exist.
    """
    return _load_schema(TeachConfig, _TEACH_CHOICES, path, overrides, "teach config")
