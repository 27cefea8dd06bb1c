"""Small helpers shared by recipes: seeded draws, target-network EMA, the discrete-VP check."""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

__all__ = ["discrete_vp_process", "draw_uniform", "update_target_ema"]


def discrete_vp_process(teacher, recipe: str, need: str = "integer timesteps"):
    """The teacher's process, for recipes that need a discrete VP (``need`` says why, for the error message)."""
    from ..diffusion.processes import DiscreteVP

    process = teacher.denoiser.process
    if not isinstance(process, DiscreteVP):
        raise ValueError(f"this {recipe} implementation needs a discrete VP teacher ({need}); this teacher's process "
                         f"is {process.kind}")
    return process


def draw_uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    """n draws from U[low, high] on the CPU generator (the same draws on every device)."""
    return low + (high - low) * torch.rand(n, generator=generator)


_EMA_PAIRS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _ema_pairs(target: nn.Module, source: nn.Module) -> tuple[list, list, list, list]:
    """(target params, source params, target buffers, source buffers), walked once per (target, source) pair: the
    module walks cost more than the update itself on small networks (``stepdistill bench speed``). Parameter and
    buffer *objects* are cached (not their data), so in-place loads and ``.to()`` moves stay visible."""
    entry = _EMA_PAIRS.get(target)
    if entry is None or entry[0]() is not source:
        t_params, s_params = list(target.parameters()), list(source.parameters())
        if len(t_params) != len(s_params):
            raise RuntimeError("target and source networks have different parameter lists")
        entry = (weakref.ref(source), t_params, s_params, list(target.buffers()), list(source.buffers()))
        _EMA_PAIRS[target] = entry
    return entry[1:]


@torch.no_grad()
def update_target_ema(target: nn.Module, source: nn.Module, decay: float) -> None:
    """``theta- <- mu theta- + (1 - mu) theta`` for every floating parameter and buffer (spec A.5, target role)."""
    t_params, s_params, t_bufs, s_bufs = _ema_pairs(target, source)
    s_params = [p if p.dtype == q.dtype else p.to(q.dtype) for p, q in zip(s_params, t_params)]
    torch._foreach_lerp_(t_params, s_params, 1.0 - decay)
    for tb, sb in zip(t_bufs, s_bufs):
        tb.copy_(sb)
