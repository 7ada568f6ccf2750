"""Devices, DDP and precision (lightning_distill/devices.py; issue 20, docs/gpu.md lists what was run where), tested
on CPU: mixed precision of the prototype sums, DDP-global prototype-DIST, validation cases counted once under DDP,
students of every method under DDP with rank 0 alone writing, bf16 and fp16 runs, and the trainer defaults and
accelerator settings chosen from the device."""

import csv
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, TINY_STUDENT, TINY_TEACHER, assert_close_to_precision
from conftest import audit_env as _audit_env, load_ckpt as _ckpt, writes_by_rank as _writes_by_rank
from lightning_distill import devices
from lightning_distill.bank import load_bank
from lightning_distill.cli import main
from lightning_distill.losses.prototype import (all_reduce_class_sums, class_means, masked_class_sums,
                                               prototype_dist_terms)
from lightning_distill.metrics import CaseMeans

TEACHER_YAML = os.path.join(REPO, "experiments/teacher.yaml")
STUDENT_YAML = os.path.join(REPO, "experiments/student.yaml")


# ------------------------------------------------------------------------------------------ precision of the prototype sums
K = 5


def _confident_batch(b=8, size=128, seed=0):
    """Logits of a confident student on a mostly-background batch: the background row of the class
    sums is ~b * size^2 * 0.8 probabilities, above fp16's largest finite value (65504)."""
    g = torch.Generator().manual_seed(seed)
    label = torch.zeros(b, 1, size, size, dtype=torch.long)
    for i in range(b):
        for k in range(1, K):
            x, y = torch.randint(0, size - 24, (2,), generator=g).tolist()
            label[i, 0, x:x + 12 + 2 * k, y:y + 12] = k
    logits = 6.0 * torch.nn.functional.one_hot(label[:, 0], K).movedim(-1, 1).float()
    logits = logits + 0.5 * torch.randn(logits.shape, generator=g)
    return logits, label


def _terms(logits, label, bank, sync=False):
    probs = torch.softmax(logits.float(), dim=1)
    sums, counts = masked_class_sums(probs, label, K)
    if sync:
        sums, counts = all_reduce_class_sums(sums, counts)
    return sums, counts, prototype_dist_terms(class_means(sums, counts), bank, counts > 0, geometry="logprob")


