"""Pick the attention kernel of a Diffusers backbone per run, and report what every attention layer really uses.

``set_attention_backend(model, backend, fuse_qkv=...)`` applies one of

* ``"sdpa"``  -- PyTorch ``scaled_dot_product_attention`` with its automatic kernel choice (Diffusers' default);
* ``"math"``  -- unfused attention: the classic ``AttnProcessor`` where Diffusers has it, Diffusers' dispatcher
  backend ``_native_math`` for dispatcher layers, and otherwise the layer's own processor with its SDPA call routed to
  :func:`stepdistill.models.jvp_attention.math_attention` (softmax(QK^T)V from plain ops);
* ``"xformers"`` -- xformers' memory-efficient attention (needs the ``xformers`` package *and* a CUDA model):
  ``XFormersAttnProcessor`` / ``XFormersJointAttnProcessor`` on legacy layers, the dispatcher backend otherwise;
* ``"jvp"``   -- the forward-AD-capable path of :mod:`stepdistill.models.jvp_attention` (what sCM needs);
* any other name of Diffusers' attention dispatcher (``flash``, ``_native_flash``, ``_native_efficient``,
  ``_native_cudnn``, ``sage``, ``flex``, ...) -- set on the layers whose processor goes through the dispatcher.

Diffusers' own ``ModelMixin.set_attention_backend`` only changes layers whose processor reads ``_attention_backend``
(FLUX-style ``AttentionModuleMixin`` layers); the legacy processors of UNet2DConditionModel, DiT, PixArt, SD3 and Sana
(``AttnProcessor2_0``, ``JointAttnProcessor2_0``, ...) ignore it silently. This module therefore inspects every layer
*after* applying the request and reports the backend each one really runs (``"sdpa(AttnProcessor2_0)"``); a layer
where the request could not be honoured is listed in :attr:`AttentionReport.mismatched` with a warning (or an error
with ``strict=True``), never claimed.

``fuse_qkv=True`` concatenates the query/key/value projections of each layer that Diffusers can fuse (the layer's
``fuse_projections`` plus the matching ``Fused*`` processor for legacy layers) and reports which layers really run
fused. Fusion creates new ``to_qkv``/``to_kv`` weights next to ``to_q``/``to_k``/``to_v``; training them would leave
the saved and exported ``to_q``/``to_k``/``to_v`` stale, so models with trainable parameters are never fused (the
report says so).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

from .backbones import unwrap
from .jvp_attention import UnsupportedAttentionProcessor, enable_jvp_attention, math_attention, _rerouted_class

__all__ = ["AttentionBackendError", "AttentionReport", "BUILTIN_BACKENDS", "available_backends", "attention_layers",
           "check_backend_name", "layer_backend", "set_attention_backend"]

BUILTIN_BACKENDS = ("sdpa", "math", "xformers", "jvp")
"""Backends with a stepdistill meaning; every other accepted name is a Diffusers dispatcher backend."""

_DISPATCH_ALIASES = {"sdpa": "native", "math": "_native_math", "xformers": "xformers"}
_DISPATCH_KIND = {"native": "sdpa", "_native_math": "math", "xformers": "xformers"}
_ACCEPTS = {"jvp": {"jvp", "math", "linear"}}
"""Layer kinds that satisfy a request besides the requested kind itself (math and linear attention are JVP-native)."""


class AttentionBackendError(ValueError):
    """A backend that cannot be used for this model here (missing package, wrong device, unknown name)."""


# ------------------------------------------------------------------------------------------------ names
def _dispatcher_names() -> list[str]:
    from diffusers.models.attention_dispatch import AttentionBackendName

    return [b.value for b in AttentionBackendName]


def available_backends() -> list[str]:
    """Every name :func:`set_attention_backend` accepts (hub-downloaded kernels are left out: no network at run time)."""
    return list(BUILTIN_BACKENDS) + [n for n in _dispatcher_names()
                                     if n not in BUILTIN_BACKENDS + ("native",) and not n.endswith("_hub")]


def check_backend_name(name: str) -> str | None:
    """None when ``name`` is an accepted backend, else the problem (with the closest name); cheap for builtin names."""
    if name in BUILTIN_BACKENDS:
        return None
    import difflib

    allowed = available_backends()
    if name in allowed:
        return None
    if name.endswith("_hub") and name in _dispatcher_names():
        return (f"{name!r} downloads its kernel from the Hugging Face Hub at run time, which stepdistill never does; "
                f"install the kernel package and use the non-hub name (e.g. 'flash', '_flash_3', 'sage')")
    close = difflib.get_close_matches(name, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown attention backend {name!r}{hint} Allowed: {', '.join(allowed)}"


# ------------------------------------------------------------------------------------------------ inspection
def attention_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` of every attention layer (a module with a ``processor`` and ``set_processor``)."""
    for name, module in unwrap(model).named_modules():
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None)):
            yield name, module


