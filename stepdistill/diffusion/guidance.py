"""Classifier-free guidance conventions (spec A.3), in one place.

* Imagen / Diffusers: ``y = y_u + w (y_c - y_u)``; ``w = 1`` is no guidance.
* LCM / Meng et al.:  ``y = y_c + omega (y_c - y_u)``, so ``omega = w - 1``.

Guidance is affine with weights summing to one, so it may be applied to eps, x0, v, flow or TrigFlow F
outputs with the same result (every conversion in ``parameterization`` is affine in the output).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

CONVENTIONS = ("imagen", "lcm")

__all__ = ["CONVENTIONS", "lcm_omega_from_imagen", "imagen_w_from_lcm", "apply_cfg", "guidance_scale_embedding"]


def lcm_omega_from_imagen(w):
    """Imagen guidance scale ``w`` -> LCM/Meng ``omega = w - 1``."""
    return w - 1


def imagen_w_from_lcm(omega):
    """LCM/Meng ``omega`` -> Imagen guidance scale ``w = omega + 1``."""
    return omega + 1


def apply_cfg(cond: Tensor, uncond: Tensor, scale, convention: str = "imagen") -> Tensor:
    """Guided output. ``scale`` is a float or a per-sample tensor (broadcast over trailing dims)."""
    if convention not in CONVENTIONS:
        raise ValueError(f"unknown guidance convention {convention!r}; expected one of {CONVENTIONS}")
    if torch.is_tensor(scale) and scale.ndim == 1:
        scale = scale.reshape(-1, *([1] * (cond.ndim - 1))).to(cond.dtype)
    w = scale if convention == "imagen" else imagen_w_from_lcm(scale)
    return uncond + w * (cond - uncond)


def guidance_scale_embedding(omega: Tensor, dim: int = 256, dtype: torch.dtype = torch.float32) -> Tensor:
    """Sinusoidal embedding of ``1000 * omega`` (LCM, spec A.3): ``[sin(1000 omega f_k), cos(1000 omega f_k)]``
    with ``f_k = 10000^(-k/(dim/2 - 1))``. Identical to the embedding the stock Diffusers pipelines compute from
    ``guidance_scale - 1`` for a UNet with ``time_cond_proj_dim``, so exported students sample correctly there.
    """
    omega = torch.as_tensor(omega).flatten().to(torch.float32) * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=omega.device) * -(math.log(10000.0) / (half - 1)))
    args = omega[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb.to(dtype)
