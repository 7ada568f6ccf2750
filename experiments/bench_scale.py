#!/usr/bin/env python
"""Scale benchmark (`make bench-scale`): a large NIfTI dataset opened lazily, and bank throughput.

1. Exports a phantom population of ``--volumes`` CT volumes (64 x 64 x 48, the teacher's grid) as an
   nnU-Net dataset (kept in ``--work`` and reused).
2. Training start and memory: a teacher ``fit`` on the first ``--small`` volumes and on all of them,
   with ``data.nifti.open=lazy`` and ``eager``, each in its own child process (20 training steps, then
   the test split of 8 volumes): seconds from process start to the first training batch, and peak
   resident memory (Linux ``VmHWM``).
3. Bank throughput: ``lightning-distill bank build`` with a teacher checkpoint (the run config's UNet,
   trained 20 steps here: its speed is the point, not its accuracy) over the first ``--bank-volumes``
   volumes, unlabelled (pseudo-labels), with a fresh persistent cache (cold: read + preprocess +
   inference) and again (warm: inference on cached arrays), in 1 process and in 2 gloo processes.

4. Teach throughput: ``lightning-distill teach`` (the same checkpoint, ``experiments/teach.yaml``: 5 slices per
   volume at the student's levels) over the same ``--bank-volumes`` NIfTI volumes in 1 and 2 processes, and
   over as many phantom volumes rendered on the fly (1 process); ``--teach-only`` runs this part alone.

Writes its sections of ``--out`` (docs/performance.md) between markers, leaving the rest as it is.
Public tools only (``time``, ``subprocess``, ``/proc``). Usage::

    python experiments/bench_scale.py [--volumes 1000] [--small 100] [--bank-volumes 200] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- bench-scale:begin -->", "<!-- bench-scale:end -->"
TEACH_BEGIN, TEACH_END = "<!-- bench-teach:begin -->", "<!-- bench-teach:end -->"
NAMES = "classes=[background,body_wall,muscle,liver,spleen,right_kidney,left_kidney,aorta,vertebra]"
CHILD = r"""
import json, sys, time
T0 = time.time()
from lightning_distill.modules import SegmentationModule
first = {}
step = SegmentationModule.training_step
def training_step(self, batch, i):
    first.setdefault("t", time.time() - T0)
    return step(self, batch, i)
