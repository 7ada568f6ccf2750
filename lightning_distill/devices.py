"""Trainer defaults chosen from the machine a run starts on (docs/gpu.md).

What differs between a CPU and a GPU is chosen here at run time, without initialising CUDA in the
launching process (a CUDA context created before Lightning's DDP launcher forks or spawns breaks the
children, and costs ~300 MB of GPU memory per process that never trains), and printed by ``fit``:

* ``devices``: 1. A plain ``fit`` never becomes an N-GPU DDP run silently (the global batch would grow
  N times with the same learning rate and ``max_steps``); ask for it with ``trainer.devices=N``.
* ``precision``: ``bf16-mixed`` on GPUs with native bf16 (compute capability >= 8.0: Ampere and
  later), ``16-mixed`` (fp16 with a gradient scaler) on older GPUs, where bf16 is emulated and slow,
  ``32-true`` on CPU (bf16 autocast is ~2x slower than fp32 on CPUs without bf16 units).
* ``sync_batchnorm``: ``true`` when ``trainer.devices`` asks for more than one GPU, so batch-norm
  statistics are those of the global batch (N processes x B = one process x N*B, as the Dice, the
  prototype-DIST terms and the bank already are). torch's SyncBatchNorm runs on CUDA only: CPU (gloo)
  DDP keeps per-process statistics.
* ``deterministic``: ``true`` becomes ``"warn"`` on CUDA: some CUDA kernels the package uses have no
  deterministic implementation (2D cross-entropy's backward, reflection padding's backward), and
  ``true`` makes them raise; ``"warn"`` keeps every deterministic kernel and warns about the others.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

_QUERY = "import torch; c = torch.cuda.get_device_capability(0); print(c[0], c[1], torch.cuda.get_device_name(0))"


def process_group_size() -> int:
    """Processes of the default ``torch.distributed`` group (1 without an initialised one)."""

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def cuda_available() -> bool:
    """``torch.cuda.is_available()`` (it counts devices without creating a CUDA context)."""
    return bool(torch.cuda.is_available())


def cuda_capability() -> Optional[Tuple[int, int, str]]:
    """``(major, minor, name)`` of CUDA device 0, or ``None`` without CUDA, learnt without initialising
    CUDA in this process: through NVML when ``pynvml`` is installed, else in a short child process."""
    if not cuda_available():
        return None
    if torch.cuda.is_initialized():  # already paid for: ask directly
        major, minor = torch.cuda.get_device_capability(0)
        return major, minor, torch.cuda.get_device_name(0)
    try:
        import pynvml  # deferred: optional, GPU machines only

        pynvml.nvmlInit()
        try:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
            index = int(visible) if visible.isdigit() else 0
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            return int(major), int(minor), name.decode() if isinstance(name, bytes) else str(name)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no pynvml, or NVML refused (a UUID in CUDA_VISIBLE_DEVICES, MIG, ...): ask a child
        pass
    try:
        out = subprocess.run([sys.executable, "-c", _QUERY], capture_output=True, text=True, timeout=120, check=True).stdout
        major, minor, name = out.strip().split(" ", 2)
        return int(major), int(minor), name
    except Exception:
        return None


def default_precision(capability: Optional[Tuple[int, int, str]]) -> Tuple[str, str]:
    """``(precision, why)`` for the device of ``capability`` (``None``: CPU)."""
    if capability is None:
        return "32-true", "CPU: bf16 autocast is slower than fp32 on CPUs without bf16 units"
    major, minor, name = capability
    if major >= 8:
        return "bf16-mixed", f"{name}, compute capability {major}.{minor}: native bf16"
    return "16-mixed", f"{name}, compute capability {major}.{minor}: bf16 would be emulated, fp16 with a gradient scaler"


def apply_trainer_defaults(user: Dict[str, Any]) -> Tuple[Dict[str, Any], List[str]]:
    """The run's trainer arguments: the user's over the defaults chosen for this machine, and a line per choice.

    Args:
        user: the run's ``trainer`` settings (``trainer.*`` keys); they win over every default, except
            ``deterministic=true`` on CUDA, which becomes ``"warn"``.

    Returns:
        ``(args, notes)``: arguments for ``lightning.Trainer``, and what was chosen and why (``fit`` prints them).
    """
    on_cuda = uses_cuda(user)
    defaults: Dict[str, Any] = {"accelerator": "auto", "devices": 1, "log_every_n_steps": 10, "num_sanity_val_steps": 0}
    notes: List[str] = []
    if "devices" not in user:
        notes.append("trainer.devices=1 (set trainer.devices=N for N-device DDP; the global batch is then N x data.batch_size)")
    if "precision" not in user:
        precision, why = default_precision(cuda_capability() if on_cuda else None)
        defaults["precision"] = precision
        notes.append(f"trainer.precision={precision} ({why})")
    n = user.get("devices", 1)
    if on_cuda and n not in (1, "1", [0]) and "sync_batchnorm" not in user:  # torch's SyncBatchNorm is CUDA only
        defaults["sync_batchnorm"] = True
        notes.append(f"trainer.sync_batchnorm=true (trainer.devices={n}: batch statistics over the global batch, as in one "
                     "process; set trainer.sync_batchnorm=false for per-device statistics)")
    if on_cuda and "benchmark" not in user and not user.get("deterministic"):
        defaults["benchmark"] = True
        notes.append("trainer.benchmark=true (cuDNN picks the fastest convolution algorithms for the fixed input sizes)")
    args = {**defaults, **user}
    if on_cuda and user.get("deterministic") is True:
        args["deterministic"] = "warn"
        notes.append("trainer.deterministic=warn instead of true on CUDA (2D cross-entropy's and reflection padding's "
                     "backward have no deterministic CUDA kernel; true would raise)")
    return args, notes


def minutes_setting(value: Any, key: str, on_cuda: bool, gpu_default: float) -> float:
    """A ``*_min_minutes`` setting in minutes: ``auto`` is 0 on CPU and ``gpu_default`` on a GPU.

    Raises:
        ValueError: naming ``key``, for a value that is neither ``auto`` nor a number >= 0.
    """
    if value is None or str(value).strip().lower() == "auto":
        return float(gpu_default) if on_cuda else 0.0
    try:
        minutes = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{key} must be auto or a number of minutes >= 0, got {value!r}") from None
    if not minutes >= 0:
        raise ValueError(f"{key} must be auto or a number of minutes >= 0, got {value!r}")
    return minutes


def uses_cuda(user: Dict[str, Any]) -> bool:
    """Whether a trainer with the ``trainer.*`` settings ``user`` trains on CUDA on this machine."""
    return str(user.get("accelerator", "auto")) in ("auto", "gpu", "cuda") and cuda_available()


def accel_settings(accel: Any, on_cuda: bool, spatial_dims: int) -> Tuple[Dict[str, Any], List[str]]:
    """``{"channels_last", "compile", "matmul_precision"}`` from the ``accel.*`` settings (``auto`` resolved
    for the device) and a line per choice made on a GPU.

    Raises:
        ValueError: ``accel.channels_last`` is neither ``auto`` nor a boolean.
    """
    cl = accel.channels_last
    if isinstance(cl, str) and cl.strip().lower() == "auto":
        cl = on_cuda and spatial_dims == 2
    elif not isinstance(cl, bool):
        raise ValueError(f"accel.channels_last must be auto, true or false, got {cl!r}")
    mp = accel.matmul_precision
    if mp == "auto":
        mp = "high" if on_cuda else None
    notes = []
    if on_cuda:
        notes.append(f"accel.channels_last={str(bool(cl)).lower()}" + (f", accel.matmul_precision={mp} (TF32 matmuls)" if mp else ""))
    if accel.compile:
        notes.append("accel.compile=true (the network is compiled in place at its first step)")
    return {"channels_last": bool(cl), "compile": bool(accel.compile), "matmul_precision": mp}, notes


def resolve_device(spec: str = "auto") -> torch.device:
    """``auto`` (CUDA device 0 when available, else the CPU), ``cpu``, ``cuda`` or ``cuda:N``.

    Raises:
        ValueError: an unknown device, or CUDA asked for on a machine without it.
    """
    spec = str(spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if cuda_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise ValueError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {spec!r}; valid: auto, cpu, cuda, cuda:N")
    if device.type == "cuda":
        if not cuda_available():
            raise ValueError(f"device {spec!r} asked for, but this machine has no CUDA device (torch.cuda.is_available() "
                             "is False): use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} asked for, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast_for(device: torch.device):
    """The inference autocast of ``device``: bf16 on GPUs with native bf16, fp16 on older GPUs, none on CPU
    (probabilities are taken in float32 after the network either way)."""

    if device.type != "cuda":
        return contextlib.nullcontext()
    precision, _ = default_precision(cuda_capability())
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
