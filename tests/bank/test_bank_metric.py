"""The running bank's sums and counts in a torchmetrics ``ClassSums``: the same numbers as the
per-step float64 sums it replaces, on one process and on two gloo processes (DDP)."""

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import REPO, TINY_TEACHER, FakeTrainer, assert_close_to_precision
from conftest import (audit_env as _audit_env, load_ckpt as _ckpt, max_weight_diff as _max_weight_diff, run_cli as _cli,
                      writes_by_rank as _writes_by_rank)
from lightning_distill.losses import masked_class_mean
from lightning_distill.losses.prototype import class_means, masked_class_sums
from lightning_distill.bank import ClassSums, PrototypeBank, load_bank

K = 4
NAMES = [f"c{i}" for i in range(K)]
CONFIGS = {
    "running": dict(start=0.0, taus=[0.5, 2.0]),
    "ema": dict(start=0.0, momentum=0.7, taus=[0.5, 4.0]),
    "running_axial": dict(start=0.0, axial_range=[0.2, 0.6]),
}


def _batches(n=8, b=4, seed=0):
    """3D batches (B, K, X, Y, Z) with ignored voxels (255) and a class missing from some batches."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        logits = torch.randn(b, K, 6, 5, 7, generator=g) * 3
        label = torch.randint(0, K, (b, 1, 6, 5, 7), generator=g)
        label[:, :, 0] = 255
        if i % 3 == 1:
            label[label == 2] = 0
        out.append((logits, label))
    return out


class _Trainer(FakeTrainer):
    def __init__(self, world=1, rank=0):
        self.world_size, self.is_global_zero = world, rank == 0


def _feed(cb, batches, world=1, rank=0):
    """Each process gets its share of every batch (rank r: samples [r B/W, (r + 1) B/W))."""
    trainer = _Trainer(world, rank)
    for i, (logits, label) in enumerate(batches):
        part = slice(rank * len(logits) // world, (rank + 1) * len(logits) // world)
        cb.on_train_batch_end(trainer, None, {"logits": logits[part]}, {"label": label[part]}, i)
    return cb


def _reference(cfg, batches, world=1):
    """The bank as the callback computed it before ClassSums: each step's per-class float64 sums (over
    the processes' shares, summed in rank order) added to running sums, or folded into an EMA."""
    tau, extra = 1.0, sorted({float(t) for t in cfg.get("taus", ())} - {1.0})
    momentum, rng = cfg.get("momentum"), cfg.get("axial_range")
    state = {t: None for t in [tau, *extra]}
    seen = torch.zeros(K, dtype=torch.float64)
    for logits, label in batches:
        if rng is not None:
            f = torch.arange(label.shape[-1], dtype=torch.float64) / (label.shape[-1] - 1)
            label = label.masked_fill(~((f >= rng[0] - 1e-9) & (f <= rng[1] + 1e-9)), -1)
        counts = None
        for t in state:
            total, n = None, None
            for r in range(world):
                part = slice(r * len(logits) // world, (r + 1) * len(logits) // world)
                s, c = masked_class_sums(torch.softmax(logits[part] / t, 1), label[part], K)
                total = s.double() if total is None else total + s.double()
                n = c.double() if n is None else n + c.double()
            counts = n
            if momentum is None:
                state[t] = total if state[t] is None else state[t] + total
            else:
                means = class_means(total, n)
                new = torch.zeros(K, K, dtype=torch.float64) if state[t] is None else state[t].clone()
                first, upd = (n > 0) & (seen == 0), (n > 0) & (seen > 0)
                new[first] = means[first]
                new[upd] = momentum * new[upd] + (1 - momentum) * means[upd]
                state[t] = new
        seen = seen + (counts if momentum is None else (counts > 0).double())
    return {"sums": state[tau], "counts": seen, "tau_sums": {t: state[t] for t in extra}}


def _assert_state_equal(state, ref, exact=True):
    """``exact``: the same computation on both sides (one all-reduced state on two processes, a resumed run
    and the uninterrupted one), bit for bit. Otherwise two computations of the same sums (the callback sums
    every temperature in one einsum over the concatenated channels; the reference one einsum per
    temperature, and per process): float32 batch sums in another order, so agreement to float32 precision.
    Counts are whole numbers in float64: exact either way."""
    for key in ("sums", "counts"):
        assert state[key].dtype == torch.float64
    assert torch.equal(state["counts"], ref["counts"])
    assert sorted(state["tau_sums"]) == sorted(ref["tau_sums"])
    pairs = [("sums", state["sums"], ref["sums"])] + [(f"tau {t}", state["tau_sums"][t], v) for t, v in ref["tau_sums"].items()]
    for what, a, b in pairs:
        if exact:
            assert torch.equal(a, b), what
        else:
            assert_close_to_precision(a, b, msg=what)


def test_class_sums_metric_adds_batches_and_resets():
    batches = _batches(3)
    metric = ClassSums(K, K)
    for logits, label in batches:
        metric.update(torch.softmax(logits, 1), label)
    sums, counts = metric.compute()
    expected = [masked_class_sums(torch.softmax(lg, 1), lb, K) for lg, lb in batches]
    assert sums.dtype == counts.dtype == torch.float64
    # the same computation on both sides (each batch's masked_class_sums, added in float64 in batch order): bitwise
    assert torch.equal(sums, sum(s.double() for s, _ in expected)) and torch.equal(counts, sum(c.double() for _, c in expected))
    assert counts.sum() == sum(int(((lb >= 0) & (lb < K)).sum()) for _, lb in batches)  # ignored voxels count in nothing
    metric.reset()
    assert not metric.update_called and metric.sums.abs().sum() == 0 and metric.counts.sum() == 0


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_one_process_bank_equals_the_per_step_float64_sums(name):
    """Without DDP every batch is folded in at once: the per-step float64 sums (of float32 batch sums, so
    equal to float32 precision: the callback's einsum covers every temperature at once)."""
    cfg, batches = CONFIGS[name], _batches()
    cb = _feed(PrototypeBank(NAMES, **cfg), batches)
    ref = _reference(cfg, batches)
    _assert_state_equal(cb.state_dict(), ref, exact=False)
    means = ref["sums"] if cfg.get("momentum") else class_means(ref["sums"], ref["counts"])
    assert cb.prototypes.dtype == torch.float32
    assert_close_to_precision(cb.prototypes, means.float())
    assert cb._pending.update_count == 0  # nothing left to fold
    if name == "running":  # the mean over every pixel accumulated, the batches taken at once
        expected, _ = masked_class_mean(torch.softmax(torch.cat([lg for lg, _ in batches]), 1),
                                        torch.cat([lb for _, lb in batches]), K)
        assert torch.allclose(cb.prototypes, expected, atol=1e-6)


def test_state_dict_keeps_the_checkpoint_format():
    """Checkpoints written before ClassSums load, and new ones have the same keys and dtypes; a bank of other
    classes refuses the state."""
    batches = _batches(4)
    cb = _feed(PrototypeBank(NAMES, start=0.0, taus=[0.5]), batches)
    state = cb.state_dict()
    assert set(state) == {"sums", "counts", "tau_sums", "class_names", "space", "tau", "momentum"}
    old_format = {"sums": state["sums"].clone(), "counts": state["counts"].clone(),
                  "tau_sums": {0.5: state["tau_sums"][0.5].clone()},
                  "class_names": list(NAMES), "space": "prob", "tau": 1.0, "momentum": None}
    again = PrototypeBank(NAMES, start=0.0, taus=[0.5])
    again.load_state_dict(old_format)
    assert torch.equal(again.prototypes, cb.prototypes) and torch.equal(again.counts, cb.counts)
    with pytest.raises(ValueError, match="classes"):
        PrototypeBank(["c0", "x", "y", "z"]).load_state_dict(state)
    more = _batches(3, seed=1)
    _feed(again, more)
    _assert_state_equal(again.state_dict(), _reference(CONFIGS["running"] | {"taus": [0.5]}, batches + more), exact=False)


# ------------------------------------------------------------------------------------------ 2 gloo processes
def _worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=60))  # a missed collective fails, it does not hang
    try:
        batches, more = _batches(), _batches(4, seed=1)
        res = {}
        for name, cfg in CONFIGS.items():
            cb = _feed(PrototypeBank(NAMES, **cfg), batches, world, rank)
            pending = cb._pending.update_count  # a running mean's batches stay on their process until read
            state = cb.state_dict()  # every process: the sums over both (rank 0 writes the checkpoint)
            resumed = _feed(PrototypeBank(NAMES, **cfg), [], world, rank)
            resumed.load_state_dict(state)  # every process loads the checkpoint (the same state on both)
            _feed(resumed, more, world, rank)
            _feed(cb, more, world, rank)
            res[name] = {"pending": pending, "state": state, "end": cb.state_dict(), "resumed": resumed.state_dict()}
        # a rank-0-only reader during validation (RunPictures) needs no collective: the callback folded at its start
        cb = _feed(PrototypeBank(NAMES, start=0.0), batches, world, rank)
        cb.on_validation_start(_Trainer(world, rank), None)
        if rank == 0:
            res["picture"] = cb.prototypes
        dist.barrier()
        # export: every process calls it with batches pending, rank 0 alone writes
        cb = _feed(PrototypeBank(NAMES, start=0.0, export_path=os.path.join(out, "bank.pt")), batches, world, rank)
        cb.export(_Trainer(world, rank))
        res["exported"] = cb.state_dict()
        torch.save(res, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_hold_the_single_process_bank(tmp_path):
    """Two processes, each with half of every batch: after a read (state_dict, export, a validation)
    both hold the bank of the per-step sums over the two halves; a checkpoint holds it too, and a
    run resumed from it on both processes continues as the uninterrupted one."""
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    batches, more = _batches(), _batches(4, seed=1)
    for name, cfg in CONFIGS.items():
        a, b = res[0][name], res[1][name]
        assert a["pending"] == b["pending"] == (0 if cfg.get("momentum") else len(batches))  # EMA: folded every step
        for key in ("state", "end", "resumed"):
            _assert_state_equal(a[key], b[key], exact=True)  # the same bank on both processes
        _assert_state_equal(a["state"], _reference(cfg, batches, world=2), exact=False)
        _assert_state_equal(a["end"], _reference(cfg, batches + more, world=2), exact=False)
        _assert_state_equal(a["resumed"], a["end"], exact=True)
        single = _feed(PrototypeBank(NAMES, **cfg), batches + more).state_dict()
        assert torch.equal(a["end"]["counts"], single["counts"])
        assert_close_to_precision(a["end"]["sums"], single["sums"])  # float32 batch sums of halves vs wholes
    single = _feed(PrototypeBank(NAMES, start=0.0), batches)
    torch.testing.assert_close(res[0]["picture"], single.prototypes, rtol=0, atol=1e-6)
    exported = load_bank(tmp_path / "bank.pt")
    _assert_state_equal(res[0]["exported"], res[1]["exported"], exact=True)
    assert torch.equal(exported.counts, single.counts)
    torch.testing.assert_close(exported.prototypes, single.prototypes, rtol=0, atol=1e-6)


# ------------------------------------------- final bank and reliability: torchmetrics states over 2 processes
def _volumes(n):
    """Batches whose "image" is the logits (an identity module predicts them): 5 batches share unevenly
    between 2 processes; 1 batch leaves the second process without any."""
    return [{"image": logits, "label": label} for logits, label in _batches(n, b=2, seed=3)]


def _scan_reference(vols, taus=(0.5,)):
    """The bank and the reliability counts as ``_scan`` computed them before the torchmetrics states:
    per-batch float64 sums and bincounts added in batch order."""
    sums = counts = None
    tp = predicted = truth = torch.zeros(K, dtype=torch.float64)
    for v in vols:
        values = torch.cat([torch.softmax(v["image"], 1)] + [torch.softmax(v["image"] / t, 1) for t in taus], 1)
        s, c = masked_class_sums(values, v["label"], K)
        sums = s.double() if sums is None else sums + s.double()
        counts = c.double() if counts is None else counts + c.double()
        y, p = v["label"][:, 0], v["image"].argmax(1)
        valid = (y >= 0) & (y < K)
        y, p = y[valid], p[valid]
        tp = tp + torch.bincount(y[y == p], minlength=K).double()
        predicted = predicted + torch.bincount(p, minlength=K).double()
        truth = truth + torch.bincount(y, minlength=K).double()
    return sums, counts, tp, predicted, truth


def _scan_results(vols):
    from lightning_distill.bank import class_reliability, final_bank
    identity = torch.nn.Identity()
    bank = final_bank(identity, vols, NAMES, tau=1.0, taus=[0.5])
    rel = class_reliability(identity, vols, NAMES, include_background=True)
    return {"prototypes": bank.prototypes, "tau": bank.at_tau(0.5), "counts": bank.counts,
            "volumes": bank.meta["volumes"], "reliability": rel}


def _scan_worker(rank, world, store, out):
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                           timeout=datetime.timedelta(seconds=60))
    try:
        torch.save({n: _scan_results(_volumes(n)) for n in (5, 1)}, os.path.join(out, f"scan{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _reliability(tp, predicted, truth):
    ratio = lambda a, b: None if b <= 0 else float(a / b)  # noqa: E731
    return {name: {"dice": ratio(2 * tp[i], predicted[i] + truth[i]), "precision": ratio(tp[i], predicted[i]),
                   "recall": ratio(tp[i], truth[i]), "voxels": int(truth[i])} for i, name in enumerate(NAMES)}


def test_final_bank_and_reliability_equal_the_former_sums_on_one_and_two_processes(tmp_path):
    """One process: bitwise the per-batch float64 sums and bincounts they replace (the same einsum over the
    same concatenated temperatures, batch by batch: the same computation). Two gloo processes
    (batches shared unevenly, or one process without any): the same bank and counts on both, equal
    to one process's."""
    for n in (5, 1):
        sums, counts, tp, predicted, truth = _scan_reference(_volumes(n))
        one = _scan_results(_volumes(n))
        assert torch.equal(one["counts"], counts) and one["volumes"] == 2 * n
        parts = sums.split(K, dim=1)
        assert torch.equal(one["prototypes"], class_means(parts[0], counts).float())
        assert torch.equal(one["tau"], class_means(parts[1], counts).float())
        assert one["reliability"] == _reliability(tp, predicted, truth)
    mp.start_processes(_scan_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="spawn")
    res = [torch.load(tmp_path / f"scan{r}.pt", weights_only=False) for r in range(2)]
    for n in (5, 1):
        one = _scan_results(_volumes(n))
        for r in res:
            assert r[n]["volumes"] == one["volumes"] and torch.equal(r[n]["counts"], one["counts"])
            assert r[n]["reliability"] == one["reliability"]  # integer counts: exact
            torch.testing.assert_close(r[n]["prototypes"], one["prototypes"], rtol=0, atol=1e-6)
            torch.testing.assert_close(r[n]["tau"], one["tau"], rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------ DDP through Lightning
# The bank of a real 2-process DDP teacher run (Lightning's strategy, hooks and export) vs one process; rank 0 alone
# writes. test_two_gloo_processes_hold_the_single_process_bank checks the callback's reduction itself.
TEACHER_YAML = os.path.join(REPO, "experiments/teacher.yaml")
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
