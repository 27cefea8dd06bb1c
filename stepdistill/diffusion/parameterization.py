"""Exact conversions between network output parameterizations (spec A.2).

With ``x_t = alpha x0 + sigma eps`` (and, for velocities, ``d/dt`` of the path):

=============  ===========================  =========================================  ==========================================
kind           the network predicts         x0                                         eps
=============  ===========================  =========================================  ==========================================
``eps``        eps                          (x_t - sigma eps) / alpha                  --
``x0``         x0                           --                                         (x_t - alpha x0) / sigma
``v``          v = alpha eps - sigma x0     (alpha x_t - sigma v) / (alpha^2+sigma^2)  (sigma x_t + alpha v) / (alpha^2+sigma^2)
``flow``       u = alpha' x0 + sigma' eps   (sigma' x_t - sigma u) / D                 (alpha u - alpha' x_t) / D
``trigflow``   F with sigma_d F = dx/dt     as ``flow`` with u = sigma_d F              as ``flow`` with u = sigma_d F
=============  ===========================  =========================================  ==========================================

where ``D = alpha sigma' - sigma alpha'``. On rectified flow (alpha = 1 - s, sigma = s) ``flow`` is
``u = eps - x0``; on TrigFlow (alpha = cos t, sigma = sigma_d sin t) ``trigflow`` is the sCM network F.
The ``v`` formula divides by alpha^2 + sigma^2, which is 1 on VP paths (the Diffusers ``v_prediction``).

Callers convert in float32 or float64 (spec A.2 rule): these functions compute in the dtype they are given.
"""

from __future__ import annotations

from torch import Tensor

from .processes import PathCoefficients

KINDS = ("eps", "x0", "v", "flow", "trigflow")
_VELOCITY_KINDS = ("flow", "trigflow")

__all__ = ["KINDS", "to_x0_eps", "from_x0_eps", "convert"]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown parameterization {kind!r}; expected one of {KINDS}")


def _velocity_scale(kind: str, sigma_data: float | None) -> float:
    if kind == "trigflow":
        if sigma_data is None:
            raise ValueError("the 'trigflow' parameterization needs sigma_data")
        return float(sigma_data)
    return 1.0


def _need_derivatives(c: PathCoefficients, kind: str) -> None:
    if c.d_alpha is None or c.d_sigma is None:
        raise ValueError(f"the {kind!r} parameterization needs d_alpha/d_sigma: call process.coefficients(t, derivatives=True)")


def to_x0_eps(pred: Tensor, kind: str, x_t: Tensor, c: PathCoefficients, sigma_data: float | None = None) -> tuple[Tensor, Tensor]:
    """(x0_hat, eps_hat) implied by a network output ``pred`` of the given ``kind`` at ``x_t``."""
    _check_kind(kind)
    a, s = c.alpha, c.sigma
    if kind == "eps":
        return (x_t - s * pred) / a, pred
    if kind == "x0":
        return pred, (x_t - a * pred) / s
    if kind == "v":
        norm = a * a + s * s
        return (a * x_t - s * pred) / norm, (s * x_t + a * pred) / norm
    _need_derivatives(c, kind)
    u = pred * _velocity_scale(kind, sigma_data)
    det = a * c.d_sigma - s * c.d_alpha
    return (c.d_sigma * x_t - s * u) / det, (a * u - c.d_alpha * x_t) / det


def from_x0_eps(x0: Tensor, eps: Tensor, kind: str, c: PathCoefficients, sigma_data: float | None = None) -> Tensor:
    """The network output of ``kind`` that corresponds to (x0, eps)."""
    _check_kind(kind)
    if kind == "eps":
        return eps
    if kind == "x0":
        return x0
    if kind == "v":
        return c.alpha * eps - c.sigma * x0
    _need_derivatives(c, kind)
    return (c.d_alpha * x0 + c.d_sigma * eps) / _velocity_scale(kind, sigma_data)


def convert(pred: Tensor, src: str, dst: str, x_t: Tensor, c: PathCoefficients, sigma_data: float | None = None) -> Tensor:
    """Re-express a ``src`` prediction as ``dst`` (exact; every kind is affine in the output)."""
    if src == dst:
        _check_kind(src)
        return pred
    x0, eps = to_x0_eps(pred, src, x_t, c, sigma_data)
    return from_x0_eps(x0, eps, dst, c, sigma_data)
