"""Reliability: resume after SIGKILL, DDP, determinism, safe artifacts, checkpoint contents, bf16.

Figures quoted in docs/reliability.md come from these tests (run `make test-slow`).
"""

import csv
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from conftest import REPO, TINY_STUDENT, TINY_TEACHER
from lightning_distill.cli import main
from lightning_distill.data.sampling import EpochSampler, train_loader
from lightning_distill.io import atomic_write, write_json
from lightning_distill.bank import load_bank, save_bank

TEACHER_YAML = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")

# 10 training subjects in batches of 2: 5 batches an epoch; last.ckpt every 2 steps; killed in step 7
RESUME_TEACHER = [*TINY_TEACHER, "data.num_subjects=14", "trainer.max_steps=12", "checkpoint.every_n_steps=2",
                  "trainer.deterministic=true", "pictures=0"]
RESUME_STUDENT = [*TINY_STUDENT, "data.num_subjects=28", "trainer.max_steps=12", "checkpoint.every_n_steps=2",
                  "trainer.deterministic=true", "pictures=0"]  # 20 training slices in batches of 4

KILL_SCRIPT = """
import os, signal, sys
from lightning_distill.bank.callback import PrototypeBank
step = int(os.environ["LD_KILL_AT_STEP"])
orig = PrototypeBank.on_train_batch_end
def kill_after(self, trainer, *args):  # the bank has seen the batch; no checkpoint has stored it
    orig(self, trainer, *args)
    if trainer.global_step == step:
        os.kill(os.getpid(), signal.SIGKILL)
PrototypeBank.on_train_batch_end = kill_after
from lightning_distill.cli import main
sys.exit(main(sys.argv[1:]))
"""

# Records every file this process (a DDP rank) opens for writing or renames into place under LD_AUDIT_ROOT.
AUDIT_SITECUSTOMIZE = """
import atexit, json, os, sys
_root, _log, _seen = os.environ["LD_AUDIT_ROOT"], os.environ["LD_AUDIT_LOG"], []
def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            mode is None and isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
    elif event == "os.rename":
        path, writes = args[1], True
    else:
        return
    if writes and isinstance(path, (str, bytes, os.PathLike)) and os.fsdecode(path).startswith(_root):
        _seen.append(os.fsdecode(path))
sys.addaudithook(_hook)
@atexit.register
def _dump():
    rank = os.environ.get("LOCAL_RANK", "0")
    with open(f"{_log}.{os.getpid()}", "w") as f:
        json.dump({"rank": rank, "files": sorted(set(_seen))}, f)
"""


def _env(**extra):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg", **extra}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (extra.get("PYTHONPATH"), REPO, os.environ.get("PYTHONPATH")) if p)
    return env


def _cli(args, env=None, script=None, timeout=600):
    cmd = [sys.executable, script] if script else [sys.executable, "-m", "lightning_distill.cli"]
    return subprocess.run(cmd + list(args), env=env or _env(), capture_output=True, text=True, timeout=timeout)


def _ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def _max_weight_diff(a, b):
    sa, sb = _ckpt(a)["state_dict"], _ckpt(b)["state_dict"]
    assert sa.keys() == sb.keys()
    return max((sa[k].double() - sb[k].double()).abs().max().item() for k in sa if sa[k].numel())


def _csv_rows(run):
    with open(run / "logs" / "metrics.csv", newline="") as f:
        return sorted(tuple(sorted((k, v) for k, v in r.items() if v != "")) for r in csv.DictReader(f))


# ------------------------------------------------------------------------------------------ sampling
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