def _is_dispatcher(proc: Any) -> bool:
    return hasattr(proc, "_attention_backend")


def _active_dispatch_backend() -> str:
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    backend = _AttentionBackendRegistry.get_active_backend()[0]
    return getattr(backend, "value", str(backend))


def _processor_kind(proc: Any) -> str:
    """What a processor really runs: sdpa, math, xformers, jvp, linear, a dispatcher backend name, or unknown."""
    cls = type(proc).__name__
    if getattr(proc, "jvp_capable", False):
        return "math" if getattr(proc, "stepdistill_math", False) else "jvp"
    if _is_dispatcher(proc):
        backend = proc._attention_backend
        name = getattr(backend, "value", backend) if backend is not None else _active_dispatch_backend()
        return _DISPATCH_KIND.get(name, name)
    if cls in ("AttnProcessor", "AttnAddedKVProcessor"):
        return "math"
    if cls.startswith("XFormers"):
        return "xformers"
    if "Linear" in cls:  # Sana's ReLU linear attention: no softmax kernel to choose
        return "linear"
    if cls.endswith("2_0") or "2_0_" in cls:
        return "sdpa"
    return "unknown"


def layer_backend(module: nn.Module) -> str:
    """``"kind(ProcessorClass)"`` for one attention layer, e.g. ``"sdpa(AttnProcessor2_0)"``."""
    proc = module.processor
    return f"{_processor_kind(proc)}({type(proc).__name__})"


def _layer_fused(module: nn.Module) -> bool:
    """Whether the layer's forward really uses fused projections (weights fused *and* a processor that reads them)."""
    if not getattr(module, "fused_projections", False):
        return False
    proc = module.processor
    return _is_dispatcher(proc) or type(proc).__name__.startswith(("Fused", "JVPFused", "MathFused"))


# ------------------------------------------------------------------------------------------------ report
@dataclass
class AttentionReport:
    """What :func:`set_attention_backend` did to one model.

    ``layers``: attention layer name -> ``"kind(ProcessorClass)"`` (what the layer really runs);
    ``fused``: layers whose QKV projections are fused and used; ``mismatched``: layers that do not run the
    requested backend; ``warnings``: one line per thing that was not applied as asked; ``notes``: deliberate
    choices worth a log line (e.g. layers that keep a recipe's JVP attention).
    """

    model: str
    requested: str
    fuse_qkv: bool = False
    layers: dict[str, str] = field(default_factory=dict)
    fused: list[str] = field(default_factory=list)
    mismatched: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def kinds(self) -> dict[str, str]:
        """Layer name -> backend kind (the label without the processor class)."""
        return {k: v.split("(", 1)[0] for k, v in self.layers.items()}

    def summary(self) -> dict[str, int]:
        """Number of layers per backend kind, e.g. ``{"sdpa": 6, "linear": 2}``."""
        return dict(sorted(Counter(self.kinds().values()).items()))

    def summary_line(self) -> str:
        counts = ", ".join(f"{k} x{n}" for k, n in self.summary().items()) or "no attention layers"
        line = f"{self.model}: attention_backend={self.requested} -> {counts}"
        if self.fuse_qkv:
            line += f"; fused QKV on {len(self.fused)}/{len(self.layers)} layers"
        if self.mismatched:
            line += f"; {len(self.mismatched)} layer(s) NOT on {self.requested}"
        return line

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "requested": self.requested, "fuse_qkv": self.fuse_qkv,
                "summary": self.summary(), "layers": dict(self.layers), "fused": list(self.fused),
                "mismatched": dict(self.mismatched), "warnings": list(self.warnings), "notes": list(self.notes)}

    def to_json(self, **kw) -> str:
        return json.dumps(self.to_dict(), **kw)

    def __str__(self) -> str:
        return "\n".join([self.summary_line(), *(f"  warning: {w}" for w in self.warnings),
                          *(f"  note: {n}" for n in self.notes)])


