"""``LastCheckpoint``: when ``last.ckpt`` is written, what it holds, and that it stays on Lightning's public API; the
time-based cadence of checkpoints and pictures."""

import ast
import inspect
import os
import textwrap

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from conftest import REPO, TINY_TEACHER
from lightning_distill.callbacks import AtomicCheckpointIO, LastCheckpoint


class RecordingIO(AtomicCheckpointIO):
    """The trainer's CheckpointIO (atomic writes) that also records ``(global_step, stage, has optimizer state)``."""

    def __init__(self, trainer_ref):
        super().__init__()
        self.trainer_ref, self.saves = trainer_ref, []

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        stage = self.trainer_ref[0].state.stage
        stage = str(stage.value) if stage else None
        self.saves.append((checkpoint["global_step"], stage, "optimizer_states" in checkpoint))
        super().save_checkpoint(checkpoint, path, storage_options)


class Tiny(L.LightningModule):
    """10 training samples in batches of 2 (5 batches an epoch), 2 validation batches."""

    def __init__(self, manual: bool = False):
        super().__init__()
        self.a, self.b = torch.nn.Linear(2, 1), torch.nn.Linear(2, 1)
        self.automatic_optimization = not manual

    def training_step(self, batch, batch_idx):
        (x,) = batch
        if self.automatic_optimization:
            return (self.a(x) + self.b(x)).pow(2).mean()
        for opt, net in zip(self.optimizers(), (self.a, self.b)):  # two optimiser steps a batch
            opt.zero_grad()
            self.manual_backward(net(x).pow(2).mean())
            opt.step()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self.a(batch[0]).pow(2).mean())

    def configure_optimizers(self):
        if self.automatic_optimization:
            return torch.optim.SGD(self.parameters(), lr=0.1)
        return [torch.optim.SGD(self.a.parameters(), lr=0.1), torch.optim.SGD(self.b.parameters(), lr=0.1)]

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(10, 2)), batch_size=2)

    def val_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)


def _fit(tmp_path, every=None, weights_only=False, module=None, fn="fit", **trainer_args):
    """The saves of ``last.ckpt`` in one run: ``[(global_step, stage, has optimizer state)]``, and the callback."""
    ref = []
    io = RecordingIO(ref)
    cb = LastCheckpoint(tmp_path / "checkpoints", every_n_steps=every, weights_only=weights_only)
    args = {"max_steps": 12, "num_sanity_val_steps": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False, "accelerator": "cpu", **trainer_args}
    trainer = L.Trainer(default_root_dir=str(tmp_path), callbacks=[cb], plugins=[io], **args)
    ref.append(trainer)
    getattr(trainer, fn)(module or Tiny())
    return io.saves, cb


def _steps(saves):
    return [(step, stage) for step, stage, _ in saves]


def test_every_n_steps_after_every_validation_and_at_the_end(tmp_path):
    torch.manual_seed(0)
    saves, cb = _fit(tmp_path, every=2)
    # steps 2, 4, 6, ...; after each validation (end of epoch: steps 5 and 10, also right after the
    # step-10 save); not again at train end (step 12 was just written)
    assert _steps(saves) == [(2, "train"), (4, "train"), (5, "validate"), (6, "train"), (8, "train"), (10, "train"),
                             (10, "validate"), (12, "train")]
    assert all(opt for *_, opt in saves)
    path = tmp_path / "checkpoints" / "last.ckpt"
    assert cb.last_model_path == str(path.resolve()) and path.is_file()
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]  # no temporary file left, no versions
    ckpt = torch.load(path, weights_only=False)
    assert ckpt["global_step"] == 12 and ckpt["callbacks"][cb.state_key]["last_model_path"] == cb.last_model_path


def test_without_every_n_steps_after_validation_and_at_the_end(tmp_path):
    saves, _ = _fit(tmp_path, every=None)
    assert _steps(saves) == [(5, "validate"), (10, "validate"), (12, "train")]
    saves, _ = _fit(tmp_path / "b", every=None, max_steps=10)  # ends on a validation: written once at step 10
    assert _steps(saves) == [(5, "validate"), (10, "validate")]


def test_mid_epoch_validation_and_gradient_accumulation(tmp_path):
    # validation every 2 batches of 5 (steps 2, 4, 7); the last step (7) was written after its validation
    saves, _ = _fit(tmp_path, every=3, val_check_interval=2, max_steps=7)
    assert _steps(saves) == [(2, "validate"), (3, "train"), (4, "validate"), (6, "train"), (7, "validate")]
    # two batches an optimiser step: the step count repeats, last.ckpt is written once per step
    saves, _ = _fit(tmp_path / "acc", every=1, accumulate_grad_batches=2, max_steps=4, check_val_every_n_epoch=10)
    assert _steps(saves) == [(1, "train"), (2, "train"), (3, "train"), (4, "train")]


def test_manual_optimisation_counts_optimiser_steps(tmp_path):
    """CMEDL steps several optimisers a batch: ``every_n_steps`` counts ``trainer.global_step``."""
    saves, _ = _fit(tmp_path, every=4, module=Tiny(manual=True), max_steps=12)
    assert _steps(saves) == [(4, "train"), (8, "train"), (10, "validate"), (12, "train")]


