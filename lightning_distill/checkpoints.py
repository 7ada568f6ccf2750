"""A ``lightning-distill fit`` checkpoint read back: its dict, its run config and its network.

Below every user of a trained network (``predict``, ``evaluate``, resume, frozen teachers, ``bank
build``, ``teach``), so that none of them imports another for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence, Tuple

import torch
from omegaconf import DictConfig

from lightning_distill.config.run import load_config_dict
from lightning_distill.networks import build_net


def load_checkpoint(path: str | Path, overrides: Sequence[str] = ()) -> Tuple[dict, DictConfig]:
    """The raw checkpoint dict and its run config (with ``overrides`` applied)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {str(p)!r} does not exist")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)  # our own Lightning checkpoints
    except Exception as e:  # noqa: BLE001
        raise ValueError(f"checkpoint {str(p)!r} could not be read ({type(e).__name__}: {e}); it is truncated or not a checkpoint") from None
    hp = ckpt.get("hyper_parameters", {}) if isinstance(ckpt, dict) else {}
    if "config" not in hp or "state_dict" not in ckpt:
        raise ValueError(f"checkpoint {str(p)!r} has no lightning_distill config; was it written by `lightning-distill fit`?")
    return ckpt, load_config_dict(hp["config"], overrides, where=str(p))


def load_network(ckpt: dict, cfg: DictConfig) -> torch.nn.Module:
    names = list(ckpt["hyper_parameters"]["class_names"])
    net = build_net(cfg, len(names))
    state = {k[len("net."):]: v for k, v in ckpt["state_dict"].items() if k.startswith("net.")}
    net.load_state_dict(state)
    return net.eval()
