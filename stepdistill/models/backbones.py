"""How to call each backbone family: one small function per family maps (x, timestep, Conditioning, guidance
input) to the model's own forward signature. The Diffusers forwards are called as they are, never patched.

Families and what they receive:

* ``unet2d``            UNet2DModel(x, t, class_labels)                      -- pixel-space, class-conditional
* ``unet2d_condition``  UNet2DConditionModel(x, t, encoder_hidden_states, timestep_cond, added_cond_kwargs)
* ``dit``               DiTTransformer2DModel(x, timestep, class_labels)     -- learned-sigma channels stripped
* ``pixart``            PixArtTransformer2DModel(x, encoder_hidden_states, mask, timestep, added_cond_kwargs)
* ``sd3``               SD3Transformer2DModel(x, encoder_hidden_states, pooled_projections, timestep)
* ``sana``              SanaTransformer2DModel(x, encoder_hidden_states, timestep, encoder_attention_mask)
* ``mlp``               ToyMLP(x, timestep, class_labels, guidance)
* ``analytic``          a parameter-free net(x, alpha, sigma, class_labels) returning x0 (toy2d's exact teacher)
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..diffusion.guidance import guidance_scale_embedding
from .conditioning import Conditioning

__all__ = ["FAMILIES", "detect_family", "unwrap", "call_backbone", "strip_learned_sigma"]

_CLASS_TO_FAMILY = {
    "UNet2DModel": "unet2d",
    "UNet2DConditionModel": "unet2d_condition",
    "DiTTransformer2DModel": "dit",
    "PixArtTransformer2DModel": "pixart",
    "SD3Transformer2DModel": "sd3",
    "SanaTransformer2DModel": "sana",
    "ToyMLP": "mlp",
    "AnalyticGMMDenoiserNet": "analytic",
}
FAMILIES = tuple(sorted(set(_CLASS_TO_FAMILY.values())))


def unwrap(module: nn.Module) -> nn.Module:
    """The bare model under DDP/FSDP/torch.compile/peft wrappers."""
    seen = set()
    while id(module) not in seen:
        seen.add(id(module))
        for attr in ("module", "_orig_mod"):
            inner = getattr(module, attr, None)
            if isinstance(inner, nn.Module):
                module = inner
                break
        else:
            break
    return module


def detect_family(model: nn.Module) -> str:
    name = type(unwrap(model)).__name__
    if name not in _CLASS_TO_FAMILY:
        raise ValueError(f"unsupported backbone class {name}; supported: {sorted(_CLASS_TO_FAMILY)}")
    return _CLASS_TO_FAMILY[name]


def strip_learned_sigma(out: Tensor, in_channels: int) -> Tensor:
    """DiT/PixArt with learned variance output 2C channels: keep the mean prediction (spec A.6)."""
    return out[:, :in_channels] if out.shape[1] == 2 * in_channels else out


def _config(model: nn.Module) -> Any:
    return unwrap(model).config


def _timestep_batch(timestep: Tensor, n: int, device) -> Tensor:
    timestep = torch.as_tensor(timestep, device=device)
    return timestep.expand(n) if timestep.ndim == 0 else timestep


def _unet2d(model, x, ts, cond: Conditioning, guidance, extra):
    return model(x, ts, class_labels=cond.class_labels).sample


def _unet2d_condition(model, x, ts, cond: Conditioning, guidance, extra):
    cfg = _config(model)
    timestep_cond = None
    if cfg.time_cond_proj_dim is not None:
        if guidance is None:
            raise ValueError("this UNet has a guidance embedding (time_cond_proj_dim); pass the guidance input omega")
        timestep_cond = guidance_scale_embedding(guidance.expand(x.shape[0]) if guidance.ndim == 0 else guidance,
                                                 cfg.time_cond_proj_dim, dtype=x.dtype).to(x.device)
    return model(x, ts, encoder_hidden_states=cond.encoder_hidden_states, timestep_cond=timestep_cond,
                 added_cond_kwargs=cond.added_cond_kwargs, encoder_attention_mask=cond.encoder_attention_mask,
                 cross_attention_kwargs=extra.get("cross_attention_kwargs")).sample


def _dit(model, x, ts, cond: Conditioning, guidance, extra):
    return strip_learned_sigma(model(x, timestep=ts, class_labels=cond.class_labels).sample, x.shape[1])


def _pixart(model, x, ts, cond: Conditioning, guidance, extra):
    added = cond.added_cond_kwargs or {"resolution": None, "aspect_ratio": None}
    out = model(x, encoder_hidden_states=cond.encoder_hidden_states, encoder_attention_mask=cond.encoder_attention_mask,
                timestep=ts, added_cond_kwargs=added).sample
    return strip_learned_sigma(out, x.shape[1])


def _sd3(model, x, ts, cond: Conditioning, guidance, extra):
    return model(hidden_states=x, encoder_hidden_states=cond.encoder_hidden_states,
                 pooled_projections=cond.pooled_projections, timestep=ts).sample


def _sana(model, x, ts, cond: Conditioning, guidance, extra):
    kw = {}
    if getattr(_config(model), "guidance_embeds", False) and guidance is not None:
        kw["guidance"] = guidance.expand(x.shape[0]) if guidance.ndim == 0 else guidance
    return model(x, encoder_hidden_states=cond.encoder_hidden_states, encoder_attention_mask=cond.encoder_attention_mask,
                 timestep=ts, **kw).sample


def _mlp(model, x, ts, cond: Conditioning, guidance, extra):
    return model(x, ts, cond.class_labels, guidance)


_CALLS: dict[str, Callable] = {
    "unet2d": _unet2d, "unet2d_condition": _unet2d_condition, "dit": _dit, "pixart": _pixart,
    "sd3": _sd3, "sana": _sana, "mlp": _mlp,
}


def call_backbone(family: str, model: nn.Module, x: Tensor, model_timestep: Tensor, cond: Conditioning,
                  guidance: Tensor | None = None, extra: dict | None = None) -> Tensor:
    """Run ``model`` in its native parameterization. ``model_timestep`` is what the backbone was trained on."""
    if family not in _CALLS:
        raise ValueError(f"family {family!r} is not called through call_backbone (supported: {sorted(_CALLS)})")
    ts = _timestep_batch(model_timestep, x.shape[0], x.device)
    g = None if guidance is None else torch.as_tensor(guidance, device=x.device, dtype=torch.float32)
    return _CALLS[family](model, x, ts, cond, g, extra or {})