def test_weights_only(tmp_path):
    saves, _ = _fit(tmp_path, every=2, weights_only=True, max_steps=4)
    assert [s for s, *_ in saves] == [2, 4] and not any(opt for *_, opt in saves)
    assert "optimizer_states" not in torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)


@pytest.mark.parametrize("how", ["sanity", "fast_dev_run", "validate", "no_steps"])
def test_never_written_outside_training(tmp_path, how):
    kwargs = {"sanity": {"num_sanity_val_steps": 2, "max_steps": 1, "limit_val_batches": 0},
              "fast_dev_run": {"fast_dev_run": 3},
              "validate": {"fn": "validate"},
              "no_steps": {"max_steps": 0}}[how]
    if how == "sanity":  # the sanity check validates; a real validation would save, so there is none
        saves, _ = _fit(tmp_path, every=1, **{**kwargs, "limit_val_batches": 1.0, "check_val_every_n_epoch": 10})
        assert _steps(saves) == [(1, "train")]
        return
    saves, cb = _fit(tmp_path, every=1, **kwargs)
    assert saves == [] and cb.last_model_path == "" and not (tmp_path / "checkpoints").exists()


def test_state_key_is_the_one_of_earlier_versions_and_their_state_loads(tmp_path):
    """Checkpoints written when LastCheckpoint was a ModelCheckpoint resume without a missing-callback warning."""
    assert LastCheckpoint(tmp_path, every_n_steps=2).state_key == (
        "LastCheckpoint{'monitor': None, 'mode': 'min', 'every_n_train_steps': 2, 'every_n_epochs': 0, "
        "'train_time_interval': None}")
    assert LastCheckpoint(tmp_path).state_key.endswith("'every_n_train_steps': 0, 'every_n_epochs': 0, "
                                                       "'train_time_interval': None}")
    old = {"monitor": None, "best_model_score": None, "best_model_path": "/old/checkpoints/last.ckpt",
           "current_score": None, "dirpath": "/old/checkpoints", "best_k_models": {}, "kth_best_model_path": "",
           "kth_value": torch.tensor(float("inf")), "last_model_path": ""}
    cb = LastCheckpoint(tmp_path)
    cb.load_state_dict(old)
    assert cb.last_model_path == "/old/checkpoints/last.ckpt"
    assert cb.state_dict() == {"dirpath": cb.dirpath, "last_model_path": "/old/checkpoints/last.ckpt"}
    with pytest.raises(ValueError, match="every_n_steps"):
        LastCheckpoint(tmp_path, every_n_steps=-1)


def test_uses_no_private_lightning_names():
    """Private members of ModelCheckpoint/Trainer change between Lightning releases: LastCheckpoint uses none
    (no ``x._name`` attribute access; dunders such as ``super().__init__`` are fine)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(LastCheckpoint)))
    private = sorted({f"{ast.unparse(node.value)}.{node.attr}" for node in ast.walk(tree)
                      if isinstance(node, ast.Attribute) and node.attr.startswith("_")
                      and not (node.attr.startswith("__") and node.attr.endswith("__"))})
    assert private == []
    assert not any(cls.__module__.startswith("lightning") and cls.__name__ == "ModelCheckpoint"
                   for cls in LastCheckpoint.__mro__)


def test_time_based_checkpoint_and_picture_cadence(tmp_path, monkeypatch):
    """checkpoint.min_minutes / pictures_min_minutes (auto: 0 on CPU, 5 and 10 on a GPU): last.ckpt every 2 steps
    and pictures after every validation by default here; with 60 minutes, last.ckpt only at the end and pictures
    at the first validation and the end."""
    from lightning_distill.cli import main
    from lightning_distill.callbacks import AtomicCheckpointIO

    writes = []
    real = AtomicCheckpointIO.save_checkpoint
    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint",
                        lambda self, ckpt, path, *a, **k: (writes.append((os.path.basename(str(path)), ckpt["global_step"])),
                                                           real(self, ckpt, path, *a, **k))[1])
    run = ["fit", os.path.join(REPO, "experiments/teacher.yaml"), *TINY_TEACHER, "trainer.max_steps=6",
           "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=2", "checkpoint.every_n_steps=2",
           "data.num_subjects=12", "pictures=1"]
    assert main([*run, f"output_dir={tmp_path / 'a'}"]) == 0
    assert sorted({s for n, s in writes if n == "last.ckpt"}) == [2, 4, 6]
    assert len(list((tmp_path / "a" / "images" / "steps").glob("overlays_step*.png"))) == 3
    writes.clear()
    assert main([*run, f"output_dir={tmp_path / 'b'}", "checkpoint.min_minutes=60", "pictures_min_minutes=60"]) == 0
    assert [s for n, s in writes if n == "last.ckpt"] == [6]  # the final write is never skipped
    assert sorted(p.name for p in (tmp_path / "b" / "images" / "steps").glob("overlays_step*.png")) == [
        "overlays_step000002.png", "overlays_step000006.png"]
    assert main([*run, f"output_dir={tmp_path / 'c'}", "checkpoint.min_minutes=soon"]) == 2
