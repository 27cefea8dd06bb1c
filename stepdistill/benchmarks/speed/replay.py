"""Replay one recorded network call alone: the forward under the recorded grad mode (and jvp, adapters state,
autocast), and, for calls whose output received a gradient, forward + backward.

The backward computes what the real update's backward needed from this call: the gradients of every parameter the
loss's ``backward(inputs=...)`` targeted that this call's graph reaches (its own, or another module's that runs
inside it, e.g. AGD's adapters hooked into the frozen UNet), plus the gradients of the call's inputs that required
grad when the backward also targeted parameters outside this network (the gradient has to flow on through them,
e.g. DMD2's GAN loss through the fake score into the generator). ``torch.autograd.grad`` is used, so nothing is
accumulated into ``.grad``.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch
from torch import nn

from .recorder import RecordedCall, tensors_in

__all__ = ["CallReplay"]


def _substitute(obj, duals):
    if isinstance(obj, tuple) and len(obj) == 2 and obj[0] == "__dual__":
        return duals[obj[1]]
    if isinstance(obj, dict):
        return {k: _substitute(v, duals) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_substitute(v, duals) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_substitute(v, duals) for v in obj)
    return obj


class CallReplay:
    """Callables that run one :class:`RecordedCall` alone: :meth:`forward` and :meth:`forward_backward`."""

    def __init__(self, call: RecordedCall, module: nn.Module,
                 autocast: Callable[[], contextlib.AbstractContextManager]):
        self.call, self.module, self.autocast = call, module, autocast
        self.tangents = [torch.randn_like(d) for d in call.duals]
        own = {id(p) for p in module.parameters()}
        self.params = [p for p in call.backward_inputs.values() if p.requires_grad]
        self.param_grads: int | None = None  # parameters the replayed backward reached (set by forward_backward)
        flows_on = bool(set(call.backward_inputs) - own)
        self.inputs = [t for t in tensors_in(call.args) + tensors_in(call.kwargs)
                       if t.requires_grad and t.is_floating_point()] if flows_on else []
        self.needs_backward = call.got_grad and bool(self.params or self.inputs)

    def _invoke(self, duals):
        c, m = self.call, self.module
        args, kwargs = _substitute(c.args, duals), _substitute(c.kwargs, duals)
        fn = m if c.method == "forward" else getattr(m, c.method)
        if c.partial:
            from ...recipes.gan_head import BottleneckFeatures

            return BottleneckFeatures(m)(lambda: fn(*args, **kwargs))
        return fn(*args, **kwargs)

    def _run(self, grad: bool):
        c = self.call
        adapters = contextlib.nullcontext()
        if c.adapters_off:
            from ...models.student import adapters_disabled

            adapters = adapters_disabled(self.module)
        with adapters, torch.set_grad_enabled(grad), self.autocast():
            if c.duals:
                return torch.func.jvp(lambda *d: self._invoke(list(d)), tuple(c.duals), tuple(self.tangents))
            return self._invoke([])

    def forward(self) -> None:
        """The call's forward alone, under its recorded grad mode (a graph is built when grad was enabled)."""
        self._run(self.call.grad_enabled)

    def forward_backward(self) -> None:
        """Forward + the backward the real update ran through this call."""
        out = self._run(True)
        outs = [t for t in tensors_in(out) if t.requires_grad]
        if not outs:
            raise RuntimeError(f"replay of {self.call.network}.{self.call.method}: the output has no graph")
        grads = torch.autograd.grad(outs, self.params + self.inputs, grad_outputs=[torch.ones_like(t) for t in outs],
                                    allow_unused=True)
        self.param_grads = sum(p.numel() for p, g in zip(self.params, grads) if g is not None)
