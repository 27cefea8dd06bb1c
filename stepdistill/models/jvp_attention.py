"""Attention that supports forward-mode AD (``torch.func.jvp``), for recipes that differentiate a network along a
tangent (sCM / sCD, spec B.6: "FlashAttention and fused SDPA have no JVP").

torch's fused ``scaled_dot_product_attention`` kernels (flash / memory-efficient / the CPU flash kernel) have no
forward-AD formula, and Diffusers' default attention processors call them, so ``torch.func.jvp`` through a stock
UNet or DiT raises ``NotImplementedError``. This module provides:

* :class:`JVPAttentionFunction` -- a ``torch.autograd.Function`` around SDPA with

  - ``forward``: the fused SDPA call itself (so a plain forward is unchanged, bit for bit);
  - ``jvp``: the exact tangent of ``O = softmax(S) V`` with ``S = s Q K^T + B`` (s = scale, B = additive mask):
    with ``P = softmax(S)`` and ``dS = s (dQ K^T + Q dK^T) + dB``,

        ``dO = (P * dS) V - rowsum(P * dS) * O + P dV``

    (the softmax JVP ``dP = P * (dS - rowsum(P * dS))``). ``P dV`` is one more fused SDPA call; the ``P * dS`` terms
    need P itself, which is materialised in blocks of queries (:data:`QUERY_BLOCK` rows at a time) so memory stays
    O(block x keys), not O(queries x keys). The tangent is computed in at least float32 (fp16 JVPs overflow);
  - ``backward``: recomputes the fused SDPA under autograd and differentiates it (attention-only recomputation), so
    the same module also trains.

* :func:`enable_jvp_attention` -- swaps every attention processor of a Diffusers model for a JVP-capable one and
  returns what it replaced (:func:`restore_attention` puts it back; :func:`jvp_attention` is the context manager).
  A swapped processor is a subclass of the original class whose ``__call__`` is the *original Diffusers code* run
  with ``F.scaled_dot_product_attention`` (and ``dispatch_attention_fn`` for the newer FLUX-style processors)
  resolved to :func:`jvp_scaled_dot_product_attention`; nothing else about the processor changes. Processors whose
  math is already plain differentiable tensor algebra (``AttnProcessor``, Sana's ``SanaLinearAttnProcessor2_0``:
  ReLU-kernel linear attention built from matmuls) are left as they are. Any other processor class raises an error
  naming it.

Covered backbones (tested against central finite differences in float64): UNet2DConditionModel and UNet2DModel
(``AttnProcessor2_0``), DiT and PixArt (``AttnProcessor2_0``), SD3 (``JointAttnProcessor2_0``), Sana (linear self
attention, ``SanaAttnProcessor2_0`` cross attention), FLUX (``FluxAttnProcessor`` through ``dispatch_attention_fn``).
"""

from __future__ import annotations

import contextlib
import math
import time
import types
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["QUERY_BLOCK", "JVPAttentionFunction", "jvp_scaled_dot_product_attention", "math_attention",
           "enable_jvp_attention", "restore_attention", "jvp_attention", "JVP_NATIVE_PROCESSORS",
           "UnsupportedAttentionProcessor", "measure_jvp_cost"]

QUERY_BLOCK = 1024
"""Queries per block when the tangent materialises attention probabilities."""

JVP_NATIVE_PROCESSORS = {"AttnProcessor", "SanaLinearAttnProcessor2_0"}
"""Processor classes whose ``__call__`` is plain differentiable math (no fused kernel): left unchanged."""


class UnsupportedAttentionProcessor(TypeError):
    """An attention processor that neither calls SDPA / dispatch_attention_fn nor is known to be JVP-native."""


# ------------------------------------------------------------------------------------------------ the function


def _additive_bias(attn_mask: Tensor | None, is_causal: bool, lq: int, lk: int, like: Tensor) -> Tensor | None:
    """SDPA's mask as an additive float bias (bool True = attend, like SDPA; causal = top-left aligned)."""
    bias = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            bias = torch.zeros(attn_mask.shape, dtype=like.dtype, device=like.device).masked_fill(~attn_mask, -math.inf)
        else:
            bias = attn_mask.to(like.dtype)
    if is_causal:
        causal = torch.ones(lq, lk, dtype=torch.bool, device=like.device).tril()
        cbias = torch.zeros(lq, lk, dtype=like.dtype, device=like.device).masked_fill(~causal, -math.inf)
        bias = cbias if bias is None else bias + cbias
    return bias


