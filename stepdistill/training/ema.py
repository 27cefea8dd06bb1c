"""Evaluation EMA of trained weights (spec A.5, the *evaluation* role, never fed to a loss).

After each real update of a module: ``theta_ema <- mu * theta_ema + (1 - mu) * theta``, computed as
``theta_ema.lerp_(theta, 1 - mu)`` with one ``torch._foreach_lerp_`` per dtype group. The shadow weights are kept in
fp32 (whatever the parameter dtype) so small ``1 - mu`` increments are not rounded away. Only parameters that
require grad are tracked (a LoRA student's frozen base is not copied).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch
from torch import nn

from ..models.backbones import unwrap

__all__ = ["EMA"]


class EMA:
    """Shadow copies of the trainable parameters of named modules.

    ``modules``: name -> module (wrappers such as DDP are unwrapped); ``decay``: mu in [0, 1).
    """

    def __init__(self, modules: dict[str, nn.Module], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self._params: dict[str, dict[str, nn.Parameter]] = {}
        self.shadow: dict[str, dict[str, torch.Tensor]] = {}
        for name, module in modules.items():
            if "." in name:
                raise ValueError(f"module name {name!r} must not contain '.'")
            params = {k: p for k, p in unwrap(module).named_parameters() if p.requires_grad}
            self._params[name] = params
            self.shadow[name] = {k: p.detach().to(torch.float32 if p.is_floating_point() else p.dtype, copy=True)
                                 for k, p in params.items()}

    @property
    def names(self) -> list[str]:
        return list(self._params)

    @torch.no_grad()
    def update(self, names: Iterable[str] | None = None) -> None:
        """One EMA step for the given modules (all by default): ``shadow.lerp_(param, 1 - decay)``."""
        weight = 1.0 - self.decay
        groups: dict[torch.dtype, tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for name in self.names if names is None else names:
            for key, p in self._params[name].items():
                s = self.shadow[name][key]
                src = p.detach() if p.dtype == s.dtype else p.detach().to(s.dtype)
                dst, srcs = groups.setdefault(s.dtype, ([], []))
                dst.append(s)
                srcs.append(src)
        for dst, srcs in groups.values():
            torch._foreach_lerp_(dst, srcs, weight)

    @torch.no_grad()
    def copy_to(self, names: Iterable[str] | None = None) -> None:
        """Write the shadow weights into the live modules (e.g. before export)."""
        for name in self.names if names is None else names:
            for key, p in self._params[name].items():
                p.copy_(self.shadow[name][key])

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """Temporarily run the modules with the EMA weights (for sampling); the training weights come back after."""
        backup = {name: {k: p.detach().clone() for k, p in params.items()} for name, params in self._params.items()}
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for name, params in self._params.items():
                    for key, p in params.items():
                        p.copy_(backup[name][key])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Flat ``{"module.param": tensor}`` (what goes into ``ema.safetensors``)."""
        return {f"{name}.{k}": t for name, tensors in self.shadow.items() for k, t in tensors.items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load a flat state; every tracked key must be present with its shape, and nothing else."""
        expected = {f"{name}.{k}": t for name, tensors in self.shadow.items() for k, t in tensors.items()}
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"EMA state does not match the trained modules: missing {missing[:5]}, "
                           f"unexpected {unexpected[:5]} (was train.ema_decay or the recipe changed?)")
        for key, t in expected.items():
            if state[key].shape != t.shape:
                raise ValueError(f"EMA tensor {key} has shape {tuple(state[key].shape)}, expected {tuple(t.shape)}")
            t.copy_(state[key])
