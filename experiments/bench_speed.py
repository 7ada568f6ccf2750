#!/usr/bin/env python
"""Speed benchmark (`make bench-speed`): what each distillation method costs per training step.

In one process, the variants train the same student network (from ``experiments/student.yaml``) on
the same batches; the variants are interleaved step by step (round-robin), so machine drift hits them
alike. A step is the shared ``model_step`` (forward, every loss term) + backward + AdamW step; the
median over ``--steps`` rounds is reported as a ratio to the baseline.

Variants: ``baseline`` (segmentation loss only), ``prototype-dist`` (the core method: the student's
batch prototypes against a K x K bank, no teacher network; ``prototype-logprob`` and
``prototype-offdiag`` are its other loss geometries, ``prototype-dist+figure`` computes the
contribution figure ``train/dist_grad_ratio`` at every step, its worst case), ``pixel-dist`` (classic pixel-wise DIST
with a paired 2D teacher of the same architecture, run under ``no_grad`` every step), ``sikd``
(class-mean image + frozen same-architecture teacher forward + feature MSE through hooks), ``cmedl``
(the whole concurrent update: two generators and two PatchGANs of ``experiments/cmedl.yaml``, the
teacher on pseudo-MRI, the hint, three optimiser steps; its batches carry unpaired MRI-like images),
``transfer-soft`` (the soft transfer term of one teacher-labelled slice per labelled slice: twice the pixels).

Also measured: throughput of the slice (student) and volume (teacher) training loaders, cold (first
pass, which renders/decodes and caches) and warm (cached), against what a training step consumes
(batch size / median step time); and the peak resident memory of each variant, each in its own
child process (Linux ``VmHWM``).

Public tools only: ``time.perf_counter``, ``statistics.median``, ``/proc``. Usage::

    python experiments/bench_speed.py [--steps 25] [--out docs/performance.md]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from lightning.fabric.utilities import move_data_to_device

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lightning_distill import __version__  # noqa: E402
from lightning_distill.config import load_config  # noqa: E402
from lightning_distill.data.datamodules import SubjectDataset  # noqa: E402
from lightning_distill.io import atomic_write  # noqa: E402
from lightning_distill.methods import CMEDLModule, PixelDistModule, SIKDModule  # noqa: E402
from lightning_distill.networks import head_module_name  # noqa: E402
from lightning_distill.methods.cmedl import build as build_cmedl  # noqa: E402
from lightning_distill.methods.prototype import StudentModule  # noqa: E402
from lightning_distill.modules import SegmentationModule  # noqa: E402
from lightning_distill.bank import Bank# noqa: E402
from lightning_distill.networks import build_net  # noqa: E402
from lightning_distill.data.build import build_datamodule, build_source, class_names, loader_workers  # noqa: E402
from lightning_distill.methods import target_config  # noqa: E402

TARGETS = {"prototype-dist": 1.05, "prototype-logprob": 1.05, "prototype-offdiag": 1.05, "sikd": 1.6,
           "transfer-soft": 1.6}  # step-time ratios to the baseline asked for by the issues
LOADER_TARGET = 5.0  # loader throughput / training consumption


# ------------------------------------------------------------------------------------------- memory
def _peak_mib() -> Optional[float]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


# ------------------------------------------------------------------------------------------- variants
def _synthetic_bank(names: List[str]) -> Bank:
    """A valid K x K bank (rows are distributions): step time does not depend on its values."""
    k = len(names)
    p = torch.softmax(torch.randn(k, k) + 4 * torch.eye(k), dim=1)
    return Bank(prototypes=p, counts=torch.ones(k), class_names=names, tau=1.0, space="prob", meta={"path": "synthetic"})


VARIANTS = ("baseline", "prototype-dist", "prototype-logprob", "prototype-offdiag", "prototype-dist+figure",
            "pixel-dist", "sikd", "cmedl", "transfer-soft")


def cmedl_config(cfg):
    """``cfg`` (the student's) with CMEDL on: the translator of ``experiments/cmedl.yaml``, MRI-like
    target slices of the student's shape. Its batches serve every variant (the others ignore ``image_b``)."""
    c = load_config(REPO / "experiments/cmedl.yaml").cmedl
    out = cfg.copy()
    out.distill.method, out.distill.prototypes = "cmedl", None
    out.cmedl = c
    out.cmedl.target.shape = list(cfg.data.shape)
    return out


def build_variants(cfg, names, only: Optional[str] = None) -> Dict[str, SegmentationModule]:
    common = dict(lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay, scheduler="none")
    no_skip = cfg.copy()
    no_skip.model.skip_connections = False  # the SIKD teacher, as in experiments/sikd_teacher.yaml
    make = {
        "baseline": lambda: SegmentationModule(build_net(cfg, len(names)), names, **common),
        "prototype-dist": lambda: StudentModule(build_net(cfg, len(names)), names, bank=_synthetic_bank(names),
                                                distill_weight=1.0, **common),
        "prototype-logprob": lambda: StudentModule(build_net(cfg, len(names)), names, bank=_synthetic_bank(names),
                                                   distill_weight=1.0, geometry="logprob", **common),
        "prototype-offdiag": lambda: StudentModule(build_net(cfg, len(names)), names, bank=_synthetic_bank(names),
                                                   distill_weight=1.0, geometry="offdiag", **common),
        # the contribution figure (train/dist_grad_ratio) computed at EVERY step: its worst case; runs
        # pay it every distill.grad_every steps
        "prototype-dist+figure": lambda: StudentModule(build_net(cfg, len(names)), names, bank=_synthetic_bank(names),
                                                       distill_weight=1.0, **common),
        "pixel-dist": lambda: PixelDistModule(build_net(cfg, len(names)), names, teacher=build_net(cfg, len(names)),
                                              distill_weight=1.0, **common),
        "sikd": lambda: SIKDModule(build_net(cfg, len(names)), names, teacher=build_net(no_skip, len(names)),
                                   feature_layer=head_module_name(cfg.model.name), distill_weight=2.0, **common),
        "cmedl": lambda: build_cmedl(cmedl_config(cfg), build_net(cfg, len(names)), names, common),
        "transfer-soft": lambda: _transfer_student(cfg, names, common),
    }
    variants = {}
    for name in VARIANTS:
        if only is None or name == only:
            torch.manual_seed(0)
            variants[name] = make[name]()
            variants[name].bench_figure = name.endswith("+figure")
    return variants


def _transfer_student(cfg, names, common) -> SegmentationModule:
    """The baseline network with the soft transfer term of teacher-labelled slices on (``transfer.ratio=1``)."""
    m = StudentModule(build_net(cfg, len(names)), names, bank=None, distill_weight=0.0, **common)
    m.set_transfer(mode="soft", weight=1.0, tau=1.0)
    return m


def with_teacher_slices(batch: Dict, num_classes: int) -> Dict:
    """``batch`` with one teacher-labelled slice per labelled slice (``transfer_image``, ``transfer_soft``: the
    batch's own images rolled by one, and a one-hot of their labels with confidence 1); the other variants
    ignore them."""
    image = batch["image"].roll(1, 0)
    onehot = torch.nn.functional.one_hot(batch["label"][:, 0].roll(1, 0).clamp(max=num_classes - 1), num_classes)
    soft = torch.cat([onehot.movedim(-1, 1).float(), torch.ones_like(batch["image"])], 1)
    return {**batch, "transfer_image": image[:, None], "transfer_soft": soft[:, None]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(variants: Dict[str, SegmentationModule], batches: List[Dict], rounds: int, warmup: int = 3,
               device: torch.device = torch.device("cpu")):
    """Round-robin over variants on ``device`` (the batches moved there first; CUDA synchronised around
    each step); returns ``{name: [step seconds]}``."""
    batches = [move_data_to_device(b, device) for b in batches]
    for m in variants.values():
        m.to(device)
    steps = {n: _stepper(m) for n, m in variants.items()}
    for m in variants.values():
        m.train()
    times: Dict[str, List[float]] = {n: [] for n in variants}
    for r in range(warmup + rounds):
        batch = batches[r % len(batches)]
        for name, module in variants.items():
            _sync(device)
            t = time.perf_counter()
            steps[name](batch)
            _sync(device)
            dt = time.perf_counter() - t
            if r >= warmup:
                times[name].append(dt)
    return times


def _stepper(module: SegmentationModule) -> Callable[[Dict], None]:
    """One training step of ``module`` on a batch: forward, every loss term, backward, optimiser step(s)."""
    if isinstance(module, CMEDLModule):
        opts = module.configure_optimizers()  # [generators, discriminators, segmenters] (scheduler "none")
        return lambda batch: module.update(batch, *opts)
    opt = module.make_optimizer()
    figure = isinstance(module, StudentModule) and getattr(module, "bench_figure", False)

    def step(batch: Dict) -> None:
        opt.zero_grad(set_to_none=True)
        out = module.model_step(batch, train=True)
        if figure:
            module.contribution_figures(out, out["logits"])
        out["loss"].backward()
        opt.step()

    return step


def memory_of(name: str, student: str, overrides, steps: int = 3, device: str = "cpu") -> None:
    """Child process: peak RSS (MiB) before and after ``steps`` training steps of one variant alone
    (on CUDA, the peak GPU memory allocated is printed in the second column instead)."""
    cfg = load_config(student, overrides)
    src = build_source(cfg)
    names = class_names(cfg, src)
    run_cfg = cmedl_config(cfg) if name == "cmedl" else cfg
    dm = build_datamodule(run_cfg, src, target=target_config(run_cfg))
    dm.setup()
    batch = with_teacher_slices(next(iter(dm.train_dataloader())), len(names))
    module = build_variants(cfg, names, only=name)[name]
    dev = torch.device(device)
    before = _peak_mib()
    time_steps({name: module}, [batch], steps, warmup=0, device=dev)
    after = torch.cuda.max_memory_allocated(dev) / 2 ** 20 + before if dev.type == "cuda" else _peak_mib()
    print(f"PEAK {before} {after}")


def measure_memory(names, student: str, overrides, device: str = "cpu") -> Dict[str, tuple]:
    """Each variant in its own process, so that one variant's allocations do not hide another's."""
    import subprocess

    out = {}
    for n in names:
        r = subprocess.run([sys.executable, __file__, "--memory-of", n, "--student", student, "--device", device, *overrides],
                           capture_output=True, text=True)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("PEAK ")]
        out[n] = tuple(float(v) for v in line[0].split()[1:]) if r.returncode == 0 and line else (None, None)
    return out


def loader_rate(make_loader: Callable, passes: int = 2) -> List[float]:
    """Samples per second of each full pass over a training loader (pass 1 is cold: no cache yet)."""
    loader = make_loader()
    rates = []
    for _ in range(passes):
        n, t = 0, time.perf_counter()
        for batch in loader:
            n += batch["image"].shape[0]
        rates.append(n / (time.perf_counter() - t))
    return rates


def augmentation_ms(dataset: SubjectDataset, samples: int = 60) -> Dict[str, float]:
    """Median milliseconds per sample of the training augmentation, two ways interleaved sample by sample on
    the same (cached, cropped) inputs and seeds: as the package runs it (MONAI's metadata tracking off) and the
    same MONAI ``Compose`` with MONAI's default (tracking on)."""
    from monai.data import get_track_meta

    plain = SubjectDataset(dataset.source, dataset.ids, patch_size=dataset.patch_size)  # the crop, no augmentation
    times: Dict[str, List[float]] = {"package": [], "monai default": []}
    for k in range(samples):
        item = plain[(k % len(plain), k)]
        image, label = item["image"], item["label"]
        t = time.perf_counter()
        dataset.augmented(image, label, k)
        times["package"].append(time.perf_counter() - t)
        assert get_track_meta()
        t = time.perf_counter()
        dataset.augmentation(image.shape).set_random_state(seed=k)({"image": image, "label": label.float()})
        times["monai default"].append(time.perf_counter() - t)
    return {k: 1e3 * statistics.median(v[3:]) for k, v in times.items()}


def median_step(cfg, names, batch, rounds: int, device: torch.device = torch.device("cpu")) -> float:
    """Median step time of a plain segmentation module (the teacher's consumption)."""
    module = SegmentationModule(build_net(cfg, len(names)), names, scheduler="none")
    return statistics.median(time_steps({"teacher": module}, [batch], rounds, warmup=2, device=device)["teacher"])


# ------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=25, help="timed rounds per variant (after 3 warm-up rounds)")
    ap.add_argument("--student", default=str(REPO / "experiments/student.yaml"))
    ap.add_argument("--teacher", default=str(REPO / "experiments/teacher.yaml"))
    ap.add_argument("--out", help="write the markdown report here (e.g. docs/performance.md)")
    ap.add_argument("--device", default="auto", help="where the training steps run: auto (CUDA when available), cpu, cuda")
    ap.add_argument("--memory-of", choices=VARIANTS, help=argparse.SUPPRESS)  # child process of measure_memory
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the student config (e.g. data.shape=[64,64])")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lightning_distill.devices import resolve_device

    device = resolve_device(args.device)
    if args.memory_of:
        memory_of(args.memory_of, args.student, args.overrides, device=str(device))
        return 0
    t_start = time.time()

    scfg = load_config(args.student, args.overrides)
    ssrc = build_source(scfg)
    names = class_names(scfg, ssrc)
    sdm = build_datamodule(cmedl_config(scfg), ssrc, target=target_config(cmedl_config(scfg)))  # batches with unpaired image_b
    sdm.setup()
    batches = [with_teacher_slices(b, len(names)) for _, b in zip(range(4), sdm.train_dataloader())]
    variants = build_variants(scfg, names)
    res = time_steps(variants, batches, args.steps, device=device)
    del variants
    base = statistics.median(res["baseline"])
    memory = measure_memory(list(res), args.student, args.overrides, device=str(device))

    rows = []
    for name, ts in res.items():
        med = statistics.median(ts)
        q1, _, q3 = statistics.quantiles(ts, n=4)
        target = TARGETS.get(name)
        ok = "" if target is None else ("meets" if med / base <= target else "MISSES") + f" ≤ {target:.2f}×"
        rows.append((name, med, q1, q3, med / base, memory[name], ok))

    # loaders: the student's slices and the teacher's volumes, against what training consumes
    student_sps = scfg.data.batch_size / base
    s_rates = loader_rate(lambda: build_datamodule(scfg, build_source(scfg)).train_dataloader())
    tcfg = load_config(args.teacher)
    tsrc = build_source(tcfg)
    tdm = build_datamodule(tcfg, tsrc)
    tdm.setup()
    tbatch = next(iter(tdm.train_dataloader()))
    t_step = median_step(tcfg, class_names(tcfg, tsrc), tbatch, max(5, args.steps // 3), device=device)
    teacher_sps = tcfg.data.batch_size / t_step
    t_rates = loader_rate(lambda: build_datamodule(tcfg, build_source(tcfg)).train_dataloader())
    loaders = [("slices (student)", scfg, s_rates, student_sps), ("volumes (teacher)", tcfg, t_rates, teacher_sps)]
    augment = [("slices (student)", augmentation_ms(student_train_set(scfg))), ("volumes (teacher)", augmentation_ms(tdm.datasets["train"]))]

    text = render(args, scfg, tcfg, rows, loaders, augment, t_step, time.time() - t_start, device)
    print(text)
    if args.out:
        old = Path(args.out).read_text() if Path(args.out).is_file() else ""
        for part in ("scale", "teach"):  # experiments/bench_scale.py's sections stay
            begin, end = f"<!-- bench-{part}:begin -->", f"<!-- bench-{part}:end -->"
            if begin in old and end in old:
                text = text.rstrip() + "\n\n" + old[old.index(begin): old.index(end) + len(end)] + "\n"
        atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
        print(f"wrote {args.out}")
    return 0


def _device_label(device: torch.device) -> str:
    """The device the steps ran on, as the report names it."""
    if device.type == "cuda":
        return f"CUDA ({torch.cuda.get_device_name(device)})"
    return "the CPU" + (" (CUDA present, not used)" if torch.cuda.is_available() else "")


def student_train_set(cfg) -> SubjectDataset:
    """The student's training set as its runs build it (augmentation as configured)."""
    dm = build_datamodule(cfg, build_source(cfg))
    dm.setup()
    return dm.datasets["train"]


def render(args, scfg, tcfg, rows, loaders, augment, t_step, wall, device: torch.device) -> str:
    cmd = "make bench-speed" if args.out == "docs/performance.md" and not args.overrides else \
        "python experiments/bench_speed.py " + " ".join(sys.argv[1:])
    L = ["# Performance", "",
         f"Generated by `{cmd}` (`experiments/bench_speed.py`; {wall:.0f} s). lightning_distill {__version__}, "
         f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, "
         f"training steps on {_device_label(device)}, fp32. Do not edit by hand.", "",
         "## Training-step cost of each method", "",
         f"Student `{scfg.model.name}/{scfg.model.encoder}` on {list(scfg.data.shape)} single slices, batch "
         f"{scfg.data.batch_size}, the same 4 batches for every variant; variants interleaved step by step; "
         f"{args.steps} timed rounds after 3 warm-up rounds. A step = `model_step` (forward and every loss term) + "
         "backward + fused AdamW step.", "",
         ("| method | median step (s) | IQR (s) | × baseline | target | host RSS + GPU peak (MiB) | GPU peak allocated (MiB) |"
          if device.type == "cuda" else
          "| method | median step (s) | IQR (s) | × baseline | target | peak RSS (MiB) | training adds (MiB) |"),
         "|---|---|---|---|---|---|---|"]
    for name, med, q1, q3, ratio, (before, after), ok in rows:
        mem = "n/a | n/a" if after is None else f"{after:.0f} | {after - before:.0f}"
        L.append(f"| {name} | {med:.3f} | {q1:.3f}–{q3:.3f} | {ratio:.3f} | {ok or '—'} | {mem} |")
    L += ["", "- `prototype-dist` never runs a teacher: its extra cost is a class-masked mean of the softmax and two "
          "K×K Pearson terms (geometry `prob`); `prototype-logprob` and `prototype-offdiag` are the same with the other "
          "geometries (`distill.geometry`). `prototype-dist+figure` also computes the contribution figure "
          "`train/dist_grad_ratio` (two `autograd.grad` calls through the loss heads) at every step: its worst case, "
          "as runs compute it every `distill.grad_every` steps (default 25). `pixel-dist` runs a same-size 2D teacher forward pass (no backward) every step and "
          "needs paired 2D teacher inputs. `sikd` builds the class-mean image and runs its (skip-less) teacher forward "
          "every step, then an MSE on the penultimate features found through forward hooks. `cmedl` trains five "
          "networks at once: G_AB and G_BA (four generator passes for the cycle), two PatchGANs (generator and "
          "discriminator passes), the teacher on pseudo-MRI and the student, with three optimiser steps; its "
          "translator is `experiments/cmedl.yaml`'s (ResNet generator, width "
          f"{load_config(REPO / 'experiments/cmedl.yaml').cmedl.channels}). `transfer-soft` learns from one "
          "teacher-labelled slice per labelled slice (`transfer.slices`, `transfer.ratio=1`, soft KL at tau 1): both go "
          "through the network in one forward, so it sees twice the pixels of the baseline; it runs no teacher.",
          "- Memory: each variant alone in a fresh process (same config, one batch, 3 steps): peak resident memory "
          "(Linux `VmHWM`, which includes the Python runtime, libraries and the loaded data) and how much the training "
          "steps add to the peak reached after building the data and the networks (activations, gradients, "
          "optimizer state, the teacher's forward).", "",
          "## Data loaders", "",
          "Training loaders of the run configs (`num_workers` as configured), one full pass cold (renders or reads "
          "and caches each subject) and one warm (cached). Consumption = batch size / median training-step time "
          f"(teacher `{tcfg.model.name}` step on {list(tcfg.data.shape)}: {t_step:.3f} s).", "",
          "| loader | workers | cold (samples/s) | warm (samples/s) | training consumes (samples/s) | cold / consumption | warm / consumption | target (warm) |",
          "|---|---|---|---|---|---|---|---|"]
    for name, cfg, rates, need in loaders:
        ratio = rates[-1] / need
        workers = cfg.data.num_workers if isinstance(cfg.data.num_workers, int) else f"{cfg.data.num_workers} ({loader_workers(cfg)})"
        L.append(f"| {name} | {workers} | {rates[0]:.0f} | {rates[-1]:.0f} | {need:.1f} | {rates[0] / need:.1f}× | {ratio:.1f}× | "
                 f"{'meets' if ratio >= LOADER_TARGET else 'MISSES'} ≥ {LOADER_TARGET:.0f}× |")
    L += ["", "The cold pass happens once per run (subjects are cached in memory after their first use).", "",
          "Training augmentation per sample (median ms over 60 samples; the MONAI `Compose` of `SubjectDataset.augmentation`, "
          "the same inputs and seeds both ways, interleaved): as the package runs it, with MONAI's metadata tracking "
          "off (the same values, tested in `tests/data/test_spatial_augment.py`), and with MONAI's default (tracking on).", "",
          "| loader | augmentation | package (ms) | MONAI default (ms) | package / default |", "|---|---|---|---|---|"]
    for (name, ms), (_, cfg, _, _) in zip(augment, loaders):
        steps = (["affine"] if cfg.data.spatial_augment != "none" else []) + (["intensity"] if cfg.data.augment else [])
        L.append(f"| {name} | {' + '.join(steps) or 'none'} | {ms['package']:.2f} | {ms['monai default']:.2f} | "
                 f"{ms['package'] / ms['monai default']:.2f} |")
    L += [""]
    return "\n".join(L)


if __name__ == "__main__":
    sys.exit(main())