def _rows(t: Tensor | None, sl: slice) -> Tensor | None:
    """Query rows ``sl`` of a (..., Lq, X) tensor, or of a mask/bias that may broadcast along the query axis."""
    if t is None:
        return None
    return t if t.shape[-2] == 1 else t[..., sl, :]


def attention_tangent(q: Tensor, k: Tensor, v: Tensor, out: Tensor, dq: Tensor | None, dk: Tensor | None,
                      dv: Tensor | None, bias: Tensor | None, dbias: Tensor | None, scale: float,
                      block: int = QUERY_BLOCK) -> Tensor:
    """Exact JVP ``dO`` of ``O = softmax(scale Q K^T + bias) V`` (see the module docstring), in blocks of queries.

    ``None`` tangents are zero. Computes in ``promote(dtype, float32)`` and returns that dtype.
    """
    ct = torch.promote_types(q.dtype, torch.float32)
    q, k, v, out = (x.to(ct) for x in (q, k, v, out))
    dq, dk, dv = (None if x is None else x.to(ct) for x in (dq, dk, dv))
    bias = None if bias is None else bias.to(ct)
    dbias = None if dbias is None else dbias.to(ct)
    kt = k.transpose(-1, -2)
    dkt = None if dk is None else dk.transpose(-1, -2)
    lq = q.shape[-2]
    shape = torch.broadcast_shapes(q.shape[:-1], v.shape[:-2] + (lq,)) + (v.shape[-1],)
    pieces = []
    for start in range(0, lq, block):
        sl = slice(start, min(start + block, lq))
        qb = q[..., sl, :]
        logits = scale * (qb @ kt)
        b = _rows(bias, sl)
        if b is not None:
            logits = logits + b
        p = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # fully masked rows -> zero weights
        piece = torch.zeros((), dtype=ct, device=q.device)
        ds = None
        if dq is not None:
            ds = scale * (dq[..., sl, :] @ kt)
        if dkt is not None:
            term = scale * (qb @ dkt)
            ds = term if ds is None else ds + term
        db = _rows(dbias, sl)
        if db is not None:
            ds = db if ds is None else ds + db
        if ds is not None:
            w = p * ds
            piece = w @ v - w.sum(dim=-1, keepdim=True) * out[..., sl, :]
        if dv is not None:
            piece = piece + p @ dv
        pieces.append(piece.expand(*shape[:-2], sl.stop - sl.start, shape[-1]))
    return torch.cat(pieces, dim=-2)


class JVPAttentionFunction(torch.autograd.Function):
    """``O = SDPA(q, k, v, mask, is_causal, scale)`` with an explicit forward-mode rule (``jvp``) and a
    recomputing ``backward``; works under ``torch.func.jvp`` and ordinary autograd alike."""

    @staticmethod
    def forward(q, k, v, attn_mask, is_causal, scale):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, attn_mask, is_causal, scale = inputs
        ctx.is_causal, ctx.scale = is_causal, scale
        ctx.has_mask = attn_mask is not None
        saved = (q, k, v) + ((attn_mask,) if attn_mask is not None else ())
        ctx.save_for_backward(*saved)
        ctx.save_for_forward(*saved, output)

    @staticmethod
    def jvp(ctx, dq, dk, dv, dmask, _dcausal, _dscale):
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        mask = saved[3] if ctx.has_mask else None
        out = saved[-1]
        scale = ctx.scale if ctx.scale is not None else 1.0 / math.sqrt(q.shape[-1])
        ct = torch.promote_types(q.dtype, torch.float32)
        bias = _additive_bias(mask, ctx.is_causal, q.shape[-2], k.shape[-2], q.to(ct))
        dbias = dmask if (dmask is not None and mask is not None and mask.is_floating_point()) else None
        return attention_tangent(q, k, v, out, dq, dk, dv, bias, dbias, scale).to(out.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        saved = ctx.saved_tensors
        q, k, v = saved[:3]
        mask = saved[3] if ctx.has_mask else None
        need = ctx.needs_input_grad
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(bool(need[i])) for i, x in enumerate((q, k, v))]
            m = None
            if mask is not None:
                m = mask.detach().requires_grad_(bool(need[3]) and mask.is_floating_point())
            out = F.scaled_dot_product_attention(*inputs, attn_mask=m, is_causal=ctx.is_causal, scale=ctx.scale)
            wrt = [x for x in inputs + ([m] if m is not None else []) if x.requires_grad]
            grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True)) if wrt else iter(())
        result = [next(grads) if x.requires_grad else None for x in inputs]
        mask_grad = next(grads) if (m is not None and m.requires_grad) else None
        return (*result, mask_grad, None, None)


