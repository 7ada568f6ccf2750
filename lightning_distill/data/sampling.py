"""Training order and per-sample randomness as a pure function of ``(seed, epoch, position)``.

Three things follow from it, and each is tested (``tests/test_reliability.py``):

* **Resume mid-epoch.** :class:`ResumableLoader` counts the batches it has handed to the training
  loop; Lightning stores that count in every checkpoint (the loader has ``state_dict`` /
  ``load_state_dict``) and, on resume, the sampler skips the batches already trained on. The
  remaining batches, and their augmentations, are the ones the uninterrupted run would have seen.
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
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler


class EpochSampler(DistributedSampler):
    """Seeded, epoch-dependent order of a dataset's indices for one process, yielding ``(index, draw_seed)``.

    It is a ``DistributedSampler`` so that Lightning keeps it under DDP instead of wrapping it; unlike
    torch's, it needs no process group (``num_replicas`` and ``rank`` are given) and it yields a
    per-position seed for the dataset's random draws.

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
        self.skip = 0  # samples of this process to leave out of the next epoch's start (resume)

    def __len__(self) -> int:
        return self.num_samples

    def set_epoch(self, epoch: int) -> None:
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
        mine = range(self.rank, self.total_size, self.num_replicas)
        skip, self.skip = self.skip, 0
        for pos in list(mine)[skip:]:
            yield int(order[pos]), int(seeds[pos])


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` over an :class:`EpochSampler` whose position survives a restart.

    ``state_dict()`` is ``{"epoch", "batches"}``: the batches of the current epoch handed out so far.
    Lightning fetches sized loaders without prefetching, so that is the number trained on when a
    checkpoint is written. ``load_state_dict`` makes the next pass over that epoch skip them.
    """

    def __init__(self, dataset, sampler: Optional[EpochSampler] = None, batch_size: int = 1, **kwargs: Any):
        # Lightning may rebuild the loader with another sampler (e.g. ``trainer.overfit_batches``);
        # it then works as a plain DataLoader, without a position to resume from.
        super().__init__(dataset, sampler=sampler, batch_size=batch_size, **kwargs)
        self._epoch, self._batches = 0, 0
        self._pending: Optional[Dict[str, int]] = None

    def __iter__(self):
        sampler = self.sampler
        if not isinstance(sampler, EpochSampler):
            yield from super().__iter__()
            return
        skip = 0
        if self._pending is not None:
            if self._pending["epoch"] == sampler.epoch:
                skip = self._pending["batches"]
            self._pending = None
        sampler.skip = skip * self.batch_size
        self._epoch, self._batches = sampler.epoch, skip
        for batch in super().__iter__():
            self._batches += 1
            yield batch

    def state_dict(self) -> Dict[str, int]:
        return {"epoch": self._epoch, "batches": self._batches}

    def load_state_dict(self, state: Dict[str, int]) -> None:
        self._pending = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


def sample_generator(key: Any) -> Tuple[int, Optional[torch.Generator]]:
    """``(index, generator)`` of a dataset key: ``(index, draw_seed)`` from :class:`EpochSampler`,
    or a plain index (validation/test; generator ``None``: torch's global RNG)."""
    if isinstance(key, (tuple, list)):
        i, seed = key
        return int(i), torch.Generator().manual_seed(int(seed))
    return int(key), None
