"""LightningDataModules for unpaired 3D volumes (teacher) and single 2D slices (student).

Splits are at subject level and fixed by ``split_seed``: the ids are permuted once; the first
``test_subjects`` are the test set, the next ``val_subjects`` the validation set, the rest the
training pool. ``train_fraction`` (or ``train_subjects``) takes a prefix of the permuted training
pool, so smaller subsets are nested in larger ones (the 25% subset is inside the 50% subset).

Batches are dicts: ``image`` ``(B, C, *spatial)`` float32, ``label`` ``(B, 1, *spatial)`` int64,
``spacing`` ``(B, ndim)`` mm, ``id`` (list of str).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distill.data.provenance import subject_of
from lightning_distill.data.sampling import EpochSampler, compact_label_collate, sample_generator, train_loader
from lightning_distill.data.sources import SubjectSource
from lightning_distill.io import listed


def split_ids(ids: Sequence[str], val: int, test: int, seed: int) -> Dict[str, List[str]]:
    """Deterministic subject-level split: ``{"train", "val", "test"}`` (train in permuted order)."""
    if val < 0 or test < 0 or val + test >= len(ids):
        raise ValueError(f"cannot take {val} validation and {test} test subjects from {len(ids)} subjects and keep any for training")
    order = np.random.default_rng(seed).permutation(len(ids))
    perm = [ids[i] for i in order]
    return {"test": sorted(perm[:test]), "val": sorted(perm[test:test + val]), "train": perm[test + val:]}


def train_subset(pool: Sequence[str], fraction: float = 1.0, count: Optional[int] = None) -> List[str]:
    """A prefix of the (permuted) training pool: nested across fractions."""
    if count is not None:
        if not 1 <= count <= len(pool):
            raise ValueError(f"train_subjects={count} is outside 1..{len(pool)} (the training pool)")
        n = count
    else:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"train_fraction must be in (0, 1], got {fraction}")
        n = max(1, math.ceil(round(fraction * len(pool), 6)))
    return list(pool[:n])


class SubjectDataset(Dataset):
    """Samples of ``ids`` from ``source``, decoded once and cached in memory.

    Training augmentation is a MONAI ``Compose`` of dictionary transforms, seeded per sample
    (``set_random_state``) from the sample's draw seed (see :mod:`.sampling`), so it is the same
    after a resume and under DDP and takes nothing from torch's or numpy's global RNG.

    Args:
        source: the subject source.
        ids: subject ids.
        augment: intensity augmentation for training: scale ``v * (1 + f)``, ``f ~ U(-0.1, 0.1)``
            (MONAI ``RandScaleIntensityd``), shift by ``U(-0.05, 0.05)`` (``RandShiftIntensityd``) and
            Gaussian noise of sd 0.02 (``RandGaussianNoised``), in that order, on the whole image.
        patch_size: random crop of this size (training volumes); ``None`` keeps whole images.
        cache: keep decoded samples in memory (never for a source opened lazily, ``source.lazy``: its
            memory stays bounded; its own disk cache serves repeated reads).
        labels: load labels (``False``: images only, for unlabelled data).
        spatial_augment: ``none`` or ``affine``: a random in-plane affine map of image and label
            together (MONAI ``RandAffined``: rotation up to +-15 degrees about the axial axis, scale
            +-10 %, shift up to 5 % of the size; bilinear image, nearest-neighbour label, so no new
            label value and the ignore index stays; zero padding: air and background), applied
            before the intensity augmentation.
    """

    def __init__(self, source: SubjectSource, ids: Sequence[str], augment: bool = False,
                 patch_size: Optional[Sequence[int]] = None, cache: bool = True, labels: bool = True,
                 spatial_augment: str = "none"):
        if spatial_augment not in SPATIAL_AUGMENTS:
            raise ValueError(f"spatial_augment must be one of {list(SPATIAL_AUGMENTS)}, got {spatial_augment!r}")
        self.source, self.ids, self.augment, self.labels = source, list(ids), augment, labels
        self.patch_size = tuple(patch_size) if patch_size else None
        self.cache: Optional[Dict[str, Dict]] = {} if cache and not getattr(source, "lazy", False) else None
        self.spatial_augment = spatial_augment
        self._transforms: Dict[tuple, object] = {}  # augmentation by image shape, built on first use (per worker)

    def __len__(self) -> int:
        return len(self.ids)

    def _load(self, sid: str) -> Dict:
        if self.cache is not None and sid in self.cache:
            return self.cache[sid]
        s = self.source.load(sid)
        item = {"image": torch.as_tensor(s["image"], dtype=torch.float32),
                "spacing": torch.as_tensor(s["spacing"], dtype=torch.float32), "id": sid}
        if self.labels:
            if s.get("label") is None:
                raise ValueError(f"subject {sid!r} has no label map (labelled data are needed here)")
            item["label"] = torch.as_tensor(s["label"], dtype=torch.int64)[None]
        if s.get("soft") is not None:  # a teacher's per-pixel values (lightning_distill.data.transfer)
            item["soft"] = torch.as_tensor(s["soft"], dtype=torch.float32)
        if self.cache is not None:
            self.cache[sid] = item
        return item

    def __getitem__(self, key) -> Dict:
        """``key``: an index, or ``(index, draw_seed)`` (training, see :mod:`.sampling`): the crop and
        augmentation then draw from a generator of that seed instead of torch's global RNG."""
        i, gen = sample_generator(key)
        item = dict(self._load(self.ids[i]))
        image = item["image"]
        label = item.get("label", torch.zeros((1,) + tuple(image.shape[1:]), dtype=torch.int64))
        soft = item.get("soft")
        if self.patch_size is not None:
            spatial = image.shape[1:]
            if any(p > s for p, s in zip(self.patch_size, spatial)):
                raise ValueError(f"patch_size {self.patch_size} is larger than subject {self.ids[i]!r} of shape {tuple(spatial)}")
            starts = [int(torch.randint(0, s - p + 1, (), generator=gen)) for s, p in zip(spatial, self.patch_size)]
            sl = tuple(slice(a, a + p) for a, p in zip(starts, self.patch_size))
            image, label = image[(slice(None),) + sl], label[(slice(None),) + sl]
            soft = None if soft is None else soft[(slice(None),) + sl]
        if self.augment or self.spatial_augment != "none":
            image, label, soft = self.augmented(image, label, int(torch.randint(0, 2 ** 31 - 1, (), generator=gen)), soft)
        item["image"] = image.contiguous()
        if soft is not None:
            item["soft"] = soft.contiguous()
        if self.labels:
            item["label"] = label.contiguous()
        return item

    def augmentation(self, shape: Sequence[int], soft: bool = False):
        """The MONAI ``Compose`` of this dataset's augmentation for images of ``shape`` ``(C, *spatial)``
        (``soft``: samples also carry ``soft`` values, moved with the image, linearly)."""
        shape = tuple(shape)
        if (shape, soft) not in self._transforms:
            # deferred: MONAI takes seconds to import; only augmentation needs it
            from monai.transforms import (Compose, RandAffined, RandGaussianNoised, RandScaleIntensityd,
                                          RandShiftIntensityd)

            steps = []
            if self.spatial_augment == "affine":
                nd = len(shape) - 1
                rotate = (math.pi / 12,) if nd == 2 else (0.0, 0.0, math.pi / 12)  # about the axial (last) axis
                shift = [0.05 * s for s in shape[1:3]] + ([0.0] if nd == 3 else [])
                keys, modes = ["image", "label"] + (["soft"] if soft else []), ("bilinear", "nearest") + (("bilinear",) if soft else ())
                steps.append(RandAffined(keys=keys, prob=1.0, rotate_range=rotate,
                                         scale_range=(0.1,) * 2 + ((0.0,) if nd == 3 else ()), translate_range=shift,
                                         mode=modes, padding_mode="zeros"))
            if self.augment:
                steps += [RandScaleIntensityd(keys="image", factors=0.1, prob=1.0),
                          RandShiftIntensityd(keys="image", offsets=0.05, prob=1.0),
                          RandGaussianNoised(keys="image", prob=1.0, mean=0.0, std=0.02, sample_std=False)]
            self._transforms[(shape, soft)] = Compose(steps)
        return self._transforms[(shape, soft)]

    def augmented(self, image: torch.Tensor, label: torch.Tensor, seed: int, soft: Optional[torch.Tensor] = None):
        """Image, label and ``soft`` values (or ``None``) through :meth:`augmentation`, its random state set
        from ``seed`` (the image and label get the same draws with or without ``soft``).

        MONAI's metadata tracking is off while the transforms run: the same values (tested), plain tensors
        out (a MetaTensor would spread into the prototype sums and the checkpoint, which then needs
        ``weights_only=False`` to load), and a 64x64 slice augments in about 0.7x the time
        (``experiments/bench_speed.py`` measures the loaders).
        """
        # deferred: MONAI takes seconds to import; only augmentation needs it
        from monai.data import get_track_meta, set_track_meta

        compose = self.augmentation(image.shape) if soft is None else self.augmentation(image.shape, soft=True)
        transform = compose.set_random_state(seed=seed)
        tracking = get_track_meta()
        set_track_meta(False)  # a module-level switch of MONAI: restored below, also on error
        data = {"image": image, "label": label.float(), **({"soft": soft} if soft is not None else {})}
        try:
            out = transform(data)
        finally:
            set_track_meta(tracking)
        moved = None if soft is None else torch.as_tensor(out["soft"]).float()
        return torch.as_tensor(out["image"]).float(), torch.as_tensor(out["label"]).round().to(label.dtype), moved


