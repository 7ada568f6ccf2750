#!/usr/bin/env python
"""The picture of docs/reliability.md (`make reliability-figure`): resume and DDP, as training curves.

Left: a tiny 3D teacher trained for 12 steps without interruption, the same run SIGKILLed in step 7
and re-run with ``resume=auto`` (from ``last.ckpt`` of step 6), and that re-run once more with the
loader position ignored (as a plain ``DataLoader`` would: the epoch restarts from its first batch).
Right: the same teacher in one process with batches of 4 and with ``strategy=ddp`` on 2 gloo
processes with batches of 2. Each curve is ``train/loss`` from the run's ``logs/metrics.csv``; the
title of each panel gives the final bank's max abs difference to the reference run.

Usage::

    python experiments/reliability_figure.py [--out docs/img/reliability.png] [--work runs/reliability]
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

TINY = ["data.shape=[32,32,16]", "data.val_subjects=2", "data.test_subjects=2", "model.kwargs.channels=[8,16,32]",
        "model.kwargs.strides=[2,2]", "trainer.check_val_every_n_epoch=1", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", "trainer.log_every_n_steps=1", "trainer.deterministic=true",
        "trainer.accelerator=cpu", "pictures=0"]
RESUME = [*TINY, "data.num_subjects=14", "data.batch_size=2", "trainer.max_steps=12", "checkpoint.every_n_steps=2"]
DDP = [*TINY, "data.num_subjects=12", "trainer.max_steps=6"]

# Runs the CLI and SIGKILLs itself at the end of training step LD_KILL_AT_STEP (optionally ignoring the
# loader position on resume, LD_IGNORE_LOADER_STATE=1).
WRAPPER = """
import os, signal, sys
from lightning_distill.bank.callback import PrototypeBank
from lightning_distill.data import sampling
if os.environ.get("LD_IGNORE_LOADER_STATE"):
    sampling.TrainLoader.load_state_dict = lambda self, state: None
kill = int(os.environ.get("LD_KILL_AT_STEP", "0"))
orig = PrototypeBank.on_train_batch_end
def hook(self, trainer, *args):
    orig(self, trainer, *args)
    if trainer.global_step == kill:
        os.kill(os.getpid(), signal.SIGKILL)
PrototypeBank.on_train_batch_end = hook
from lightning_distill.cli import main
sys.exit(main(sys.argv[1:]))
"""


def run(out: Path, overrides, expect: int = 0, **env) -> None:
    """``lightning-distill fit teacher.yaml``; through the wrapper when ``env`` asks for a kill or an
    ignored loader state (DDP runs go straight to the CLI: Lightning re-launches ``sys.argv``)."""
    e = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **env}
    entry = ["-c", WRAPPER] if env else ["-m", "lightning_distill.cli"]
    cmd = [sys.executable, *entry, "fit", str(REPO / "experiments/teacher.yaml"), f"output_dir={out}", *overrides]
    r = subprocess.run(cmd, env=e, capture_output=True, text=True)
    if r.returncode != expect:
        raise SystemExit(f"{' '.join(cmd[3:])} exited {r.returncode}, expected {expect}:\n{r.stderr[-3000:]}")


def losses(out: Path):
    with open(out / "logs" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    return [int(r["step"]) + 1 for r in rows], [float(r["train/loss"]) for r in rows]


def bank_diff(a: Path, b: Path) -> float:
    from lightning_distill.bank import load_bank

    return float((load_bank(a / "prototypes.pt").prototypes - load_bank(b / "prototypes.pt").prototypes).abs().max())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(REPO / "docs/img/reliability.png"))
    p.add_argument("--work", default=str(REPO / "runs/reliability"))
    args = p.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    full, resumed, ignored = work / "uninterrupted", work / "resumed", work / "resumed_no_loader_state"
    run(full, RESUME)
    for out, env in ((resumed, {}), (ignored, {"LD_IGNORE_LOADER_STATE": "1"})):
        run(out, RESUME, expect=-signal.SIGKILL, LD_KILL_AT_STEP="7")
        run(out, [*RESUME, "resume=auto"], **env)
    single, ddp = work / "single_batch4", work / "ddp2_batch2"
    run(single, [*DDP, "data.batch_size=4", "trainer.devices=1"])
    run(ddp, [*DDP, "data.batch_size=2", "trainer.devices=2", "trainer.strategy=ddp"])

    from lightning_distill.visuals import new_figure

    fig, (a, b) = new_figure(1, 2, figsize=(11, 4))
    for out, label, style in ((full, "uninterrupted", "-"), (resumed, "killed in step 7, resume=auto", "--"),
                              (ignored, "resumed, loader position ignored", ":")):
        a.plot(*losses(out), style, marker="o", ms=3, label=label)
    a.axvline(6.5, color="grey", lw=0.8)
    a.set_title(f"resume: bank diff {bank_diff(full, resumed):.1g} (ignored: {bank_diff(full, ignored):.1g})", fontsize=9)
    for out, label, style in ((single, "1 process, batch 4", "-"), (ddp, "DDP 2 processes, batch 2 each", "--")):
        b.plot(*losses(out), style, marker="o", ms=3, label=label)
    b.set_title(f"DDP: bank max abs diff {bank_diff(single, ddp):.1g}", fontsize=9)
    for ax in (a, b):
        ax.set_xlabel("training step")
        ax.set_ylabel("train/loss")
        ax.legend(fontsize=8)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}; resume bank diff {bank_diff(full, resumed):.2g}, ignoring the loader state "
          f"{bank_diff(full, ignored):.2g}; DDP vs single {bank_diff(single, ddp):.2g}")


if __name__ == "__main__":
    main()