def jvp_scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                     dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                     enable_gqa: bool = False) -> Tensor:
    """Drop-in replacement of ``F.scaled_dot_product_attention`` that supports ``torch.func.jvp``.

    Dropout is refused (a random mask has no tangent worth taking; Diffusers processors pass ``dropout_p=0``).
    ``enable_gqa`` repeats the key/value heads to the query heads first.
    """
    if dropout_p:
        raise ValueError(f"JVP attention does not support attention dropout (dropout_p={dropout_p}); set the "
                         f"model's attention dropout to 0 for recipes that need a JVP")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    return JVPAttentionFunction.apply(query, key, value, attn_mask, bool(is_causal), scale)


def math_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                   is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
    """Unfused reference attention ``softmax(s Q K^T + B) V`` from differentiable ops (any AD mode; slow)."""
    if dropout_p:
        raise ValueError("math_attention has no dropout")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        rep = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(rep, dim=-3), value.repeat_interleave(rep, dim=-3)
    scale = scale if scale is not None else 1.0 / math.sqrt(query.shape[-1])
    logits = scale * (query @ key.transpose(-1, -2))
    bias = _additive_bias(attn_mask, is_causal, query.shape[-2], key.shape[-2], query)
    if bias is not None:
        logits = logits + bias
    return torch.softmax(logits, dim=-1) @ value


# ------------------------------------------------------------------------------------------------ processors


class _Functional(types.ModuleType):
    """``torch.nn.functional`` with ``scaled_dot_product_attention`` replaced; every other name delegates."""

    def __init__(self, sdpa: Callable):
        super().__init__("torch.nn.functional")
        self.scaled_dot_product_attention = sdpa

    def __getattr__(self, name):
        return getattr(F, name)


def _dispatch_with(sdpa: Callable) -> Callable:
    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        """Diffusers' ``dispatch_attention_fn`` layout (batch, seq, heads, dim) routed to a JVP-capable SDPA."""
        out = sdpa(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2), attn_mask=attn_mask,
                   dropout_p=dropout_p, is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        return out.transpose(1, 2)

    return dispatch_attention_fn


_SUBCLASSES: dict[tuple[type, Callable, str], type] = {}


def _rerouted_class(cls: type, sdpa: Callable, prefix: str = "JVP") -> type:
    """A subclass of processor class ``cls`` whose ``__call__`` is the original code with SDPA rerouted.

    ``prefix`` names the subclass (``JVPAttnProcessor2_0``); ``"Math"`` marks the unfused math path that
    ``stepdistill.models.attention_backends`` installs for ``attention_backend=math`` (also forward-AD capable)."""
    key = (cls, sdpa, prefix)
    if key in _SUBCLASSES:
        return _SUBCLASSES[key]
    func = cls.__call__
    names = set(func.__code__.co_names)
    globals_ = dict(func.__globals__)
    if "scaled_dot_product_attention" in names and "F" in names:
        globals_["F"] = _Functional(sdpa)
    elif "dispatch_attention_fn" in names:
        globals_["dispatch_attention_fn"] = _dispatch_with(sdpa)
    else:
        raise UnsupportedAttentionProcessor(cls.__name__)
    call = types.FunctionType(func.__code__, globals_, func.__name__, func.__defaults__, func.__closure__)
    call.__kwdefaults__ = func.__kwdefaults__
    call.__doc__, call.__qualname__ = func.__doc__, f"{prefix}{cls.__name__}.__call__"
    sub = type(f"{prefix}{cls.__name__}", (cls,), {
        "__call__": call, "__module__": __name__, "jvp_capable": True, "stepdistill_math": prefix == "Math",
        "__doc__": f"{cls.__name__} with its SDPA call routed to a forward-AD-capable attention (stepdistill)."})
    _SUBCLASSES[key] = sub
    return sub