# ------------------------------------------------------------------------------------------ resume
@pytest.mark.slow
@pytest.mark.parametrize("stage", ["teacher", "student", "transfer"])
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, stage, teacher_bank, request):
    """A run SIGKILLed in training step 7 (mid-epoch; last.ckpt from step 6) and re-run with resume=auto
    ends with the same weights, bank, test metrics and CSV log as a run that was never interrupted."""
    if stage == "teacher":
        yaml, over, bank_file = TEACHER_YAML, RESUME_TEACHER, "prototypes.pt"
    else:
        yaml, bank_file = STUDENT_YAML, "student_prototypes.pt"
        over = [*RESUME_STUDENT, f"distill.prototypes={teacher_bank / 'prototypes.pt'}"]
    if stage == "transfer":  # teacher-labelled slices and union slices drawn per sample, beside prototype DIST
        folder = request.getfixturevalue("teach_folder")
        over += [f"transfer.slices={folder}", f"transfer.union={folder}", "transfer.ratio=2"]
    full, part = tmp_path / "full", tmp_path / "part"
    r = _cli(["fit", yaml, f"output_dir={full}", *over])
    assert r.returncode == 0, r.stderr[-3000:]
    script = tmp_path / "kill_at_step.py"
    script.write_text(KILL_SCRIPT)
    r = _cli(["fit", yaml, f"output_dir={part}", *over], env=_env(LD_KILL_AT_STEP="7"), script=str(script))
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr[-3000:])
    killed = _ckpt(part / "checkpoints" / "last.ckpt")
    batches_per_epoch = 5
    assert killed["global_step"] == 6 and killed["global_step"] % batches_per_epoch != 0  # mid-epoch
    assert not (part / "results.json").exists()
    r = _cli(["fit", yaml, f"output_dir={part}", "resume=auto", *over])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming from" in r.stdout and "(step 6, epoch 1)" in r.stdout
    wdiff = _max_weight_diff(full / "checkpoints" / "last.ckpt", part / "checkpoints" / "last.ckpt")
    a, b = load_bank(full / bank_file), load_bank(part / bank_file)
    print(f"{stage} resumed at step 6 of 12 vs uninterrupted: weights max abs diff {wdiff}, bank max abs diff "
          f"{(a.prototypes - b.prototypes).abs().max().item()}, {len(_csv_rows(part))} CSV rows")
    assert wdiff == 0.0
    assert torch.equal(a.prototypes, b.prototypes) and torch.equal(a.counts, b.counts)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (full, part))
    assert ra["test"] == rb["test"] and ra["steps"] == rb["steps"] == 12
    assert _csv_rows(full) == _csv_rows(part)  # nothing of the killed run's log lost, nothing twice