SPATIAL_AUGMENTS = ("none", "affine")


class SegmentationDataModule(L.LightningDataModule):
    """Subject-level splits, nested training subsets and loaders for one source.

    Args:
        source: where subjects come from.
        batch_size: training batch size (validation/test use ``eval_batch_size``).
        val_subjects, test_subjects: split sizes.
        train_fraction: fraction of the training pool used (nested subsets).
        train_subjects: absolute number instead of ``train_fraction``.
        split_seed: seed of the subject permutation.
        num_workers: loader workers.
        augment: training-time intensity augmentation.
        spatial_augment: training-time spatial augmentation (see :class:`SubjectDataset`).
        patch_size: training crops (volumes); ``None`` for whole images.
        eval_batch_size: batch size of validation and test.
        splits: explicit ``{"train": [...], "val": [...], "test": [...]}`` subject lists instead of
            the seeded split (e.g. disjoint patient groups); ``train_fraction`` still applies.
        seed: seed of the training order and of the per-sample random draws (see :mod:`.sampling`:
            the training loader resumes mid-epoch and deals the same samples to DDP processes).
        val_source: where the validation subjects' samples come from instead of ``source`` (e.g. every
            axial slice of the validation patients' volumes while training on one slice per patient,
            so that model selection sees every organ). Needs explicit ``splits``.
        extras: ``{name: (source, count)}``: every training sample comes with ``count`` samples of each
            source, drawn per sample (:class:`ExtraDraws`; e.g. ``transfer`` and ``union`` slices of
            :mod:`lightning_distill.data.transfer`), augmented like the training samples.
    """

    def __init__(self, source: SubjectSource, batch_size: int = 8, val_subjects: int = 10, test_subjects: int = 20,
                 train_fraction: float = 1.0, train_subjects: Optional[int] = None, split_seed: int = 0,
                 num_workers: int = 0, augment: bool = True, patch_size: Optional[Sequence[int]] = None,
                 eval_batch_size: Optional[int] = None, splits: Optional[Dict[str, Sequence[str]]] = None,
                 seed: int = 0, spatial_augment: str = "none", val_source: Optional[SubjectSource] = None,
                 extras: Optional[Dict[str, Tuple[SubjectSource, int]]] = None):
        super().__init__()
        self.extras = dict(extras or {})
        for name, (src, count) in self.extras.items():
            if src.spatial_dims != source.spatial_dims or int(count) < 1:
                raise ValueError(f"extra samples {name!r}: need a {source.spatial_dims}D source and a count >= 1, got "
                                 f"{src.spatial_dims}D and {count}")
        if val_source is not None and not (splits and splits.get("val")):
            raise ValueError("a separate validation source needs explicit splits with val subjects (data.splits.val)")
        if val_source is not None and (val_source.spatial_dims != source.spatial_dims
                                       or tuple(val_source.class_names) != tuple(source.class_names)):
            raise ValueError(f"the validation source ({val_source.spatial_dims}D, classes {list(val_source.class_names)}) "
                             f"does not match the data ({source.spatial_dims}D, classes {list(source.class_names)})")
        self.source, self.seed, self.val_source = source, int(seed), val_source
        self.spatial_augment = spatial_augment
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size or batch_size
        self.num_workers, self.augment, self.patch_size = num_workers, augment, patch_size
        self.memory_format: Optional[torch.memory_format] = None  # inputs' layout on the device (accel.channels_last)
        # splits are made over subjects; a sample id "<subject>@<z>" (one slice of a volume) follows its subject
        by_subject: Dict[str, List[str]] = {}
        for i in source.ids:
            by_subject.setdefault(subject_of(i), []).append(i)
        subjects = list(by_subject)
        val_by_subject: Dict[str, List[str]] = {}
        for i in (val_source.ids if val_source is not None else []):
            val_by_subject.setdefault(subject_of(i), []).append(i)
        if splits:
            named = {k: set(v) for k, v in splits.items()}
            unknown = sorted(set().union(*[v for k, v in named.items() if not (k == "val" and val_source is not None)]) - set(subjects))
            if val_source is not None:
                unknown += sorted(named["val"] - set(val_by_subject))
            if unknown:
                raise ValueError(f"split lists name subjects that are not in the data: {listed(unknown)}")
            order = np.random.default_rng(split_seed).permutation(len(splits.get("train", [])))
            subj = {"train": [list(splits["train"])[i] for i in order] if splits.get("train") else [],
                    "val": sorted(splits.get("val", [])), "test": sorted(splits.get("test", []))}
            overlap = sorted(s for s, n in Counter(subj["train"] + subj["val"] + subj["test"]).items() if n > 1)
            if overlap:
                raise ValueError(f"subjects {listed(overlap)} are in more than one split (or listed twice)")
        else:
            subj = split_ids(subjects, val_subjects, test_subjects, split_seed)
        self.subject_splits = subj
        self.train_subject_ids = train_subset(subj["train"], train_fraction, train_subjects) if subj["train"] else []
        expand = lambda ss: [i for s in ss for i in by_subject[s]]  # noqa: E731
        self.splits = {k: expand(v) for k, v in subj.items() if not (k == "val" and val_source is not None)}
        if val_source is not None:
            self.splits["val"] = [i for s in subj["val"] for i in val_by_subject[s]]
        self.train_ids = expand(self.train_subject_ids)
        self.datasets: Dict[str, SubjectDataset] = {}

    @property
    def class_names(self):
        return self.source.class_names

    def setup(self, stage: Optional[str] = None) -> None:
        if not self.datasets:
            self.datasets = {
                "train": SubjectDataset(self.source, self.train_ids, augment=self.augment, patch_size=self.patch_size,
                                        spatial_augment=self.spatial_augment),
                "val": SubjectDataset(self.val_source or self.source, self.splits["val"]),
                "test": SubjectDataset(self.source, self.splits["test"]),
            }

    def _on_cuda(self) -> bool:
        """Whether the attached trainer trains on a CUDA device (loaders then pin memory and send uint8 labels)."""
        trainer = self.trainer
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def on_after_batch_transfer(self, batch, dataloader_idx: int):
        """Labels sent as uint8 (GPU loaders, :func:`~lightning_distill.data.sampling.compact_label_collate`) back to
        int64, now on the device; images in :attr:`memory_format` when one is set (channels-last, ``accel``)."""
        if isinstance(batch, dict):
            if torch.is_tensor(batch.get("label")) and batch["label"].dtype == torch.uint8:
                batch["label"] = batch["label"].long()
            fmt = self.memory_format
            for key in ("image", "image_b") if fmt is not None else ():
                x = batch.get(key)
                if torch.is_tensor(x) and x.ndim in (4, 5):
                    batch[key] = x.contiguous(memory_format=fmt)
        return batch

    def _gpu_loading(self) -> dict:
        return {"pin_memory": True, "collate_fn": compact_label_collate} if self._on_cuda() else {}

    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        self.setup()
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0, drop_last=False, **self._gpu_loading())

    def _train_loader(self, dataset: Dataset) -> DataLoader:
        """The training loader: this process's share of a seeded per-epoch order (resumable, see :mod:`.sampling`)."""
        trainer = self.trainer
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        sampler = EpochSampler(len(dataset), seed=self.seed, shuffle=True, num_replicas=world, rank=rank)
        return train_loader(dataset, sampler, self.batch_size, self.num_workers, **self._gpu_loading())

    def train_dataloader(self) -> DataLoader:
        self.setup()
        train = self.datasets["train"]
        if self.extras:
            train = ExtraDraws(train, {name: (SubjectDataset(src, src.ids, augment=self.augment, spatial_augment=self.spatial_augment),
                                              int(count)) for name, (src, count) in self.extras.items()})
        return self._train_loader(train)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False, self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size)


