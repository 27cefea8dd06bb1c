"""Small helpers shared by recipes: seeded draws and target-network EMA."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["draw_uniform", "update_target_ema"]


def draw_uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """n draws from U[low, high] on the CPU generator (the same draws on every device)."""
    return low + (high - low) * torch.rand(n, generator=generator)


@torch.no_grad()
def update_target_ema(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``theta- <- mu theta- + (1 - mu) theta`` for every floating parameter and buffer (spec A.5, target role)."""
    t_params = [p for p in target.parameters()]
    s_params = [p.detach().to(q.dtype) for p, q in zip(source.parameters(), t_params)]
    if len(t_params) != len(list(source.parameters())):
        raise RuntimeError("target and source networks have different parameter lists")
    torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    for tb, sb in zip(target.buffers(), source.buffers()):
        tb.copy_(sb)
