"""The bank controls: the teacher's bank with its content taken out (identity, flat, shuffled)."""

from __future__ import annotations

import torch

from lightning_distill.bank.format import Bank

BANK_CONTROLS = ("none", "identity", "flat", "shuffled")


def control_bank(bank: Bank, kind: str = "none", seed: int = 0) -> Bank:
    """The bank with the teacher's content taken out, for the controls of a distillation experiment.

    A gain that survives a control is not the teacher's knowledge. Every stored temperature is
    transformed alike; rows of classes the bank never saw stay 0.

    * ``identity``: ``eye(K)``: a teacher that is right with certainty and knows no confusion.
    * ``flat``: each row keeps the teacher's diagonal (its confidence in the class) and spreads the
      rest evenly over the other classes: the confidence without the confusion pattern.
    * ``shuffled``: each row's off-diagonal entries permuted at random (``seed``); the diagonal and
      the row's off-diagonal mass are kept: the teacher's numbers in a meaningless order.

    Args:
        bank: a probability-space (K x K) bank.
        kind: ``none`` (the bank itself) or one of the above.
        seed: the permutations of ``shuffled``.

    Raises:
        ValueError: an unknown ``kind``, or a control of a feature-space bank.
    """
    if kind not in BANK_CONTROLS:
        raise ValueError(f"unknown bank control {kind!r}; valid: {list(BANK_CONTROLS)}")
    if kind == "none":
        return bank
    if bank.space != "prob":
        raise ValueError(f"bank controls ({kind}) are defined for probability (K x K) banks, this one is {bank.space}")
    k = len(bank.class_names)
    g = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(k - 1, generator=g) for _ in range(k)]
    eye = torch.eye(k)

    def transform(p: torch.Tensor) -> torch.Tensor:
        if kind == "identity":
            out = eye.clone()
        elif kind == "flat":
            d = p.diagonal()
            out = ((1 - d) / max(k - 1, 1))[:, None].expand(k, k).clone()
            out[range(k), range(k)] = d
        else:
            out = p.clone()
            for i in range(k):
                cols = torch.tensor([j for j in range(k) if j != i])
                out[i, cols] = p[i, cols[perms[i]]]
        return out * bank.present[:, None].to(out.dtype)

    meta = {**bank.meta, "control": kind, "control_seed": int(seed) if kind == "shuffled" else None}
    return Bank(transform(bank.prototypes), bank.counts.clone(), list(bank.class_names), bank.tau, bank.space, meta,
                {t: transform(p) for t, p in bank.by_tau.items()})