class VolumeDataModule(SegmentationDataModule):
    """3D volumes for the teacher (whole volumes, or random patches with ``patch_size``)."""

    def __init__(self, source: SubjectSource, **kwargs):
        if source.spatial_dims != 3:
            raise ValueError(f"VolumeDataModule needs a 3D source, got {source.spatial_dims}D")
        super().__init__(source, **kwargs)


class SliceDataModule(SegmentationDataModule):
    """Single 2D axial slices for the student (one slice per subject)."""

    def __init__(self, source: SubjectSource, **kwargs):
        if source.spatial_dims != 2:
            raise ValueError(f"SliceDataModule needs a 2D source, got {source.spatial_dims}D")
        super().__init__(source, **kwargs)


class ExtraDraws(Dataset):
    """Every sample of ``first`` with ``count`` random samples of each extra dataset, stacked under
    ``<name>_image`` ``(count, C, *spatial)``, ``<name>_label`` ``(count, 1, *spatial)``, ``<name>_soft``
    ``(count, V, *spatial)`` (when the samples carry ``soft``) and ``<name>_id`` (the ids, comma-joined).

    Given a key ``(index, draw_seed)`` the partners and every augmentation are drawn from that seed (so
    resume and DDP see what one uninterrupted process sees, :mod:`.sampling`); given a plain index, from
    torch's global RNG.
    """

    def __init__(self, first: Dataset, extras: Dict[str, Tuple[Dataset, int]]):
        for name, (ds, count) in extras.items():
            if len(ds) == 0:
                raise ValueError(f"the extra dataset {name!r} is empty")
        self.first, self.extras = first, extras

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, key) -> Dict:
        i, gen = sample_generator(key)
        total = sum(c for _, c in self.extras.values())
        if gen is None:
            item = dict(self.first[i])
            picks = iter([(int(torch.randint(len(ds), ())), None) for ds, c in self.extras.values() for _ in range(c)])
        else:
            seeds = [int(v) for v in torch.randint(0, 2 ** 62, (1 + 2 * total,), generator=gen)]
            item = dict(self.first[(i, seeds[0])])
            picks = iter([(seeds[1 + 2 * k], seeds[2 + 2 * k]) for k in range(total)])
        for name, (ds, count) in self.extras.items():
            samples = []
            for _ in range(count):
                j, seed = next(picks)
                samples.append(ds[j % len(ds)] if seed is None else ds[(j % len(ds), seed)])
            item[f"{name}_image"] = torch.stack([s["image"] for s in samples])
            item[f"{name}_label"] = torch.stack([s["label"] for s in samples])
            if all("soft" in s for s in samples):
                item[f"{name}_soft"] = torch.stack([s["soft"] for s in samples])
            item[f"{name}_id"] = ",".join(s["id"] for s in samples)
        return item