def _attention_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        if hasattr(module, "processor") and callable(getattr(module, "set_processor", None)):
            yield name, module


def enable_jvp_attention(model: nn.Module, sdpa: Callable = jvp_scaled_dot_product_attention) -> dict[str, Any]:
    """Make every attention layer of ``model`` JVP-capable; returns ``{module name: replaced processor}``.

    Idempotent (already-swapped processors are skipped). ``sdpa`` picks the attention used by the swapped processors
    (default :func:`jvp_scaled_dot_product_attention`; :func:`math_attention` gives the unfused reference).
    Raises :class:`UnsupportedAttentionProcessor` naming every processor class it cannot handle, before changing
    anything.
    """
    plan, bad = [], set()
    for name, module in _attention_modules(model):
        proc = module.processor
        cls = type(proc)
        if getattr(proc, "jvp_capable", False) or cls.__name__ in JVP_NATIVE_PROCESSORS:
            continue
        try:
            plan.append((name, module, _rerouted_class(cls, sdpa)))
        except UnsupportedAttentionProcessor:
            bad.add(f"{cls.__module__}.{cls.__name__}")
    if bad:
        raise UnsupportedAttentionProcessor(
            f"cannot make these attention processors JVP-capable: {sorted(bad)}. They call neither "
            f"F.scaled_dot_product_attention nor dispatch_attention_fn; set a standard processor first (e.g. "
            f"model.set_default_attn_processor() or AttnProcessor2_0()), or, if the processor is plain differentiable "
            f"math, add its class name to stepdistill.models.jvp_attention.JVP_NATIVE_PROCESSORS")
    replaced = {}
    for name, module, sub in plan:
        old = module.processor
        new = sub.__new__(sub)
        new.__dict__.update(old.__dict__)
        module.set_processor(new)
        replaced[name] = old
    return replaced


def restore_attention(model: nn.Module, replaced: dict[str, Any]) -> None:
    """Undo :func:`enable_jvp_attention` with the dict it returned."""
    modules = dict(model.named_modules())
    for name, proc in replaced.items():
        modules[name].set_processor(proc)


@contextlib.contextmanager
def jvp_attention(model: nn.Module, sdpa: Callable = jvp_scaled_dot_product_attention):
    """Context manager: JVP-capable attention inside, the original processors restored on exit."""
    replaced = enable_jvp_attention(model, sdpa)
    try:
        yield model
    finally:
        restore_attention(model, replaced)


# ------------------------------------------------------------------------------------------------ cost


def _best_time(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


@torch.no_grad()
def measure_jvp_cost(model: nn.Module, call: Callable[[Tensor], Tensor], x: Tensor, repeats: int = 5) -> dict:
    """Wall-clock cost of ``torch.func.jvp`` of ``call`` at ``x`` (tangent in x) as a ratio to a plain forward.

    ``call(x)`` runs ``model`` (its processors are swapped temporarily). Returns seconds (best of ``repeats``) for
    the plain forward with the stock fused attention, the JVP with :func:`jvp_scaled_dot_product_attention` and the
    JVP with unfused :func:`math_attention`, and the two ratios to the plain forward.
    """
    tangent = torch.randn_like(x)
    plain = _best_time(lambda: call(x), repeats)
    with jvp_attention(model):
        fused_fwd = _best_time(lambda: call(x), repeats)
        fused = _best_time(lambda: torch.func.jvp(call, (x,), (tangent,)), repeats)
    with jvp_attention(model, sdpa=math_attention):
        mathj = _best_time(lambda: torch.func.jvp(call, (x,), (tangent,)), repeats)
    return {"forward_s": plain, "forward_through_jvp_processors_s": fused_fwd, "jvp_s": fused, "jvp_math_s": mathj,
            "jvp_ratio": fused / plain, "jvp_math_ratio": mathj / plain}
