"""Training order and per-sample randomness as a pure function of ``(seed, epoch, position)``.

Three things follow from it, and each is tested (``tests/data/test_sampling.py``; a killed run resumed end to
end: ``tests/test_resume.py``):

* **Resume mid-epoch.** The training loader is torchdata's ``StatefulDataLoader``, which Lightning
  saves in every checkpoint and restores on resume; it stores the state of its sampler, an
  :class:`EpochSampler`, which counts the samples of the current epoch handed out so far
  (torchdata snapshots that count together with each batch, also with ``num_workers > 0``). On
  resume the sampler skips them: the remaining batches, and their augmentations, are the ones the
  uninterrupted run would have seen.
* **Same data under DDP.** :class:`EpochSampler` deals the positions of one seeded permutation to the
  processes (``rank::world_size``, padded like ``DistributedSampler``); the union of the processes'
  k-th batches of size B is the single process's k-th batch of size ``world_size * B``, with the
  same augmentations, since a sample's random draws depend on its position, not on the process.
* **No global RNG.** Augmentation, random crops and CMEDL's unpaired partner draw from a
  ``torch.Generator`` seeded per sample (the sampler yields ``(index, draw_seed)``), so they do not
  depend on what else consumed torch's global RNG (a restored run has not replayed it).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import default_collate
from torch.utils.data.distributed import DistributedSampler
from torchdata.stateful_dataloader import StatefulDataLoader


class EpochSampler(DistributedSampler):
    """Seeded, epoch-dependent order of a dataset's indices for one process, yielding ``(index, draw_seed)``.

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it; unlike
    torch's, it needs no process group (``num_replicas`` and ``rank`` are given) and it yields a
    per-position seed for the dataset's random draws. It is stateful (``state_dict`` /
    ``load_state_dict``: ``{"epoch", "yielded"}``, the samples of that epoch handed out so far), so
    a ``StatefulDataLoader`` over it resumes mid-epoch.

    Args:
        length: number of samples in the dataset.
        seed: the run's seed.
        shuffle: permute the samples every epoch (``False``: dataset order).
        num_replicas: number of processes (DDP world size).
        rank: this process's rank.
    """

    def __init__(self, length: int, seed: int = 0, shuffle: bool = True, num_replicas: int = 1, rank: int = 0):
        if length < 1:
            raise ValueError("EpochSampler needs at least one sample")
        if num_replicas < 1 or not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in 0..{num_replicas - 1}")
        self.length, self.seed, self.shuffle = int(length), int(seed), bool(shuffle)
        self.num_replicas, self.rank, self.epoch, self.drop_last = int(num_replicas), int(rank), 0, False
        self.num_samples = math.ceil(self.length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas
        self.yielded = 0  # samples of ``self.epoch`` handed out so far
        self._resume: Optional[Tuple[int, int]] = None  # (epoch, samples to skip) of a restored state

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.yielded = 0
        self.epoch = int(epoch)

    def epoch_plan(self, epoch: Optional[int] = None) -> Tuple[np.ndarray, np.ndarray]:
        """``(indices, draw_seeds)`` of every position of ``epoch`` (all processes, padded)."""
        rng = np.random.default_rng([self.seed, self.epoch if epoch is None else epoch])
        order = rng.permutation(self.length) if self.shuffle else np.arange(self.length)
        seeds = rng.integers(0, 2 ** 62, size=self.total_size)
        if self.total_size > self.length:  # pad by repeating the start, as DistributedSampler does
            order = np.concatenate([order, np.resize(order, self.total_size - self.length)])
        return order, seeds

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        order, seeds = self.epoch_plan()
        skip = 0
        if self._resume is not None:  # a restored position applies once, to its own epoch
            if self._resume[0] == self.epoch:
                skip = self._resume[1]
            self._resume = None
        self.yielded = skip
        for pos in range(self.rank + skip * self.num_replicas, self.total_size, self.num_replicas):
            self.yielded += 1
            yield int(order[pos]), int(seeds[pos])

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self.epoch, "yielded": self.yielded}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        """Resume at ``state``: the next pass over its epoch skips the samples already handed out.

        The epoch is restored too: with ``num_workers > 0`` the loader prefetches when Lightning
        creates its iterator, before Lightning calls ``set_epoch``. A finished epoch resumes at the
        start of the next one.
        """
        try:
            epoch, yielded = int(state["epoch"]), int(state["yielded"])
        except KeyError as e:
            raise KeyError(f"an EpochSampler state needs 'epoch' and 'yielded', got {sorted(state)}") from e
        if yielded >= self.num_samples:
            epoch, yielded = epoch + 1, 0
        self.epoch, self.yielded, self._resume = epoch, yielded, (epoch, yielded)


class TrainLoader(StatefulDataLoader):
    """torchdata's ``StatefulDataLoader`` that also resumes from checkpoints of our former loader, whose
    state was ``{"epoch", "batches"}`` (the batches of that epoch handed out)."""

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        if set(state_dict) == {"epoch", "batches"} and isinstance(self.sampler, EpochSampler):
            self.sampler.load_state_dict({"epoch": state_dict["epoch"], "yielded": state_dict["batches"] * self.batch_size})
            state_dict = {}  # a fresh iterator over the restored sampler
        super().load_state_dict(state_dict)


def train_loader(dataset, sampler: EpochSampler, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
                 collate_fn=None) -> TrainLoader:
    """The training loader over ``sampler``: a :class:`TrainLoader` (Lightning checkpoints its position)."""
    with warnings.catch_warnings():  # torchdata 0.11 calls torch.set_vital, deprecated in recent torch: noise
        warnings.filterwarnings("ignore", message=".*set_vital.* is deprecated", category=UserWarning)
        return TrainLoader(dataset, sampler=sampler, batch_size=batch_size, num_workers=num_workers,
                           persistent_workers=num_workers > 0, drop_last=False, pin_memory=pin_memory,
                           collate_fn=collate_fn)


def compact_label_collate(samples):
    """The default collate, with ``label`` as uint8 when every value fits (0..255, the ignore index 255
    included): an 8x smaller host-to-GPU copy; the DataModule's ``on_after_batch_transfer`` casts it back to
    int64 on the device."""

    batch = default_collate(samples)
    label = batch.get("label") if isinstance(batch, dict) else None
    if torch.is_tensor(label) and not label.is_floating_point() and label.numel() and 0 <= int(label.min()) and int(label.max()) <= 255:
        batch["label"] = label.to(torch.uint8)
    return batch


def sample_generator(key: Any) -> Tuple[int, Optional[torch.Generator]]:
    """``(index, generator)`` of a dataset key: ``(index, draw_seed)`` from :class:`EpochSampler`,
    or a plain index (validation/test; generator ``None``: torch's global RNG)."""
    if isinstance(key, (tuple, list)):
        i, seed = key
        return int(i), torch.Generator().manual_seed(int(seed))
    return int(key), None