SegmentationModule.training_step = training_step
from lightning_distill.cli import main
rc = main(sys.argv[1:])
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print("BENCH " + json.dumps({"rc": rc, "first_batch_s": first.get("t"), "peak_mib": int(hwm) / 1024, "wall_s": time.time() - T0}))
"""


def cli(*args: str) -> list:
    return [sys.executable, "-m", "lightning_distill.cli", *args]


def run(cmd, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise SystemExit(f"failed ({r.returncode}): {' '.join(map(str, cmd))}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def export(work: Path, n: int) -> Path:
    vols = work / f"phantom{n}"
    if not (vols / "dataset.json").is_file() or len(list((vols / "imagesTr").glob("*.nii.gz"))) != n:
        t = time.time()
        run(cli("phantom", "experiments/teacher.yaml", str(vols), f"data.num_subjects={n}", "data.phantom.seed=7",
                "--overwrite"))
        print(f"exported {n} volumes in {time.time() - t:.0f} s", flush=True)
    return vols


def start(work: Path, vols: Path, n: int, mode: str, case_ids) -> dict:
    out = work / f"fit-{mode}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    args = ["fit", "experiments/teacher.yaml", f"output_dir={out}", "data.source=nifti", f"data.nifti.root={vols}",
            "data.nifti.orientation=LAS", f"data.nifti.open={mode}", NAMES, "trainer.max_steps=20",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "pictures=0",
            "data.val_subjects=8", "data.test_subjects=8", "logger=csv"]
    if n < len(case_ids):
        args.append("data.nifti.cases=[" + ",".join(case_ids[:n]) + "]")
    r = run([sys.executable, "-c", CHILD, *args])
    rec = json.loads([ln for ln in r.stdout.splitlines() if ln.startswith("BENCH ")][-1][6:])
    if rec["rc"] != 0 or rec["first_batch_s"] is None:
        raise SystemExit(f"fit {mode} {n} failed (exit {rec['rc']}):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    print(f"fit {mode} {n}: {rec}", flush=True)
    return rec


def bank(work: Path, vols: Path, ckpt: Path, ids, processes: int, cache: Path) -> tuple:
    """Volumes/s of one bank build: over the whole command, and over its volume loop (the bank's ``seconds``)."""
    import torch

    out = work / f"bank-{processes}.pt"
    t = time.time()
    run(cli("bank", "build", "experiments/bank.yaml", f"model.path={ckpt}", f"data.root={vols}", "data.labels=ignore",
            "data.cases=[" + ",".join(ids) + "]", f"data.cache_dir={cache}", f"output={out}", f"processes={processes}",
            "overwrite=true", "threshold=0.5"))
    wall = time.time() - t
    loop = torch.load(out, weights_only=True)["seconds"]
    return len(ids) / wall, len(ids) / loop


def teach(work: Path, vols: Optional[Path], ckpt: Path, ids, processes: int) -> dict:
    """One teach run over ``ids`` (NIfTI volumes of ``vols``; ``vols=None``: phantom volumes rendered on the fly):
    volumes/s and slices/s over the whole command and over teach's own run (its ``seconds``: the model loaded,
    every volume read, inferred and written, dataset.json written)."""
    out = work / f"teach-{'nifti' if vols else 'phantom'}-{processes}"
    data = ([f"data.root={vols}", "data.source=nifti", "data.labels=ignore", "data.cases=[" + ",".join(ids) + "]"] if vols
            else [f"data.num_subjects={len(ids)}"])
    t = time.time()
    run(cli("teach", "experiments/teach.yaml", f"model.path={ckpt}", *data, f"output={out}", f"processes={processes}",
            "overwrite=true", "data.preprocess.orientation=LAS"))
    wall = time.time() - t
    meta = json.loads((out / "dataset.json").read_text())
    shutil.rmtree(out, ignore_errors=True)
    n, k = meta["num_volumes"], meta["num_slices"]
    return {"volumes": n, "slices": k, "wall": wall, "seconds": meta["seconds"]}


def bench_teacher(work: Path) -> Path:
    teacher = work / "teacher"
    if not (teacher / "checkpoints" / "last.ckpt").is_file():
        run(cli("fit", "experiments/teacher.yaml", f"output_dir={teacher}", "trainer.max_steps=20", "data.num_subjects=24",
                "data.val_subjects=2", "data.test_subjects=2", "trainer.enable_progress_bar=false", "pictures=0"))
    return teacher / "checkpoints" / "last.ckpt"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--small", type=int, default=100)
    ap.add_argument("--bank-volumes", type=int, default=200)
    ap.add_argument("--work", default="runs/bench-scale", help="where the dataset and runs go (reused)")
    ap.add_argument("--out", help="write the section into this markdown file (e.g. docs/performance.md)")
    ap.add_argument("--teach-only", action="store_true", help="only the teach throughput section")
    args = ap.parse_args(argv)
    t0 = time.time()
    work = (REPO / args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    vols = export(work, args.bank_volumes if args.teach_only else args.volumes)  # teach needs only the first ones
    ids = sorted(p.name[: -len("_0000.nii.gz")] for p in (vols / "imagesTr").glob("*_0000.nii.gz"))
    ckpt = bench_teacher(work)
    sub = ids[: args.bank_volumes]
    teach_rates = {"nifti-1": teach(work, vols, ckpt, sub, 1), "nifti-2": teach(work, vols, ckpt, sub, 2),
                   "phantom-1": teach(work, None, ckpt, sub, 1)}
    print(f"teach: {teach_rates}", flush=True)
    _write_section(args, render_teach(args, teach_rates, time.time() - t0), TEACH_BEGIN, TEACH_END)
    if args.teach_only:
        return 0

    starts = {(mode, n): start(work, vols, n, mode, ids) for mode in ("lazy", "eager") for n in (args.small, args.volumes)}

    rates = {}
    for p in (1, 2):
        cache = work / f"cache-{p}"
        shutil.rmtree(cache, ignore_errors=True)
        rates[(p, "cold")] = bank(work, vols, ckpt, sub, p, cache)
        rates[(p, "warm")] = bank(work, vols, ckpt, sub, p, cache)
        print(f"bank {p} process(es): cold {rates[(p, 'cold')]}, warm {rates[(p, 'warm')]} volumes/s (command, loop)", flush=True)

    _write_section(args, render(args, starts, rates, time.time() - t0), BEGIN, END)
    return 0


def _write_section(args, text: str, begin: str, end: str) -> None:
    print(text)
    if args.out:
        from lightning_distill.io import write_text

        path = REPO / args.out
        old = path.read_text() if path.is_file() else ""
        if begin in old and end in old:
            new = old[: old.index(begin)] + text + old[old.index(end) + len(end):]
        else:
            new = old.rstrip() + "\n\n" + text + "\n"
        write_text(path, new)
        print(f"wrote its section of {args.out}")


def render_teach(args, r, wall) -> str:
    import torch

    from lightning_distill import __version__

    cmd = ("make bench-scale" if args.out == "docs/performance.md" and args.bank_volumes == 200 and not args.teach_only
           else "python experiments/bench_scale.py " + " ".join(sys.argv[1:]))
    L = [TEACH_BEGIN, "## Teach throughput", "",
         f"Generated by `{cmd}` (`experiments/bench_scale.py`; {wall:.0f} s with the dataset export and the 20-step "
         f"teacher). lightning_distill {__version__}, torch {torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, "
         "CPU only. Do not edit by hand.", "",
         f"`lightning-distill teach` (`experiments/teach.yaml`: the teacher's UNet on whole 64×64×48 volumes, 5 slices per "
         f"volume at the student's levels, each preprocessed as the student's, probabilities float16, compressed) over "
         f"{args.bank_volumes} volumes: NIfTI files of the export above, or phantom volumes rendered on the fly.", "",
         "| volumes | processes | teach run: volumes/s | teach run: slices/s | whole command: volumes/s | whole command (s) |",
         "|---|---|---|---|---|---|"]
    for key, label in (("nifti-1", "NIfTI"), ("nifti-2", "NIfTI"), ("phantom-1", "phantom, rendered")):
        x = r[key]
        L.append(f"| {label} | {key[-1]}{' (spawned)' if key.endswith('2') else ''} | {x['volumes'] / x['seconds']:.2f} | "
                 f"{x['slices'] / x['seconds']:.2f} | {x['volumes'] / x['wall']:.2f} | {x['wall']:.0f} |")
    L += ["", "Teach run: from loading the model to `dataset.json` (for 2 processes: from the parent's start, spawning "
          "included); whole command: including starting Python.", TEACH_END]
    return "\n".join(L)


def render(args, starts, rates, wall) -> str:
    import torch

    from lightning_distill import __version__

    cmd = "make bench-scale" if args.out == "docs/performance.md" and (args.volumes, args.small, args.bank_volumes) == (1000, 100, 200) \
        else "python experiments/bench_scale.py " + " ".join(sys.argv[1:])
    small, big = args.small, args.volumes
    L = [BEGIN, "## Scale: large NIfTI datasets and bank throughput", "",
         f"Generated by `{cmd}` (`experiments/bench_scale.py`; {wall:.0f} s). lightning_distill {__version__}, torch "
         f"{torch.__version__}, {platform.machine()}, {os.cpu_count()} cores, CPU only. Do not edit by hand.", "",
         f"Phantom CT volumes 64×64×48 exported as an nnU-Net dataset ({big} cases). A teacher `fit` "
         "(`experiments/teacher.yaml` on these files, 20 training steps, then its 8 test volumes), each in a fresh "
         "process: seconds to the first training batch and peak resident memory (`VmHWM`).", "",
         "| open | volumes | first training batch (s) | peak RSS (MiB) | whole run (s) |", "|---|---|---|---|---|"]
    for mode in ("lazy", "eager"):
        for n in (small, big):
            r = starts[(mode, n)]
            L.append(f"| {mode} | {n} | {r['first_batch_s']:.1f} | {r['peak_mib']:.0f} | {r['wall_s']:.0f} |")
    lz = starts[("lazy", big)]["peak_mib"] / starts[("lazy", small)]["peak_mib"]
    ez = starts[("eager", big)]["peak_mib"] / starts[("eager", small)]["peak_mib"]
    L += ["", f"Peak memory, {big} vs {small} volumes: lazy ×{lz:.2f}, eager ×{ez:.2f}.", "",
          f"`lightning-distill bank build` (the teacher's UNet, `experiments/bank.yaml`, unlabelled: pseudo-labels) over "
          f"{args.bank_volumes} of the volumes: cold = an empty persistent cache (read, check, preprocess, infer, "
          "store), warm = the same again (cached arrays, infer).", "",
          "| processes | cold: volume loop (volumes/s) | warm: volume loop (volumes/s) | cold: whole command | warm: whole command |",
          "|---|---|---|---|---|"]
    for p in (1, 2):
        (cw, cl), (ww, wl) = rates[(p, "cold")], rates[(p, "warm")]
        L.append(f"| {p}{' (gloo)' if p > 1 else ''} | {cl:.2f} | {wl:.2f} | {cw:.2f} | {ww:.2f} |")
    L += ["", "Volume loop: the volumes over the slowest process's loop time (the bank's `seconds`); whole command: "
          "including starting Python, spawning the processes and loading the model in each. Beyond one machine: "
          "`torchrun` (or `srun`) starts the same command on every node (docs/bank.md).", END]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
