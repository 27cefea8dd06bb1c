"""Record every network call of one real training update, so each can be replayed and timed alone.

While a :class:`CallRecorder` is active, a forward pre-hook (or, for VAEs, a wrapper around ``encode``/``decode``)
on each network stores, per call: the network, the method, the inputs (detached references; tensors that required
grad keep that flag for the replay), whether grad was enabled, whether the call ran inside a ``torch.func.jvp``
(the tangent inputs are then the functorch-wrapped ones), and whether LoRA adapters were disabled (LoRA recipes
run the teacher as the student module with adapters off). A tensor hook on the output says whether the output
received a gradient, and during which ``backward`` (the loop's ``accelerator.backward(loss, inputs=params)``,
intercepted for this one update), which tells the replay which parameter gradients that backward computed.

A call that stops early by raising (DMD2's GAN features: the forward is cut at the bottleneck by
``recipes.gan_head.BottleneckFeatures``) is recorded as ``partial``; its bottleneck output takes the place of the
output, and the replay cuts the forward at the same place.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .networks import hooked_methods

__all__ = ["RecordedCall", "CallRecorder", "tensors_in"]

_F = torch._C._functorch


def _plain(t: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """(the underlying plain tensor, whether ``t`` was functorch-wrapped, e.g. a jvp dual)."""
    wrapped = False
    while _F.is_functorch_wrapped_tensor(t):
        t, wrapped = _F.get_unwrapped(t), True
    return t, wrapped


def tensors_in(obj: Any) -> list[torch.Tensor]:
    """Every tensor in a nested structure (tuples, lists, dicts, Diffusers output dataclasses)."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):  # includes diffusers BaseOutput (an OrderedDict)
        return [t for v in obj.values() for t in tensors_in(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in tensors_in(v)]
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("stepdistill"):
        return [t for v in vars(obj).values() for t in tensors_in(v)]
    return []


def _capture(obj: Any, duals: list):
    """A copy of ``obj`` whose tensors are detached plain references; functorch-wrapped tensors are replaced by a
    placeholder ``("__dual__", i)`` and their values appended to ``duals``."""
    if isinstance(obj, torch.Tensor):
        plain, wrapped = _plain(obj)
        value = plain.detach()
        if obj.requires_grad and not wrapped:
            value = value.requires_grad_(True) if value.is_floating_point() else value
        if wrapped:
            duals.append(value)
            return ("__dual__", len(duals) - 1)
        return value
    if isinstance(obj, dict):
        return {k: _capture(v, duals) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_capture(v, duals) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_capture(v, duals) for v in obj)
    if hasattr(obj, "__dict__") and type(obj).__module__.startswith("stepdistill"):
        import copy

        new = copy.copy(obj)
        for k, v in vars(obj).items():
            setattr(new, k, _capture(v, duals))
        return new
    return obj


def _adapters_off(module: nn.Module) -> bool:
    """True when ``module`` carries peft LoRA layers and they are disabled right now."""
    for m in module.modules():
        flag = getattr(m, "disable_adapters", None) if hasattr(m, "active_adapters") else None
        if isinstance(flag, bool):  # peft's BaseTunerLayer (the model's own disable_adapters is a method)
            return flag
    return False


@dataclass
class RecordedCall:
    """One network call of the recorded update."""

    network: str
    method: str
    args: tuple
    kwargs: dict
    grad_enabled: bool
    duals: list = field(default_factory=list)
    adapters_off: bool = False
    outputs: list = field(default_factory=list)  # output tensors that carried a graph
    partial_outputs: list = field(default_factory=list)  # bottleneck outputs (for calls cut short)
    finished: bool = False
    backward_inputs: dict = field(default_factory=dict)  # id -> param that a backward through it targeted
    got_grad: bool = False
    order: int = 0

    @property
    def kind(self) -> str:
        return "jvp" if self.duals else "forward"

    @property
    def partial(self) -> bool:
        return not self.finished

    @property
    def batch_size(self) -> int | None:
        for t in self.duals + tensors_in(self.args) + tensors_in(self.kwargs):
            if isinstance(t, torch.Tensor) and t.ndim >= 1:
                return int(t.shape[0])
        return None


class CallRecorder:
    """Context manager: hooks ``networks`` and the accelerator's ``backward`` and records one update's calls."""

    def __init__(self, networks: dict[str, nn.Module], accelerator=None):
        self.networks = networks
        self.accelerator = accelerator
        self.calls: list[RecordedCall] = []
        self._open: dict[int, RecordedCall] = {}
        self._handles: list = []
        self._patched: list[tuple[Any, str]] = []
        self._backward_targets: dict[int, torch.Tensor] = {}

    # ---------------------------------------------------------------- hooks
    def _start(self, name: str, method: str, module: nn.Module, args, kwargs) -> RecordedCall:
        duals: list = []
        call = RecordedCall(network=name, method=method, args=_capture(tuple(args), duals),
                            kwargs=_capture(dict(kwargs), duals), grad_enabled=torch.is_grad_enabled(),
                            duals=duals, adapters_off=_adapters_off(module), order=len(self.calls))
        self.calls.append(call)
        self._open[id(module)] = call
        return call

    def _finish(self, module: nn.Module, output) -> None:
        call = self._open.pop(id(module), None)
        if call is None:
            return
        call.finished = True
        self._watch(call, output, call.outputs)

    def _watch(self, call: RecordedCall, output, into: list) -> None:
        for t in tensors_in(output):
            if _F.is_functorch_wrapped_tensor(t) or not t.requires_grad:
                continue
            into.append(t)

            def hook(grad, call=call):
                call.got_grad = True
                call.backward_inputs.update(self._backward_targets)
                return None

            t.register_hook(hook)

    def _hook_forward(self, name: str, module: nn.Module) -> None:
        def pre(mod, args, kwargs):
            self._open.pop(id(mod), None)  # a previous call that raised (cut short) stays recorded as partial
            self._start(name, "forward", mod, args, kwargs)

        def post(mod, args, kwargs, output):
            self._finish(mod, output)

        # prepend: see the inputs as the caller passed them, before other pre-hooks (e.g. AGD's) rewrite them
        self._handles.append(module.register_forward_pre_hook(pre, with_kwargs=True, prepend=True))
        self._handles.append(module.register_forward_hook(post, with_kwargs=True))
        bottleneck = _bottleneck(module)
        if bottleneck is not None:
            def mid(_m, _a, output, module=module):
                call = self._open.get(id(module))
                if call is not None:
                    self._watch(call, output, call.partial_outputs)

            self._handles.append(bottleneck.register_forward_hook(mid))

    def _hook_method(self, name: str, module: nn.Module, method: str) -> None:
        original = getattr(module, method)

        @functools.wraps(original)
        def wrapper(*args, **kwargs):
            self._start(name, method, module, args, kwargs)
            out = original(*args, **kwargs)
            self._finish(module, out)
            return out

        setattr(module, method, wrapper)
        self._patched.append((module, method))

    def __enter__(self) -> "CallRecorder":
        for name, module in self.networks.items():
            for method in hooked_methods(module):
                if method == "forward":
                    self._hook_forward(name, module)
                else:
                    self._hook_method(name, module, method)
        acc = self.accelerator
        if acc is not None:
            original = acc.backward

            def backward(loss, **kwargs):
                self._backward_targets = {id(p): p for p in kwargs.get("inputs") or ()}
                try:
                    return original(loss, **kwargs)
                finally:
                    self._backward_targets = {}

            acc.backward = backward
            self._patched.append((acc, "backward"))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        for obj, attr in self._patched:
            with contextlib.suppress(AttributeError):
                delattr(obj, attr)  # the instance attribute shadowed the class's method
        self._handles, self._patched = [], []
        for call in self.calls:  # drop graph references so the recorded update's memory is freed
            call.outputs, call.partial_outputs = [], []


def _bottleneck(module: nn.Module) -> nn.Module | None:
    """Where DMD2's GAN features cut the forward (``recipes.gan_head.bottleneck_module``), if it applies."""
    try:
        from ...recipes.gan_head import bottleneck_module

        return bottleneck_module(module)
    except Exception:  # noqa: BLE001 -- not a backbone the GAN head knows: no cut point
        return None