def inspect_attention(model: nn.Module, requested: str = "sdpa", fuse_qkv: bool = False) -> AttentionReport:
    """A report of what every attention layer of ``model`` runs now, compared with ``requested``."""
    report = AttentionReport(model=type(unwrap(model)).__name__, requested=requested, fuse_qkv=fuse_qkv)
    want = _DISPATCH_KIND.get(requested, requested)
    accepted = _ACCEPTS.get(want, {want}) | {want, "linear"}
    for name, module in attention_layers(model):
        label = layer_backend(module)
        report.layers[name] = label
        if label.split("(", 1)[0] not in accepted:
            report.mismatched[name] = label
        if _layer_fused(module):
            report.fused.append(name)
    return report


# ------------------------------------------------------------------------------------------------ applying
def _model_device(model: nn.Module) -> torch.device:
    for p in unwrap(model).parameters():
        return p.device
    return torch.device("cpu")


def _check_xformers(model: nn.Module) -> None:
    """xformers needs its package and a CUDA model; name every reason it cannot run and what to use instead."""
    from diffusers.utils import is_xformers_available

    device = _model_device(model)
    reasons = []
    if device.type != "cuda":
        reasons.append(f"it runs on CUDA only, but the model is on {device.type}")
    if not is_xformers_available():
        reasons.append("the xformers package is not installed")
    if reasons:
        raise AttentionBackendError(
            f"attention backend 'xformers' cannot be used: {'; '.join(reasons)}. Use model.attention_backend=sdpa "
            f"(PyTorch picks its flash / memory-efficient kernel itself on CUDA) or math")


def _check_dispatch(name: str) -> None:
    from diffusers.models.attention_dispatch import AttentionBackendName, _check_attention_backend_requirements

    try:
        _check_attention_backend_requirements(AttentionBackendName(name))
    except (RuntimeError, ImportError) as exc:
        raise AttentionBackendError(f"attention backend {name!r} is not usable here: {exc}; use "
                                    f"model.attention_backend=sdpa instead") from None


def _legacy_processor(kind: str, proc: Any) -> Any | None:
    """The legacy Diffusers processor that runs ``kind`` in place of ``proc`` (None when there is none)."""
    from diffusers.models import attention_processor as ap

    cls = type(proc).__name__
    if kind == "sdpa":
        return {"AttnProcessor": ap.AttnProcessor2_0}.get(cls, lambda: None)()
    if kind == "math":
        if cls == "AttnProcessor2_0":
            return ap.AttnProcessor()
        if cls == "AttnProcessor":
            return None
        try:
            sub = _rerouted_class(type(proc), math_attention, prefix="Math")
        except UnsupportedAttentionProcessor:
            return None
        new = sub.__new__(sub)
        new.__dict__.update(proc.__dict__)
        return new
    if kind == "xformers":
        table = {"AttnProcessor2_0": ap.XFormersAttnProcessor, "AttnProcessor": ap.XFormersAttnProcessor,
                 "JointAttnProcessor2_0": ap.XFormersJointAttnProcessor,
                 "AttnAddedKVProcessor2_0": ap.XFormersAttnAddedKVProcessor,
                 "AttnAddedKVProcessor": ap.XFormersAttnAddedKVProcessor}
        return table[cls]() if cls in table else None
    return None


_FUSED_LEGACY = {"AttnProcessor2_0": "FusedAttnProcessor2_0", "JointAttnProcessor2_0": "FusedJointAttnProcessor2_0"}


def _fuse(model: nn.Module, report: AttentionReport) -> None:
    """Fuse the QKV projections of every layer Diffusers can fuse; record why others stay unfused."""
    from diffusers.models import attention_processor as ap
    from diffusers.models.attention import AttentionModuleMixin

    if any(p.requires_grad for p in unwrap(model).parameters()):
        report.warnings.append(
            f"fuse_qkv skipped on {report.model}: it has trainable parameters, and fused to_qkv copies would be "
            f"trained while checkpoints and the export keep the unfused to_q/to_k/to_v (fusion is for frozen "
            f"networks such as the teacher)")
        return
    skipped: Counter = Counter()
    for _, module in attention_layers(model):
        proc = module.processor
        cls = type(proc).__name__
        if getattr(module, "fused_projections", False):
            continue
        if isinstance(module, AttentionModuleMixin) and getattr(module, "_supports_qkv_fusion", False):
            module.fuse_projections()
        elif cls in _FUSED_LEGACY and callable(getattr(module, "fuse_projections", None)):
            module.fuse_projections(fuse=True)
            module.set_processor(getattr(ap, _FUSED_LEGACY[cls])())
        else:
            skipped[cls] += 1
            continue
        for attr in ("to_qkv", "to_kv", "to_added_qkv"):
            if isinstance(getattr(module, attr, None), nn.Module):
                getattr(module, attr).requires_grad_(False)
    for cls, n in sorted(skipped.items()):
        report.warnings.append(f"fuse_qkv: {n} layer(s) with processor {cls} have no fused variant in Diffusers; "
                               f"they stay unfused")


