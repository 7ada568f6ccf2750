"""Loggers and pictures: an offline W&B run holds the metrics, images and artifacts; PNGs whatever the logger."""

import glob
import os
import struct

import pytest

from conftest import REPO, TINY_STUDENT

BLOCK, HEADER = 32768, 7


def wandb_records(path):
    """The protobuf records of an offline ``run-*.wandb`` file (W&B's LevelDB-style log: 32 KiB
    blocks of ``crc32 | length (2 B) | type (1 B) | data`` chunks, type 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = open(path, "rb").read()
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    pos, buf = HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # block trailer padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if (kind == 0 and length == 0) or pos + HEADER + length > len(data):  # end, or a chunk still being written
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record
            buf = b""


def finished_records(path, timeout=60.0):
    """The records of a run file once W&B's service has written its ``exit`` record. ``finish()``
    returns before the service's writer has flushed the last records (artifacts, exit), so a file read
    right away can lack them; after ``timeout`` s, the records there are (the caller's asserts then fail)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        records = list(wandb_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.5)


def _history_items(records):
    """``(key, value_json)`` of every history item (a key may be stored flat or as a nested key)."""
    for r in records:
        if r.WhichOneof("record_type") == "history":
            for i in r.history.item:
                yield i.key or ".".join(i.nested_key), i.value_json


def _history_keys(records):
    return {k for k, _ in _history_items(records)}


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its directories under ``tmp_path``, no run id from the environment."""
    pytest.importorskip("wandb")
    for k, v in {"WANDB_MODE": "offline", "WANDB_DIR": tmp_path, "WANDB_CACHE_DIR": tmp_path / "cache",
                 "WANDB_DATA_DIR": tmp_path / "data"}.items():
        monkeypatch.setenv(k, str(v))
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)


def test_wandb_offline_run_has_metrics_images_and_artifacts(tmp_path, teacher_bank, offline_wandb):
    from lightning_distill.cli import main

    out = tmp_path / "student"
    assert main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={out}", *TINY_STUDENT,
                 f"distill.prototypes={teacher_bank / 'prototypes.pt'}", "logger=wandb", "pictures=2"]) == 0
    runs = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, runs
    records = finished_records(runs[0])
    kinds = {r.WhichOneof("record_type") for r in records}
    assert {"run", "config", "history", "summary", "artifact", "exit"} <= kinds
    keys = _history_keys(records)
    for k in ("train/seg_dice", "train/seg_ce", "train/dist_inter", "train/dist_intra", "train/loss",
              "val/dice", "val/dice_liver", "test/dice_liver", "test/hd95_liver", "test/surface_dice_liver",
              "lr-AdamW", "val/overlays", "prototypes/heatmaps"):
        assert any(key == k or key.startswith(k + ".") for key in keys), f"{k} not logged; have {sorted(keys)[:40]}"
    # the config is the resolved run config, as a plain dict
    cfg_keys = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"distill", "data", "model", "stage"} <= cfg_keys
    arts = {r.artifact.type: [m.path for m in r.artifact.manifest.contents]
            for r in records if r.WhichOneof("record_type") == "artifact"}
    assert arts.get("model") == ["best.ckpt"] and arts.get("prototype-bank") == ["student_prototypes.pt"]
    assert arts.get("teacher-prototype-bank") == ["prototypes.pt"] and "results" in arts
    media = out / "wandb" / os.path.basename(os.path.dirname(runs[0])) / "files" / "media" / "images"
    assert glob.glob(str(media / "val" / "overlays*.png")) and glob.glob(str(media / "mask" / "val" / "overlays*.mask.png"))
    assert glob.glob(str(media / "prototypes" / "heatmaps*.png"))
    # the same pictures as PNG in the run folder
    assert (out / "images" / "overlays.png").stat().st_size > 5000
    assert (out / "images" / "prototypes.png").stat().st_size > 5000
    assert len(glob.glob(str(out / "images" / "steps" / "overlays_step*.png"))) >= 2


def test_resume_continues_the_wandb_run(tmp_path, offline_wandb):
    """A run resumed with ``resume=auto`` logs to the W&B run of the checkpoint (same id), not a new one."""
    import torch

    from conftest import TINY_TEACHER
    from lightning_distill.cli import main

    out = tmp_path / "teacher"
    args = ["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={out}", *TINY_TEACHER,
            "logger=wandb", "pictures=0"]
    assert main([*args, "trainer.max_steps=3"]) == 0
    first = glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(first) == 1, first
    run_id = os.path.basename(first[0])[len("run-"):-len(".wandb")]
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["lightning_distill"]["wandb_run_id"] == run_id
    assert main([*args, "trainer.max_steps=6", "resume=auto"]) == 0
    runs = sorted(glob.glob(str(out / "wandb" / "offline-run-*" / "run-*.wandb")))
    assert len(runs) == 2 and all(os.path.basename(r) == f"run-{run_id}.wandb" for r in runs), runs
    resumed = [r for r in runs if r != first[0]][0]
    steps = [int(v) for k, v in _history_items(finished_records(resumed)) if k == "trainer/global_step"]
    assert steps and min(steps) >= 3, steps  # the resumed run logs from the checkpoint's step on


def test_pictures_without_any_logger_and_for_a_teacher(tmp_path):
    from lightning_distill.cli import main
    from conftest import TINY_TEACHER

    out = tmp_path / "teacher"
    assert main(["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={out}", *TINY_TEACHER,
                 "logger=none", "bank.start=0"]) == 0
    assert (out / "images" / "overlays.png").stat().st_size > 5000  # 3D: the axial slice with most foreground
    assert (out / "images" / "prototypes.png").stat().st_size > 5000  # the bank accumulated so far
    assert not (out / "wandb").exists() and not (out / "logs").exists()


def test_tensorboard_missing_is_a_clear_error(tmp_path):
    import importlib.util

    from lightning_distill.cli import main

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    rc = main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={tmp_path}", *TINY_STUDENT,
               "distill.weight=0", "distill.prototypes=null", "logger=tensorboard"])
    assert rc == 2


def test_a_run_prints_no_lightning_tip_or_logging_interval_warning(tmp_path, caplog):
    """Lightning's litlogger tip and its "fewer batches than log_every_n_steps" warning carry nothing for a user
    of this package (issue 35: both on every run); its other messages stay."""
    import logging
    import warnings

    from lightning_distill.cli import main

    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        assert main(["fit", os.path.join(REPO, "experiments/student.yaml"), f"output_dir={tmp_path}", *TINY_STUDENT,
                     "distill.weight=0", "distill.prototypes=null", "trainer.max_steps=2", "trainer.log_every_n_steps=50"]) == 0
    assert not [w for w in caught if "logging interval" in str(w.message)]
    assert not [r for r in caplog.records if "litlogger" in r.getMessage()]
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")  # Lightning's other lines still pass
    assert all(f.filter(logging.LogRecord(log.name, logging.INFO, "", 0, "GPU available: False", None, None)) for f in log.filters)
