import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("PYTHONHASHSEED", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small sizes so that teacher and student runs take seconds on 2 CPU cores.
TINY_TEACHER = [
    "data.num_subjects=8", "data.shape=[32,32,16]", "data.val_subjects=2", "data.test_subjects=2",
    "data.batch_size=2", "model.kwargs.channels=[8,16,32]", "model.kwargs.strides=[2,2]",
    "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
]
TINY_STUDENT = [
    "data.num_subjects=16", "data.shape=[64,64]", "data.val_subjects=4", "data.test_subjects=4",
    "data.batch_size=4", "model.encoder=resnet18", "model.kwargs.decoder_channels=[32,16,16,8,8]",
    "trainer.max_steps=4", "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
    "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1",
]


class FakeTrainer:
    """The Trainer attributes a PrototypeBank callback reads: one process, step 0 of 10."""

    world_size = 1
    max_steps = 10
    max_epochs = None
    global_step = 0
    current_epoch = 0
    is_global_zero = True


@pytest.fixture
def tiny_teacher():
    return list(TINY_TEACHER)


@pytest.fixture
def tiny_student():
    return list(TINY_STUDENT)


@pytest.fixture(scope="session")
def teacher_bank(tmp_path_factory):
    """A real bank from a tiny teacher run through the CLI (shared by the tests that need one)."""
    from lightning_distill.cli import main

    out = tmp_path_factory.mktemp("teacher")
    rc = main(["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={out}", *TINY_TEACHER])
    assert rc == 0
    return out