def set_attention_backend(model: nn.Module, backend: str = "sdpa", *, fuse_qkv: bool = False,
                          strict: bool = False) -> AttentionReport:
    """Make every attention layer of ``model`` run ``backend`` where it can; return what each layer really runs.

    Layers whose processor cannot run ``backend`` keep their processor and are listed in ``report.mismatched`` with a
    warning; ``strict=True`` raises :class:`AttentionBackendError` instead. Layers already made JVP-capable (sCM's
    student) keep the JVP path when ``backend`` is ``sdpa`` or ``math`` (both of which it computes); any other backend
    has no forward-mode AD and is refused for them.
    """
    problem = check_backend_name(backend)
    if problem:
        raise AttentionBackendError(problem)
    model = unwrap(model)
    layers = list(attention_layers(model))
    jvp_layers = [n for n, m in layers if getattr(m.processor, "jvp_capable", False)
                  and not getattr(m.processor, "stepdistill_math", False)]
    notes: list[str] = []
    if backend == "xformers" and layers:
        _check_xformers(model)
    dispatch_name = _DISPATCH_ALIASES.get(backend, backend)
    kind = _DISPATCH_KIND.get(dispatch_name, backend)  # '_native_math' asks for the same thing as 'math'
    if backend not in ("math", "jvp", "sdpa") and any(_is_dispatcher(m.processor) for _, m in layers):
        _check_dispatch(dispatch_name)

    if jvp_layers and backend not in ("sdpa", "math", "jvp"):
        raise AttentionBackendError(
            f"{type(model).__name__} runs JVP-capable attention on {len(jvp_layers)} layer(s) (installed by a recipe "
            f"that differentiates it with torch.func.jvp, e.g. sCM); backend {backend!r} has no forward-mode AD. Use "
            f"model.attention_backend=sdpa (the recipe keeps its JVP path) or jvp")
    if jvp_layers and backend in ("sdpa", "math"):
        notes.append(f"{len(jvp_layers)} layer(s) keep the JVP-capable attention the recipe installed (requested "
                     f"{backend!r}; the recipe needs forward-mode AD through them)")

    if backend == "jvp":
        enable_jvp_attention(model)
    else:
        for name, module in layers:
            proc = module.processor
            if getattr(proc, "jvp_capable", False) and not getattr(proc, "stepdistill_math", False):
                continue
            if _is_dispatcher(proc):
                module.set_attention_backend(dispatch_name)
                continue
            if _processor_kind(proc) == kind:
                continue
            new = _legacy_processor(kind, proc)
            if new is not None:
                module.set_processor(new)

    report = inspect_attention(model, backend, fuse_qkv)
    report.notes.extend(notes)
    if fuse_qkv:
        _fuse(model, report)
        fused_report = inspect_attention(model, backend, fuse_qkv)
        report.layers, report.fused, report.mismatched = fused_report.layers, fused_report.fused, \
            fused_report.mismatched
    if jvp_layers and backend in ("sdpa", "math"):
        report.mismatched = {k: v for k, v in report.mismatched.items() if not v.startswith("jvp(")}
    if report.mismatched:
        by_label = Counter(report.mismatched.values())
        listing = ", ".join(f"{n} x {label}" for label, n in sorted(by_label.items()))
        why = ("their legacy processors ignore Diffusers' attention dispatcher and have no equivalent"
               if backend not in ("sdpa", "math", "xformers", "jvp") else "no equivalent processor exists for them")
        message = (f"{len(report.mismatched)} attention layer(s) of {report.model} do not run {backend!r} ({why}); "
                   f"they run: {listing}")
        if strict:
            raise AttentionBackendError(message)
        report.warnings.append(message)
    return report