def _bank():
    bank = torch.full((K, K), 0.02) + 0.9 * torch.eye(K)
    return bank / bank.sum(1, keepdim=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_class_sums_and_prototype_loss_under_autocast_equal_fp32(dtype):
    logits, label = _confident_batch()
    bank = _bank()
    ref_sums, ref_counts, (ref_inter, ref_intra) = _terms(logits, label, bank)
    assert ref_sums[0].sum() > 65504  # the batch is one that overflows fp16 ...
    with torch.autocast("cpu", dtype=torch.float16):  # ... as the einsum did inside the step's autocast
        onehot = torch.nn.functional.one_hot(label[:, 0].reshape(8, -1), K).float()
        naive = torch.einsum("bnk,bcn->kc", onehot, torch.softmax(logits, 1).reshape(8, K, -1))
    assert not torch.isfinite(naive).all()
    with torch.autocast("cpu", dtype=dtype):
        sums, counts, (inter, intra) = _terms(logits, label, bank)
    assert sums.dtype == torch.float32 and torch.isfinite(sums).all()
    assert torch.allclose(sums, ref_sums, rtol=1e-6, atol=1e-3) and torch.equal(counts, ref_counts)
    for a, b in ((inter, ref_inter), (intra, ref_intra)):
        assert torch.isfinite(a) and abs(float(a) - float(b)) < 1e-3


# ------------------------------------------------------------------------------------------ device defaults
@pytest.mark.parametrize("capability, expected", [((7, 0, "Tesla V100"), "16-mixed"), ((7, 5, "T4"), "16-mixed"),
                                                  ((8, 0, "A100"), "bf16-mixed"), ((9, 0, "H100"), "bf16-mixed")])
def test_precision_chosen_from_the_compute_capability_without_initialising_cuda(monkeypatch, capability, expected):
    monkeypatch.setattr(devices, "cuda_available", lambda: True)
    monkeypatch.setattr(devices, "cuda_capability", lambda: capability)
    args, notes = devices.apply_trainer_defaults({})
    assert args["precision"] == expected and args["devices"] == 1
    assert any(expected in n and capability[2] in n for n in notes)
    assert not torch.cuda.is_initialized()
    # the user's setting wins; deterministic=true becomes "warn" on CUDA only, and says so
    args, notes = devices.apply_trainer_defaults({"precision": "32-true", "devices": 2, "deterministic": True})
    assert args["precision"] == "32-true" and args["devices"] == 2 and args["deterministic"] == "warn"
    assert any("deterministic=warn" in n for n in notes)
    args, _ = devices.apply_trainer_defaults({"accelerator": "cpu", "deterministic": True})
    assert args["deterministic"] is True and args["precision"] == "32-true"


def test_on_this_machine_the_defaults_are_one_cpu_device_in_fp32():
    assert devices.cuda_capability() is None or torch.cuda.is_available()
    args, notes = devices.apply_trainer_defaults({})
    if not torch.cuda.is_available():
        assert args["devices"] == 1 and args["precision"] == "32-true"
    assert not torch.cuda.is_initialized()


def test_fit_without_trainer_devices_uses_one_device_and_says_what_it_chose(tmp_path, capsys):
    from lightning_distill.cli import main

    assert main(["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={tmp_path}", *TINY_TEACHER,
                 "trainer.max_steps=2", "pictures=0"]) == 0
    out = capsys.readouterr().out
    assert "trainer defaults for this machine: trainer.devices=1" in out and "trainer.precision=" in out
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------------ DDP (gloo, 2 processes)
def _ddp_worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        logits, label = _confident_batch(b=4, size=32, seed=3)
        part = logits[rank * 2:(rank + 1) * 2].clone().requires_grad_(True)
        sums, counts, (inter, intra) = _terms(part, label[rank * 2:(rank + 1) * 2], _bank(), sync=True)
        (inter + intra).backward()
        # validation cases through Lightning's sampler, which pads 5 cases to 6 with a repeat
        ids = [f"case{i}" for i in range(5)]
        sampler = torch.utils.data.DistributedSampler(ids, num_replicas=world, rank=rank, shuffle=False)
        means = CaseMeans(2)
        for i in sampler:
            means.update([ids[i]], torch.tensor([[float(i), float("nan") if i == 0 else 10.0 * i]]))
        torch.save({"sums": sums.detach(), "counts": counts, "inter": inter.detach(), "intra": intra.detach(),
                    "grad": part.grad, "val": means.compute(), "val_rows": means.num_cases}, os.path.join(out, f"r{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_process_prototype_terms_and_validation_means_equal_one_process(tmp_path):
    mp.start_processes(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    r = [torch.load(tmp_path / f"r{i}.pt") for i in range(2)]
    logits, label = _confident_batch(b=4, size=32, seed=3)
    logits.requires_grad_(True)
    sums, counts, (inter, intra) = _terms(logits, label, _bank())
    (inter + intra).backward()
    # every process computes the terms of the concatenated batch: sums of halves added vs sums of the whole
    # (another order of float32 additions). Each class sum adds up to 4,096 float32 terms, whose rounding grows with
    # their number: 1e-5 of the magnitude (measured here 6.4e-7 for the sums, 4.2e-7 for the gradient that flows
    # through them); counts are whole numbers: exact
    for x in r:
        assert_close_to_precision(x["sums"], sums, rel=1e-5)
        assert torch.equal(x["counts"], counts)
        assert_close_to_precision(torch.stack([x["inter"], x["intra"]]), torch.stack([inter, intra]).detach(), rel=1e-5)
    # DDP averages the processes' gradients: each process's share, / 2, is the single process's gradient there
    ddp_grad = torch.cat([r[0]["grad"], r[1]["grad"]]) / 2
    assert_close_to_precision(ddp_grad, logits.grad, rel=1e-5)
    # validation: 6 rows were added (one repeat), 5 cases counted; a NaN is left out of its column
    assert r[0]["val_rows"] + r[1]["val_rows"] == 6
    expected = torch.tensor([sum(range(5)) / 5, sum(10.0 * i for i in range(1, 5)) / 4])
    for x in r:
        assert torch.allclose(x["val"], expected)


def _cli(args, env=None, timeout=900):
    """``lightning-distill ARGS`` in a subprocess started in the repository (``env``: an audited DDP run's)."""
    env = env or {**os.environ, "PYTHONPATH": REPO, "WANDB_MODE": "offline"}
    return subprocess.run([sys.executable, "-m", "lightning_distill.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def _terms_logged(out, term):
    with open(out / "logs" / "metrics.csv", newline="") as f:
        return [float(r[term]) for r in csv.DictReader(f) if r.get(term)]


DDP = ["trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu", "data.batch_size=2", "pictures=0"]


@pytest.mark.slow
def test_zero_weight_terms_train_under_ddp(tmp_path):
    """Parameters only a weight-0 term reads (a feature-bank projector at lambda = 0; a CMEDL teacher at
    teacher_weight=0 with hint_weight=0) made DDP's reducer fail with 'parameters that were not used'."""
    teacher = tmp_path / "teacher"
    r = _cli(["fit", "experiments/teacher.yaml", f"output_dir={teacher}", *TINY_TEACHER, "bank.space=feature", "pictures=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    student = tmp_path / "student"
    r = _cli(["fit", "experiments/student.yaml", f"output_dir={student}", *TINY_STUDENT, *DDP, "trainer.max_steps=3",
              f"distill.prototypes={teacher / 'prototypes.pt'}", "distill.weight=0"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((student / "results.json").read_text())["steps"] == 3
    assert _terms_logged(student, "train/dist_inter")  # computed and logged at weight 0
    cmedl = tmp_path / "cmedl"
    r = _cli(["fit", "experiments/cmedl.yaml", f"output_dir={cmedl}", *TINY_STUDENT, *DDP, "trainer.max_steps=2",
              "cmedl.target.num_subjects=8", "cmedl.target.shape=[64,64]", "cmedl.target.val_subjects=0",
              "cmedl.target.test_subjects=0", "cmedl.channels=8", "cmedl.blocks=2", "cmedl.disc_channels=8",
              "cmedl.teacher_weight=0", "distill.weight=0", "trainer.val_check_interval=2"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((cmedl / "results.json").read_text())["steps"] == 2


def _weights_rel_l2(a, b):
    wa, wb = (torch.load(p, map_location="cpu", weights_only=False)["state_dict"] for p in (a, b))
    keys = [k for k in wa if wa[k].is_floating_point() and not k.startswith("teacher_")]
    num = sum((wa[k].double() - wb[k].double()).pow(2).sum() for k in keys)
    return float((num / sum(wa[k].double().pow(2).sum() for k in keys)) ** 0.5)


@pytest.mark.slow
def test_ddp_student_follows_the_single_process_student(tmp_path, teacher_bank):
    """2 gloo processes x batches of 2 vs 1 process x batches of 4, prototype-DIST at lambda = 1: the class
    sums are all-reduced, so both optimise the same objective; the student's weights end as close as the
    teacher's do in bank/test_bank_metric.py::test_ddp_teacher_bank_equals_single_process (relative L2 1.3e-3).
    Every test case is counted once (gathered from both processes) and rank 1 writes nothing."""
    # a MONAI UNet (instance norm): torch's SyncBatchNorm is CUDA only, so a batch-norm student's statistics
    # would be per process on CPU DDP (on GPUs fit turns trainer.sync_batchnorm on with trainer.devices > 1)
    from omegaconf import OmegaConf

    yaml = OmegaConf.load(os.path.join(REPO, "experiments/student.yaml"))
    yaml.model = {"name": "UNet", "kwargs": {"channels": [8, 16, 32], "strides": [2, 2]}}
    OmegaConf.save(yaml, tmp_path / "student_unet.yaml")
    tiny = [a for a in TINY_STUDENT if not a.startswith("model.")]
    common = ["fit", str(tmp_path / "student_unet.yaml"), *tiny, f"distill.prototypes={teacher_bank / 'prototypes.pt'}",
              "trainer.max_steps=6", "trainer.deterministic=true", "trainer.accelerator=cpu", "pictures=0",
              "distill.geometry=logprob"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    r = _cli([*common, f"output_dir={single}", "data.batch_size=4"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = _cli([*common, f"output_dir={ddp}", "data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp"],
             env=_audit_env(tmp_path, ddp))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((ddp / "results.json").read_text())
    assert res["steps"] == 6 and res["test"]["num_cases"] == 4  # every test case once, gathered from both processes
    writes = _writes_by_rank(tmp_path)
    assert set(writes) == {"0", "1"} and writes["1"] == [], writes.get("1")
    a, b = _terms_logged(single, "train/dist_inter"), _terms_logged(ddp, "train/dist_inter")
    assert all(v == v for v in a + b), (a, b)  # no NaN (max() below would pass over one)
    assert len(a) == len(b) == 6 and max(abs(x - y) for x, y in zip(a, b)) < 1e-4, (a, b)
    rel = _weights_rel_l2(single / "checkpoints/last.ckpt", ddp / "checkpoints/last.ckpt")
    print(f"student weights relative L2, DDP vs single: {rel:.1e}; dist_inter per step {a} vs {b}")
    # two computations (batch split over processes): the same objective step by step (dist_inter within 1e-4; with
    # per-rank prototypes it differed by 0.048), weights apart only by rounding, which Adam's per-weight
    # normalisation turns into steps for near-zero gradients: 1.1e-3 relative after 6 steps on the machine this was
    # written on, 1.3e-3 for the teacher. The bound leaves room for another CPU's rounding; that both optimise the
    # same objective is what the dist_inter check above tests.
    assert rel < 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("method", ["sikd", "transfer"])
def test_ddp_student_trains(tmp_path, method, request):
    """SIKD and transfer students under DDP (the prototype-DIST student: test_ddp_student_follows_the_single_process_student)."""
    out = tmp_path / "student"
    if method == "transfer":  # teacher-labelled slices and union slices: each process draws its samples' own
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


def test_mixed_precision_with_gradient_clipping_trains(tmp_path):
    """Lightning's mixed-precision plugin refuses to clip a fused optimiser's gradients (it unscales inside its
    step); the package then falls back to the unfused AdamW. (16-mixed is bf16-mixed on CPU.)"""
    from lightning_distill.cli import main

    assert main(["fit", os.path.join(REPO, "experiments/teacher.yaml"), f"output_dir={tmp_path}", *TINY_TEACHER,
                 "trainer.max_steps=2", "pictures=0", "trainer.precision=16-mixed", "trainer.gradient_clip_val=1.0"]) == 0
    assert json.loads((tmp_path / "results.json").read_text())["steps"] == 2


# ------------------------------------------------------------------------------------------ accelerator settings
def test_accel_settings_resolve_for_the_device_and_reject_bad_values():
    from omegaconf import OmegaConf

    acc = OmegaConf.create({"channels_last": "auto", "compile": False, "matmul_precision": "auto"})
    assert devices.accel_settings(acc, on_cuda=False, spatial_dims=2)[0] == {"channels_last": False, "compile": False,
                                                                             "matmul_precision": None}
    on_gpu, notes = devices.accel_settings(acc, on_cuda=True, spatial_dims=2)
    assert on_gpu == {"channels_last": True, "compile": False, "matmul_precision": "high"} and notes
    assert devices.accel_settings(acc, on_cuda=True, spatial_dims=3)[0]["channels_last"] is False
    acc.channels_last = "yes please"
    with pytest.raises(ValueError, match="accel.channels_last"):
        devices.accel_settings(acc, on_cuda=False, spatial_dims=2)


def _baseline_pair(tmp_path, option):
    """State dicts of two 2-step baseline runs: as configured (``a``) and with ``option`` (``b``)."""
    from lightning_distill.cli import main

    run = ["fit", os.path.join(REPO, "experiments/baseline.yaml"), *TINY_STUDENT, "trainer.max_steps=2", "pictures=0"]
    assert main([*run, f"output_dir={tmp_path / 'a'}"]) == 0
    assert main([*run, f"output_dir={tmp_path / 'b'}", option]) == 0
    return [torch.load(tmp_path / d / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
            for d in ("a", "b")]


def test_channels_last_student_trains_and_keeps_its_checkpoint_keys(tmp_path):
    a, b = _baseline_pair(tmp_path, "accel.channels_last=true")
    assert list(a) == list(b)
    conv = next(k for k, v in b.items() if v.ndim == 4 and v.shape[1] > 1 and v.shape[2] > 1)
    assert b[conv].is_contiguous(memory_format=torch.channels_last) and not b[conv].is_contiguous()


@pytest.mark.slow
def test_compiled_network_trains_and_keeps_its_checkpoint_keys(tmp_path):
    """accel.compile=true: nn.Module.compile() in place (torch.compile with inductor; needs a C compiler on CPU)."""
    a, b = _baseline_pair(tmp_path, "accel.compile=true")
    assert list(a) == list(b)
    ra, rb = (json.loads((tmp_path / d / "results.json").read_text())["test"]["dice_mean"] for d in ("a", "b"))
    assert abs(ra - rb) < 0.05  # the same 2 steps, compiled kernels round differently