def test_resume_errors_are_clear(tmp_path, teacher_bank, capsys):
    ckpt_path = teacher_bank / "checkpoints" / "last.ckpt"
    ckpt = _ckpt(ckpt_path)
    names = list(ckpt["lightning_distill"]["class_names"])
    torch.save(dict(ckpt, lightning_distill={**ckpt["lightning_distill"], "class_names": names[:3]}),
               tmp_path / "other_classes.ckpt")
    torch.save({k: v for k, v in ckpt.items() if k not in ("optimizer_states", "lr_schedulers", "loops")},
               tmp_path / "weights.ckpt")
    data = ckpt_path.read_bytes()
    (tmp_path / "cut.ckpt").write_bytes(data[: len(data) // 3])
    out = str(tmp_path / "run")
    for name, message in [("other_classes.ckpt", f"other_classes.ckpt was trained on the classes {names[:3]}, this run "
                                                 f"segments {names} \\(not in the checkpoint: {names[3:]}"),
                          ("weights.ckpt", "weights.ckpt holds weights only"),
                          ("cut.ckpt", "cut.ckpt' could not be read .*truncated"),
                          ("nothing.ckpt", "nothing.ckpt' does not exist")]:
        assert main(["fit", TEACHER_YAML, f"output_dir={out}", f"resume={tmp_path / name}", *TINY_TEACHER]) == 2
        err = capsys.readouterr().err
        assert re.search(message.replace("[", "\\[").replace("]", "\\]"), err), err
    run = tmp_path / "run"  # refused before training, and before the folder's config.yaml is replaced
    assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()


def test_module_refuses_a_checkpoint_of_another_class_set(teacher_bank):
    """Lightning calls ``on_load_checkpoint`` before loading weights: the class check comes first."""
    from lightning_distill.modules import SegmentationModule

    ckpt = _ckpt(teacher_bank / "checkpoints" / "last.ckpt")
    module = SegmentationModule(torch.nn.Conv3d(1, 3, 1), ["background", "liver", "kidney"])
    with pytest.raises(ValueError, match="not in the checkpoint: \\['kidney'\\]"):
        module.on_load_checkpoint(ckpt)


# ------------------------------------------------------------------------------------------ checkpoints
def test_checkpoints_carry_config_classes_bank_and_version(teacher_bank):
    from lightning_distill import __version__
    from lightning_distill.config import load_config_dict

    exported = load_bank(teacher_bank / "prototypes.pt")
    for name in ("best.ckpt", "last.ckpt"):
        ckpt = _ckpt(teacher_bank / "checkpoints" / name)
        meta = ckpt["lightning_distill"]
        assert meta["version"] == __version__
        assert meta["class_names"] == exported.class_names
        assert load_config_dict(meta["config"]).stage == "teacher"  # the resolved config validates
    carried = load_bank(teacher_bank / "checkpoints" / "last.ckpt")  # the bank as it was at the end
    assert torch.equal(carried.prototypes, exported.prototypes) and torch.equal(carried.counts, exported.counts)


# ------------------------------------------------------------------------------------------ safe artifacts
@pytest.mark.parametrize("kind", ["bank", "json", "bytes", "checkpoint"])
def test_a_crash_while_writing_keeps_the_previous_file(tmp_path, kind, monkeypatch):
    from lightning_distill.bank import Bank
    from lightning_distill.callbacks import AtomicCheckpointIO

    target = tmp_path / {"bank": "prototypes.pt", "json": "results.json", "bytes": "config.yaml",
                         "checkpoint": "last.ckpt"}[kind]
    bank = Bank(torch.eye(3), torch.ones(3), ["background", "a", "b"], 1.0, "prob")
    write = {"bank": lambda: save_bank(target, bank), "json": lambda: write_json(target, {"dice": 0.5}),
             "bytes": lambda: atomic_write(target, lambda tmp: Path(tmp).write_text("seed: 0\n")),
             "checkpoint": lambda: AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, target)}[kind]
    write()
    before = target.read_bytes()

    def crash(obj, f, *a, **k):  # half the bytes reach the disk, then the process dies
        Path(f).write_bytes(b"\x80partial")
        raise KeyboardInterrupt

    def crash_text(self, *a, **k):
        Path.write_bytes(self, b"{\"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    monkeypatch.setattr(Path, "write_text", crash_text)
    with pytest.raises(KeyboardInterrupt):
        write()
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]  # no temp file left behind


def test_sigkill_while_writing_keeps_the_previous_file(tmp_path):
    """A process killed in the middle of a (slow, chunked) atomic write: the old file is untouched."""
    target = tmp_path / "prototypes.pt"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import time
        from lightning_distill.io import atomic_write
        def slow(tmp):
            with open(tmp, "wb") as f:
                for _ in range(1000):
                    f.write(b"x" * 4096); f.flush(); time.sleep(0.01)
        atomic_write({str(target)!r}, slow)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], env=_env())
    deadline = time.time() + 60
    while time.time() < deadline and not any(p.name.startswith(".prototypes.pt.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert target.read_bytes() == b"previous"
    leftovers = [p for p in tmp_path.iterdir() if p != target]
    assert leftovers and all(p.name.startswith(".prototypes.pt.") for p in leftovers)  # the temp file, never the target


def test_truncated_artifacts_give_clear_errors(tmp_path, teacher_bank):
    from lightning_distill.checkpoints import load_checkpoint
    from lightning_distill.lab.report import load_results

    for name, load, message in [("results.json", load_results, "truncated or corrupt"),
                                ("prototypes.pt", load_bank, "truncated or not a bank"),
                                ("checkpoints/last.ckpt", load_checkpoint, "truncated or not a checkpoint")]:
        data = (teacher_bank / name).read_bytes()
        cut = tmp_path / Path(name).name
        cut.write_bytes(data[: len(data) // 2])
        with pytest.raises(ValueError, match=f"{cut.name}.*{message}"):
            load(cut)


# ------------------------------------------------------------------------------------------ determinism
@pytest.mark.slow
def test_same_seed_same_metrics_other_seed_differs(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert main(["fit", TEACHER_YAML, f"output_dir={tmp_path / name}", f"seed={seed}", "pictures=0",
                     "trainer.deterministic=true", *TINY_TEACHER]) == 0
        runs[name] = (json.loads((tmp_path / name / "results.json").read_text())["test"],
                      load_bank(tmp_path / name / "prototypes.pt").prototypes)
    print("test Dice seed 0, seed 0 again, seed 1:", [runs[k][0]["dice_mean"] for k in "abc"])
    assert runs["a"][0] == runs["b"][0] and torch.equal(runs["a"][1], runs["b"][1])
    assert runs["a"][0]["dice_mean"] != runs["c"][0]["dice_mean"]
    assert not torch.equal(runs["a"][1], runs["c"][1])


# ------------------------------------------------------------------------------------------ DDP
def _audit_env(tmp_path, root):
    site = tmp_path / "audit_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(AUDIT_SITECUSTOMIZE)
    return _env(PYTHONPATH=str(site), LD_AUDIT_ROOT=str(root), LD_AUDIT_LOG=str(tmp_path / "audit"))


def _writes_by_rank(tmp_path):
    by_rank = {}
    for p in tmp_path.glob("audit.*"):
        rec = json.loads(p.read_text())
        by_rank.setdefault(rec["rank"], []).extend(rec["files"])
    return by_rank


DDP_TEACHER = [*TINY_TEACHER, "data.num_subjects=12", "trainer.max_steps=6", "trainer.deterministic=true",
               "trainer.accelerator=cpu", "pictures=2"]


@pytest.mark.slow
def test_ddp_teacher_bank_equals_single_process(tmp_path):
    """2 gloo processes with batches of 2 vs 1 process with batches of 4 over the same data, default loss.

    The union of the processes' batches is the single process's batch (same samples, same
    augmentations); the cross-entropy is a mean over pixels and the Dice is computed over the global
    batch, so both runs follow the same trajectory up to float rounding, and so do their banks."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = _cli(["fit", TEACHER_YAML, f"output_dir={single}", *DDP_TEACHER, "data.batch_size=4", "trainer.devices=1"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli(["fit", TEACHER_YAML, f"output_dir={ddp}", *DDP_TEACHER, "data.batch_size=2", "trainer.devices=2",
              "trainer.strategy=ddp"], env=_audit_env(tmp_path, ddp))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in r.stderr + r.stdout
    a, b = load_bank(single / "prototypes.pt"), load_bank(ddp / "prototypes.pt")
    diff = (a.prototypes - b.prototypes).abs().max().item()
    wa, wb = (_ckpt(d / "checkpoints/last.ckpt")["state_dict"] for d in (single, ddp))
    rel = (sum((wa[k].double() - wb[k].double()).pow(2).sum() for k in wa) / sum(wa[k].double().pow(2).sum() for k in wa)) ** 0.5
    print(f"bank max abs diff DDP vs single: {diff:.1e}; weights max abs diff "
          f"{_max_weight_diff(single / 'checkpoints/last.ckpt', ddp / 'checkpoints/last.ckpt'):.1e}, relative L2 {rel:.1e}")
    assert torch.equal(a.counts, b.counts) and a.counts.sum() > 0
    assert diff < 1e-5
    writes = _writes_by_rank(tmp_path)
    assert set(writes) == {"0", "1"}, writes.keys()
    assert writes["1"] == [], writes["1"]  # rank 1 wrote nothing under the output folder
    names = {Path(p).name for p in writes["0"]}
    assert {"config.yaml", "prototypes.pt", "results.json", "last.ckpt", "best.ckpt", "overlays.png"} <= names


@pytest.mark.slow
@pytest.mark.parametrize("method", ["prototype", "sikd", "transfer"])
def test_ddp_student_trains(tmp_path, teacher_bank, method, request):
    out = tmp_path / "student"
    if method == "prototype":
        yaml, extra, term = STUDENT_YAML, [f"distill.prototypes={teacher_bank / 'prototypes.pt'}"], "train/dist_inter"
    elif method == "transfer":  # teacher-labelled slices and union slices: each process draws its samples' own
        folder = request.getfixturevalue("teach_folder")
        yaml, term = STUDENT_YAML, "train/transfer"
        extra = ["distill.weight=0", "distill.prototypes=null", f"transfer.slices={folder}", f"transfer.union={folder}"]
    else:  # SIKD: a frozen 2D teacher network, its features found by a forward hook
        assert main(["fit", os.path.join(REPO, "experiments/sikd_teacher.yaml"), f"output_dir={tmp_path / 'sikd_teacher'}",
                     "pictures=0", *TINY_STUDENT]) == 0
        yaml, term = os.path.join(REPO, "experiments/sikd.yaml"), "train/sikd_mse"
        extra = [f"distill.teacher={tmp_path / 'sikd_teacher' / 'checkpoints' / 'last.ckpt'}"]
    r = _cli(["fit", yaml, f"output_dir={out}", *TINY_STUDENT, *extra, "data.batch_size=2", "trainer.devices=2",
              "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.max_steps=6"], env=_audit_env(tmp_path, out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 6 and res["test"]["num_cases"] == 4  # every test case once, gathered from both processes
    with open(out / "logs" / "metrics.csv", newline="") as f:
        values = [float(r[term]) for r in csv.DictReader(f) if r.get(term)]
    assert values and all(v == v for v in values)
    writes = _writes_by_rank(tmp_path)
    assert set(writes) == {"0", "1"} and writes["1"] == [], writes.get("1")


# ------------------------------------------------------------------------------------------ precision
@pytest.mark.slow
def test_bf16_mixed_on_cpu_teacher_and_student_bank_stays_float32(tmp_path):
    t, s = tmp_path / "teacher", tmp_path / "student"
    assert main(["fit", TEACHER_YAML, f"output_dir={t}", "trainer.precision=bf16-mixed", *TINY_TEACHER]) == 0
    bank = load_bank(t / "prototypes.pt")
    assert bank.prototypes.dtype == torch.float32 and torch.isfinite(bank.prototypes).all()
    state = next(v for k, v in _ckpt(t / "checkpoints/last.ckpt")["callbacks"].items() if k.startswith("PrototypeBank"))
    assert state["sums"].dtype == torch.float64  # accumulated in double, exported as float32
    assert main(["fit", STUDENT_YAML, f"output_dir={s}", "trainer.precision=bf16-mixed",
                 f"distill.prototypes={t / 'prototypes.pt'}", *TINY_STUDENT]) == 0
    ckpt = _ckpt(s / "checkpoints/last.ckpt")
    assert ckpt["state_dict"]["teacher_prototypes"].dtype == torch.float32
    assert load_bank(s / "student_prototypes.pt").prototypes.dtype == torch.float32
    with open(s / "logs" / "metrics.csv", newline="") as f:
        terms = [float(r["train/dist_intra"]) for r in csv.DictReader(f) if r.get("train/dist_intra")]
    assert terms and all(v == v and abs(v) < 1e3 for v in terms)
    assert json.loads((s / "results.json").read_text())["test"]["dice_mean"] >= 0


@pytest.mark.slow
def test_ddp_cmedl_trains(tmp_path):
    """CMEDL (three optimisers, one backward pass per step) under DDP; rank 0 alone writes."""
    out = tmp_path / "cmedl"
    r = _cli(["fit", os.path.join(REPO, "experiments/cmedl.yaml"), f"output_dir={out}", *TINY_STUDENT,
              "data.batch_size=2", "cmedl.target.num_subjects=8", "cmedl.target.shape=[64,64]", "cmedl.target.val_subjects=0",
              "cmedl.target.test_subjects=0", "cmedl.channels=8", "cmedl.blocks=2", "cmedl.disc_channels=8",
              "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=2",
              "pictures=0"],
             env=_audit_env(tmp_path, out))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["test"]["num_cases"] == 4 and (out / "translations.png").is_file()
    with open(out / "logs" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/gan_d")]
    assert rows and all(float(r["train/hint"]) == float(r["train/hint"]) for r in rows)
    writes = _writes_by_rank(tmp_path)
    assert set(writes) == {"0", "1"} and writes["1"] == [], writes.get("1")
