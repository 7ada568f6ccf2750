"""A prototype bank from any trained 3D model over a folder of volumes (``lightning-distill bank build``).

The paper's premise is that 3D CT is abundant and a good 3D model already exists. This computes the
bank (Yu et al. 2024: for each class k, the mean softmax vector over the voxels of class k) from such
a model, in eval mode under ``no_grad``, over whole volumes read from disk:

* **Models** (``model.format``): ``checkpoint`` (a ``lightning-distill fit`` checkpoint: its network,
  class names, preprocessing and patch size), ``monai`` (any class of ``monai.networks.nets`` by
  ``model.name`` with its constructor arguments in ``model.kwargs`` and a ``state_dict`` file),
  ``bundle`` (a MONAI bundle directory: ``network_def`` of ``configs/inference.{json,yaml}`` and the
  weights ``models/model.pt``, or ``models/model.ts``) and ``torchscript`` (a ``torch.jit`` file).
  Nothing is downloaded. The bank's metadata records the format, the file and its SHA-256.
* **Classes**: the model's output channels (``model.labels``, or the checkpoint's class names) are
  mapped to the bank's classes (``classes``, background first): a model label whose name is a bank
  class maps to it, ``class_map`` maps the others (``{model label name or channel index: bank class |
  ignore}``), and what nothing maps follows ``unmapped`` (``background``: its probability adds to the
  background's; ``ignore``: its probability is left out and the rest renormalised; ``error``). A
  bank voxel vector is the mapped probability over the bank's K classes (renormalised to 1).
* **Class of a voxel**: from the case's label file (labelled volumes, mapped to the bank's classes
  like ``data.nifti`` labels) or, for **unlabelled volumes**, the model's own prediction: the bank
  class of highest mapped probability at temperature 1, kept only when that probability (before
  renormalising: ignored labels' mass counts against it) is at least ``threshold``. Which volumes
  were labelled and which pseudo-labelled, the threshold and the voxels kept per class are recorded.
* **Inference**: the model's own preprocessing (orientation, spacing, intensity; a checkpoint's is
  taken from it), then MONAI ``sliding_window_inference`` (``inference.roi_size``, ``overlap``,
  ``sw_batch_size``, ``mode``). Labels follow the image through the same spatial steps (nearest).
* **Bank options**: every temperature of ``bank.taus`` (one K x K matrix each), ``bank.axial_range``.
  Probability space only (a feature-space bank needs the network's layers by name: train the teacher
  with ``bank.space=feature`` instead).
* **Processes and resume**: the cases (sorted by id) are dealt to the processes (``i % world``);
  each process keeps float64 sums and counts and, every ``save_every`` volumes, writes them with the
  ids it has done to ``<output>.partial/state-<rank>-of-<world>.pt`` (atomically). A killed run
  started again with the same config continues from there; at the end the sums are all-reduced
  (``torch.distributed``: gloo on CPU, NCCL on GPUs), rank 0 writes the bank atomically and the
  partial folder is removed. ``processes: N`` starts N local processes; under ``torchrun`` the
  launcher's world is used.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from omegaconf import DictConfig, OmegaConf

from lightning_distill.bank.axial import axial_masked_labels, check_axial_range, warn_empty_classes
from lightning_distill.bank.format import Bank, save_bank
from lightning_distill.config.load import config_key
from lightning_distill.data.case_cache import CaseCache, case_key
from lightning_distill.data.labels import LabelMapping
from lightning_distill.data.nifti import Case, DataError, read_case
from lightning_distill.fingerprint import IntensityCheck
from lightning_distill.io import atomic_write
from lightning_distill.losses.prototype import class_means, masked_class_sums
from lightning_distill.teacher_model import (ClassMap, inference_device, list_cases, load_model, model_logits,
                                             model_preprocess, pseudo_labels)

STATE_FORMAT = 1
# bank build's own names of the settings an intensity warning advises (the checkpoint's preprocessing is replaced
# by data.preprocess only with from_checkpoint=false)
SHIFT_KEYS = {"window": "data.preprocess.from_checkpoint=false data.preprocess.ct_window",
              "modality": "data.preprocess.from_checkpoint=false data.preprocess.modality"}


class _Run:
    """One process's part of a bank build."""

    def __init__(self, cfg: DictConfig, rank: int, world: int):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.model = load_model(cfg.model)
        self.classes = list(cfg.classes) if cfg.classes else list(self.model.labels)
        self.map = ClassMap(self.model.labels, self.classes, dict(cfg.class_map), cfg.unmapped)
        self.pre = model_preprocess(cfg, self.model)
        # each volume against the model's training data (its checkpoint's fingerprint; other formats carry none)
        self.intensity = IntensityCheck(self.model.intensity, self.pre.intensity_settings().get("ct_window"), SHIFT_KEYS)
        self.roi = list(cfg.inference.roi_size) if cfg.inference.roi_size else self.model.roi_size
        self.axial = check_axial_range(cfg.bank.axial_range)
        self.tau = float(cfg.bank.tau)
        if self.tau <= 0 or any(t <= 0 for t in cfg.bank.taus):
            raise ValueError(f"temperatures must be positive, got bank.tau={self.tau}, bank.taus={list(cfg.bank.taus)}")
        self.taus = [self.tau] + sorted({float(t) for t in cfg.bank.taus} - {self.tau})
        if not 0.0 < float(cfg.threshold) <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {cfg.threshold}")
        self.cases, dataset_labels = list_cases(cfg)
        self.mapping = LabelMapping.from_config(self.classes, dataset_labels, cfg.data)
        self.device = inference_device(cfg.inference.device, int(os.environ.get("LOCAL_RANK", rank)))
        self.net = self.model.net.to(self.device)
        self.disk = CaseCache(cfg.data.cache_dir) if cfg.data.cache_dir else None
        self.key = config_key(cfg, ignore=("processes", "save_every", "overwrite"))  # what determines the bank

    # --------------------------------------------------------------- state
    @property
    def partial(self) -> Path:
        return Path(str(self.cfg.output) + ".partial")

    def state_path(self) -> Path:
        return self.partial / f"state-{self.rank}-of-{self.world}.pt"

    def load_state(self) -> Dict[str, Any]:
        k, c = len(self.classes), len(self.classes) * len(self.taus)
        empty = {"format": STATE_FORMAT, "key": self.key, "sums": torch.zeros(k, c, dtype=torch.float64),
                 "counts": torch.zeros(k, dtype=torch.float64), "done": [], "labelled": [], "pseudo": []}
        path = self.state_path()
        if not path.is_file():
            others = list(self.partial.glob("state-*.pt")) if self.partial.is_dir() else []
            if others and not any(p.name.endswith(f"-of-{self.world}.pt") for p in others):
                raise ValueError(f"{self.partial}: holds the state of a run with another number of processes "
                                 f"({sorted(p.name for p in others)}); resume it with that many, or delete the folder")
            return empty
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{path}: resumable state could not be read ({type(e).__name__}); delete {self.partial} "
                             "to start over") from None
        if state.get("key") != self.key:
            raise ValueError(f"{self.partial}: was written by a bank build with another config (model, data, classes or "
                             f"bank options differ); delete it to start over, or set output to another path")
        return state

    def save_state(self, state: Dict[str, Any]) -> None:
        self.partial.mkdir(parents=True, exist_ok=True)
        atomic_write(self.state_path(), lambda tmp: torch.save(state, tmp))

    # --------------------------------------------------------------- one volume
    def preprocessed(self, case: Case) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The case's image ``(C, *spatial)`` and label ``(1, *spatial)`` (or ``None``) on the model's grid,
        from the persistent cache (``data.cache_dir``) when it holds them."""
        key = None
        if self.disk is not None:
            settings = {"preprocess": asdict(self.pre), "lut": sorted(self.mapping.lut.items()),
                        "unmapped": self.mapping.unmapped, "labels": self.cfg.data.labels, "use": "bank build"}
            key = case_key(list(case.images) + ([case.label] if case.label is not None else []), settings)
            hit = self.disk.get(case.case_id, key)
            if hit is not None:
                return torch.from_numpy(hit["image"]), (torch.from_numpy(hit["label"]) if "label" in hit else None)
        image, label, affine, _ = read_case(case, 3, self.mapping, require_foreground=False,
                                            require_label=self.cfg.data.labels == "use")
        if self.model.in_channels is not None and image.shape[0] != self.model.in_channels:
            raise DataError(f"{case.images[0]}: {image.shape[0]} image channel(s); the model takes {self.model.in_channels}")
        img, lbl, _ = self.pre(image, affine, label)
        x, y = img.as_tensor(), (lbl.as_tensor() if lbl is not None else None)
        if self.disk is not None:
            self.disk.put(case.case_id, key, {"image": x.numpy(), **({"label": y.numpy()} if y is not None else {})})
        return x, y

    def check_intensity(self, case: Case, x: torch.Tensor) -> None:
        """Compare a preprocessed volume with the model's training data (its checkpoint's intensity fingerprint; other
        formats carry none): warn, or raise with ``on_shift=error``, before the model sees it."""
        self.intensity.add(x.numpy())
        found = self.intensity.closest()
        if found is None or not found[2]:  # no fingerprint, or like the training data
            return
        distance, profile, _ = found
        image = read_case(case, 3, self.mapping, require_foreground=False, require_label=False)[0]
        what = f"{case.images[0]}: " + self.intensity.unlike(distance, profile, np.asarray(image), of=self.model.source["path"])
        if self.cfg.on_shift == "error":
            raise DataError(f"{what}; nothing of it entered the bank (on_shift=warn would use it anyway)")
        warnings.warn(f"{what}; its voxels enter the bank as they are (on_shift=error stops instead)", stacklevel=2)

    def volume(self, case: Case) -> Tuple[torch.Tensor, torch.Tensor, bool]:
        """``(sums (K, K * T) float64, counts (K,) float64, labelled)`` of one case."""
        x, lbl = self.preprocessed(case)
        self.check_intensity(case, x)
        x = x[None].to(self.device)
        logits = model_logits(self.net, x, self.roi, self.cfg.inference, f"{self.model.source['path']}, {case.images[0]}")
        values = [self.map.probabilities(logits, t)[1] for t in self.taus]  # the bank's vectors at every temperature
        labelled = lbl is not None
        cls = (lbl[None].to(self.device) if labelled
               else pseudo_labels(self.map.probabilities(logits, 1.0)[0], float(self.cfg.threshold)))
        cls = axial_masked_labels(cls, self.axial, 3)
        sums, counts = masked_class_sums(torch.cat(values, dim=1), cls, len(self.classes))
        return sums.double().cpu(), counts.double().cpu(), labelled

    # --------------------------------------------------------------- all
    def run(self, stop_after: Optional[int] = None) -> Optional[Bank]:
        state = self.load_state()
        done = set(state["done"])
        mine = [c for i, c in enumerate(self.cases) if i % self.world == self.rank]
        todo = [c for c in mine if c.case_id not in done]
        if done:
            print(f"[bank build] rank {self.rank}: resuming: {len(done)} of {len(mine)} volumes done", flush=True)
        since, started = 0, time.perf_counter()
        for n, case in enumerate(todo):
            if stop_after is not None and n >= stop_after:
                self.save_state(state)
                return None  # tests: a run stopped here, as a kill after the last write would leave it
            sums, counts, labelled = self.volume(case)
            state["sums"] += sums
            state["counts"] += counts
            state["done"].append(case.case_id)
            state["labelled" if labelled else "pseudo"].append(case.case_id)
            since += 1
            if since >= int(self.cfg.save_every):
                self.save_state(state)
                since = 0
        self.save_state(state)
        sums, counts = state["sums"].clone(), state["counts"].clone()
        tallies = torch.tensor([len(state["labelled"]), len(state["pseudo"])], dtype=torch.float64)
        seconds = torch.tensor([time.perf_counter() - started], dtype=torch.float64)  # this run's volumes (not resumed ones)
        if self.world > 1:
            for t in (sums, counts, tallies):
                dist.all_reduce(t)
            dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        bank = self.bank(sums, counts, int(tallies[0]), int(tallies[1]))
        bank.meta["seconds"] = round(float(seconds), 3)  # the slowest process's volume loop in this run
        return bank

    def bank(self, sums: torch.Tensor, counts: torch.Tensor, labelled: int, pseudo: int) -> Bank:
        if not bool((counts > 0).any()):
            raise ValueError("the bank has no voxel of any class" + (
                f" at threshold {self.cfg.threshold} (no prediction is that confident)" if labelled == 0 else "")
                + (f" in bank.axial_range={list(self.axial)}" if self.axial else ""))
        k = len(self.classes)
        means = [class_means(p, counts).float() for p in sums.split(k, dim=1)]
        meta = {
            "mode": "model", "model": self.model.source, "model_labels": list(self.model.labels),
            "class_map": self.map.how, "volumes": labelled + pseudo, "labelled_volumes": labelled,
            "pseudo_labelled_volumes": pseudo, "threshold": float(self.cfg.threshold) if pseudo else None,
            "class_voxels": {n: int(c) for n, c in zip(self.classes, counts.tolist())},
            "axial_range": None if self.axial is None else list(self.axial),
            "preprocess": {"orientation": self.pre.orientation, "spacing": self.pre.spacing, **self.pre.intensity_settings()},
            "inference": {"roi_size": self.roi, "overlap": float(self.cfg.inference.overlap),
                          "sw_batch_size": int(self.cfg.inference.sw_batch_size), "mode": self.cfg.inference.mode},
            "data": str(self.cfg.data.root), "processes": self.world, "config": OmegaConf.to_container(self.cfg),
        }
        return Bank(means[0], counts.float(), self.classes, self.tau, "prob", meta, dict(zip(self.taus[1:], means[1:])))



def build_bank(cfg: DictConfig, rank: int = 0, world: int = 1, stop_after: Optional[int] = None) -> Optional[Bank]:
    """This process's part of the bank build of ``cfg`` (see the module docstring); rank 0 writes the
    bank to ``cfg.output`` and returns it (other ranks return it too, without writing).

    Args:
        cfg: a :class:`~lightning_distill.config.BankBuildConfig`.
        rank, world: this process and the number of processes (a process group must be initialised
            when ``world > 1``).
        stop_after: stop (state saved, nothing written) after this many volumes: what a killed run
            leaves, for tests.
    """
    out = Path(cfg.output)
    if rank == 0 and out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; set overwrite=true to replace it")
    run = _Run(cfg, rank, world)
    bank = run.run(stop_after)
    if bank is None:
        return None
    if world > 1:
        dist.barrier()
    if rank == 0:
        empty = warn_empty_classes(bank.counts, bank.class_names, run.axial, "bank build")
        bank.meta["empty_classes"] = empty
        out.parent.mkdir(parents=True, exist_ok=True)
        save_bank(out, bank)
        shutil.rmtree(run.partial, ignore_errors=True)
    if world > 1:
        dist.barrier()  # every process returns once the bank is written
    return bank


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world: int, cfg_dict: Dict[str, Any], port: int, threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    backend = "nccl" if torch.cuda.is_available() and OmegaConf.create(cfg_dict).inference.device != "cpu" else "gloo"
    dist.init_process_group(backend, rank=rank, world_size=world)
    try:
        build_bank(OmegaConf.create(cfg_dict), rank, world)
    finally:
        dist.destroy_process_group()


def run_bank_build(cfg: DictConfig) -> Path:
    """Build the bank of ``cfg`` in this process, under ``torchrun`` (its world), or in ``processes``
    local processes; returns the bank's path."""
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env > 1:  # torchrun / srun: one of several processes already
        backend = "nccl" if torch.cuda.is_available() and cfg.inference.device != "cpu" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend)
        build_bank(cfg, dist.get_rank(), dist.get_world_size())
        return Path(cfg.output)
    n = int(cfg.processes)
    if n < 1:
        raise ValueError(f"processes must be at least 1, got {n}")
    if n == 1:
        build_bank(cfg)
        return Path(cfg.output)
    out = Path(cfg.output)
    if out.exists() and not cfg.overwrite:
        raise FileExistsError(f"{out} exists; set overwrite=true to replace it")

    threads = max(1, torch.get_num_threads() // n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mp.spawn(_worker, args=(n, OmegaConf.to_container(cfg), _free_port(), threads), nprocs=n, join=True)
    return out


def describe(bank: Bank) -> str:
    """A few lines about a built bank (printed by the CLI)."""
    m = bank.meta
    lines = [f"bank of {len(bank.class_names)} classes from {m['model']['format']} {m['model']['path']} "
             f"(sha256 {m['model']['sha256'][:12]}...)",
             f"volumes: {m['volumes']} ({m['labelled_volumes']} labelled, {m['pseudo_labelled_volumes']} pseudo-labelled"
             + (f" at threshold {m['threshold']:g}" if m["threshold"] is not None else "") + ")",
             "voxels per class: " + ", ".join(f"{n} {c}" for n, c in m["class_voxels"].items())]
    return "\n".join(lines)