class UnpairedDataset(Dataset):
    """Every sample of ``first`` with the image of a random sample of ``second`` as ``image_b``.

    The two are unpaired (other subjects, other modality). Given a key ``(index, draw_seed)`` the
    partner and both samples' augmentations are drawn from that seed; given a plain index, from
    torch's global RNG. Batches gain ``image_b`` ``(B, C, *spatial)`` and ``id_b``.
    """

    def __init__(self, first: Dataset, second: Dataset):
        if len(second) == 0:
            raise ValueError("the unpaired (second) dataset is empty")
        self.first, self.second = first, second

    def __len__(self) -> int:
        return len(self.first)

    def __getitem__(self, key) -> Dict:
        i, gen = sample_generator(key)
        if gen is None:
            item = dict(self.first[i])
            other = self.second[int(torch.randint(len(self.second), ()))]
        else:
            seed_a, j, seed_b = (int(v) for v in torch.randint(0, 2 ** 62, (3,), generator=gen))
            item = dict(self.first[(i, seed_a)])
            other = self.second[(j % len(self.second), seed_b)]
        item["image_b"], item["id_b"] = other["image"], other["id"]
        return item


class UnpairedDataModule(SegmentationDataModule):
    """Labelled samples of ``source`` (modality A) whose training batches carry unpaired images of
    ``target`` (modality B, labels not used): the data of CMEDL.

    Validation and test are ``source``'s (the student's modality). ``target`` is split like any
    source (its own ``target_val_subjects`` / ``target_test_subjects`` are held out) and its training
    pool (``target_fraction`` of it) gives the B images.

    Args:
        source: labelled data of the student's modality.
        target: data of the teacher's modality, same spatial dims and shape.
        target_val_subjects, target_test_subjects, target_fraction, target_split_seed, target_splits:
            the target's split (as for :class:`SegmentationDataModule`).
        **kwargs: :class:`SegmentationDataModule` arguments for ``source``.
    """

    def __init__(self, source: SubjectSource, target: SubjectSource, target_val_subjects: int = 0,
                 target_test_subjects: int = 0, target_fraction: float = 1.0, target_split_seed: int = 0,
                 target_splits: Optional[Dict[str, Sequence[str]]] = None, **kwargs):
        super().__init__(source, **kwargs)
        if target.spatial_dims != source.spatial_dims:
            raise ValueError(f"the target data are {target.spatial_dims}D but the source data {source.spatial_dims}D")
        self.target = target
        tdm = SegmentationDataModule(target, val_subjects=target_val_subjects, test_subjects=target_test_subjects,
                                     train_fraction=target_fraction, split_seed=target_split_seed, splits=target_splits)
        self.target_ids = tdm.train_ids
        if not self.target_ids:
            raise ValueError("no target subject is left for training (check the target's split)")

    def train_dataloader(self) -> DataLoader:
        self.setup()
        first = self.datasets["train"]
        second = SubjectDataset(self.target, self.target_ids, augment=self.augment, patch_size=self.patch_size, labels=False)
        a, b = first._load(first.ids[0])["image"].shape, second._load(second.ids[0])["image"].shape
        if a != b:
            raise ValueError(f"source images {tuple(a)} ({first.ids[0]}) and target images {tuple(b)} ({second.ids[0]}) "
                             "differ in shape: give both the same data.shape")
        return self._train_loader(UnpairedDataset(first, second))
