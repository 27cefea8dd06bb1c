"""Distances used by the recipes (spec A.5). Computed in float32."""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["l2", "huber_elementwise", "pseudo_huber_per_sample", "distance"]


def l2(a: Tensor, b: Tensor) -> Tensor:
    """``mean((a - b)^2)``."""
    return torch.mean((a.float() - b.float()) ** 2)


def huber_elementwise(a: Tensor, b: Tensor, c: float = 0.001) -> Tensor:
    """LCM's Huber: ``mean(sqrt((a - b)^2 + c^2) - c)``, elementwise (c = 0.001 in the LCM scripts)."""
    d = a.float() - b.float()
    return torch.mean(torch.sqrt(d * d + c * c) - c)


def pseudo_huber_per_sample(a: Tensor, b: Tensor, c: float | None = None) -> Tensor:
    """iCT's pseudo-Huber on each sample's norm: ``sqrt(||a - b||^2 + c^2) - c`` with ``c = 0.00054 sqrt(D)``."""
    d = (a.float() - b.float()).flatten(1)
    c = 0.00054 * math.sqrt(d.shape[1]) if c is None else c
    return torch.mean(torch.sqrt((d * d).sum(1) + c * c) - c)


def distance(name: str, a: Tensor, b: Tensor, huber_c: float = 0.001) -> Tensor:
    if name == "l2":
        return l2(a, b)
    if name == "huber":
        return huber_elementwise(a, b, huber_c)
    if name == "pseudo_huber":
        return pseudo_huber_per_sample(a, b)
    raise ValueError(f"unknown loss {name!r}; expected 'l2', 'huber' or 'pseudo_huber'")
