"""Training order and per-sample randomness (lightning_distill/data/sampling.py): the same batches under DDP, after a
resume mid-epoch (with or without loader workers), whatever else drew from the global RNG; the loaders' worker
count and label dtype."""

import json
import os
from types import SimpleNamespace

import lightning as L
import pytest
import torch

from conftest import REPO, TINY_STUDENT
from lightning_distill import devices
from lightning_distill.cli import main
from lightning_distill.data.sampling import EpochSampler, train_loader

STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")


def test_ddp_shards_are_the_single_process_batches():
    """The union of the processes' k-th batches (size B) is the single process's k-th batch (size 2B),
    with the same per-sample draw seeds."""
    n, b = 12, 3
    single = list(EpochSampler(n, seed=5, num_replicas=1, rank=0))
    ranks = [list(EpochSampler(n, seed=5, num_replicas=2, rank=r)) for r in range(2)]
    for k in range(n // (2 * b)):
        union = sorted(ranks[0][k * b:(k + 1) * b] + ranks[1][k * b:(k + 1) * b])
        assert union == sorted(single[k * 2 * b:(k + 1) * 2 * b])
    odd = [list(EpochSampler(7, num_replicas=2, rank=r)) for r in range(2)]
    assert len(odd[0]) == len(odd[1]) == 4  # padded like DistributedSampler


def test_order_depends_on_seed_and_epoch_only():
    a, b = EpochSampler(20, seed=1), EpochSampler(20, seed=1)
    torch.manual_seed(123)  # the global RNG plays no part
    assert list(a) == list(b)
    b.set_epoch(1)
    assert [i for i, _ in a] != [i for i, _ in b]
    assert [i for i, _ in a] != [i for i, _ in EpochSampler(20, seed=2)]
    assert sorted(i for i, _ in b) == list(range(20))


class _Keys(torch.utils.data.Dataset):
    """Returns the sampler's ``(index, draw_seed)`` key itself."""

    def __len__(self):
        return 10

    def __getitem__(self, key):
        return torch.tensor(key)


def test_resumable_loader_skips_the_batches_already_trained_on():
    data = _Keys()
    first = train_loader(data, EpochSampler(10, seed=3), batch_size=3)
    first.sampler.set_epoch(2)
    full = [batch for batch in first]
    it = iter(first)
    seen = [next(it), next(it)]
    state = first.state_dict()
    assert state["_sampler_iter_state"]["sampler_state"] == {"epoch": 2, "yielded": 6}  # the sampler's position
    again = train_loader(data, EpochSampler(10, seed=3), batch_size=3)
    again.load_state_dict(state)
    again.sampler.set_epoch(2)
    rest = list(again)
    assert [torch.equal(x, y) for x, y in zip(seen + rest, full)] == [True] * len(full)
    again.sampler.set_epoch(3)  # the skip applies once, to the restored epoch
    assert len(list(again)) == 4
    older = train_loader(data, EpochSampler(10, seed=3), batch_size=3)
    older.load_state_dict({"epoch": 2, "batches": 2})  # the state our former loader wrote into checkpoints
    older.sampler.set_epoch(2)
    assert [torch.equal(x, y) for x, y in zip(list(older), rest)] == [True] * len(rest)


def test_sampler_state_restores_its_epoch_and_rolls_a_finished_epoch_over():
    """The epoch comes back with the position (a loader with workers prefetches before Lightning's
    ``set_epoch``); an epoch handed out entirely resumes at the start of the next one."""
    s = EpochSampler(10, seed=3, num_replicas=2, rank=1)
    s.set_epoch(4)
    head = [k for _, k in zip(range(2), s)]
    assert s.state_dict() == {"epoch": 4, "yielded": 2}
    again = EpochSampler(10, seed=3, num_replicas=2, rank=1)
    again.load_state_dict(s.state_dict())
    assert again.epoch == 4 and head + list(again) == list(s)
    again.load_state_dict({"epoch": 4, "yielded": 5})  # all 5 of this rank's samples
    fresh = EpochSampler(10, seed=3, num_replicas=2, rank=1)
    fresh.set_epoch(5)
    assert again.epoch == 5 and list(again) == list(fresh) and len(list(fresh)) == 5
    with pytest.raises(KeyError, match="'epoch' and 'yielded'"):
        again.load_state_dict({"batches": 2})


def test_lightning_may_swap_the_sampler(tmp_path):
    """``trainer.overfit_batches`` makes Lightning rebuild the loader with a sequential sampler: it
    then trains as a plain DataLoader (no resume position)."""
    assert main(["fit", STUDENT_YAML, f"output_dir={tmp_path}", *TINY_STUDENT, "distill.weight=0", "distill.prototypes=null",
                 "trainer.overfit_batches=1", "trainer.max_steps=2", "pictures=0"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2


class _Recorder(L.LightningModule):
    """Records the keys of every training batch it is given."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen = []

    def training_step(self, batch, i):
        self.seen.append((self.current_epoch, batch[:, 0].tolist()))
        return (self.w - 1).pow(2).sum()

    def validation_step(self, batch, i):
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _keys_fit(out, max_steps, workers, every, val, ckpt=None):
    from lightning_distill.callbacks import LastCheckpoint

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return train_loader(_Keys(), EpochSampler(10, seed=3), batch_size=3, num_workers=workers)

        def val_dataloader(self):
            return torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=2)

    module = _Recorder()
    L.Trainer(max_steps=max_steps, max_epochs=-1, logger=False, enable_progress_bar=False, enable_model_summary=False,
              num_sanity_val_steps=0, accelerator="cpu", devices=1, callbacks=[LastCheckpoint(out, every_n_steps=every)],
              **({"limit_val_batches": 0} if val is None else {"val_check_interval": val})).fit(module, Data(), ckpt_path=ckpt)
    return module.seen


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop,every,val", [(6, 1, None), (8, 1, None), (4, None, 1.0), (6, None, 2)],
                         ids=["mid-epoch", "epoch-end", "after-epoch-end-validation", "after-mid-epoch-validation"])
def test_lightning_resumes_the_loader_where_the_checkpoint_was_written(tmp_path, workers, stop, every, val):
    """Through Lightning (4 batches an epoch): a run stopped at step ``stop`` and resumed from its last.ckpt
    trains on the batches (and epochs) the uninterrupted run trained on, with or without loader workers."""
    full = _keys_fit(tmp_path / "full", 10, workers, every, val)
    first = _keys_fit(tmp_path / "part", stop, workers, every, val)
    rest = _keys_fit(tmp_path / "part", 10, workers, every, val, ckpt=tmp_path / "part" / "last.ckpt")
    assert len(full) == 10 and len(first) == stop
    assert first + rest == full


def test_augmentation_is_a_function_of_the_draw_seed():
    from lightning_distill.data.datamodules import SubjectDataset
    from lightning_distill.data.phantom import PhantomSpec
    from lightning_distill.data.sources import PhantomSource

    source = PhantomSource(PhantomSpec(), 2, (32, 32))
    ds = SubjectDataset(source, source.ids, augment=True)
    x = ds[(0, 42)]["image"]
    torch.rand(100)  # consuming the global RNG changes nothing
    assert torch.equal(x, ds[(0, 42)]["image"])
    assert not torch.equal(x, ds[(0, 43)]["image"])


# ------------------------------------------------------------------------------------------ loaders
def test_loader_workers_and_compact_labels(monkeypatch):
    from lightning_distill.config import load_config
    from lightning_distill.data.sampling import compact_label_collate
    from lightning_distill.data.datamodules import SegmentationDataModule
    from lightning_distill.data.build import loader_workers

    cfg = load_config(os.path.join(REPO, "experiments/student.yaml"), ["trainer.devices=2"])
    assert cfg.data.num_workers == "auto"
    if not torch.cuda.is_available():
        assert loader_workers(cfg) == 0  # CPU: the cores train, the loaders keep ahead without workers
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert loader_workers(cfg) == 7  # 16 cores for 2 devices, one left for the training process
    cfg.data.num_workers = 3
    assert loader_workers(cfg) == 3
    cfg.data.num_workers = "many"
    with pytest.raises(ValueError, match="data.num_workers"):
        loader_workers(cfg)
    # GPU loaders send labels as uint8 (the ignore index 255 fits); the module casts them back on the device
    samples = [{"image": torch.zeros(1, 4, 4), "label": torch.tensor([[[0, 3], [255, 1]]])} for _ in range(2)]
    batch = compact_label_collate(samples)
    assert batch["label"].dtype == torch.uint8
    back = SegmentationDataModule.on_after_batch_transfer(SimpleNamespace(memory_format=None), batch, 0)["label"]
    assert back.dtype == torch.int64 and torch.equal(back, torch.stack([s["label"] for s in samples]))
    wide = compact_label_collate([{"label": torch.tensor([300])}])
    assert wide["label"].dtype == torch.int64
