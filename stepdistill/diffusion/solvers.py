"""One-step solver updates and deterministic samplers (spec A.4).

Notation: a step goes from time ``t`` (noisier, coefficients ``ct``) to ``s`` (cleaner, ``cs``);
``eta = log(alpha / sigma)`` and ``h = eta_s - eta_t > 0``. Functions take ``PathCoefficients`` so they work
on any Gaussian path (VP, rectified flow, TrigFlow, EDM). "Clean" (alpha = 1, sigma = 0) is the end of sampling.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor

from .processes import NoiseProcess, PathCoefficients

__all__ = [
    "ddim_step",
    "ddim_step_from_x0",
    "inverse_ddim_x0",
    "renoise",
    "euler_step",
    "heun_step",
    "dpmpp_2m_step",
    "trailing_timesteps",
    "sample_deterministic",
    "SOLVERS",
]

Predictor = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""(x_t, t) -> (x0_hat, eps_hat) for a batch; t is a scalar tensor in the process' time."""


def ddim_step(x0: Tensor, eps: Tensor, cs: PathCoefficients) -> Tensor:
    """DDIM (= DPM-Solver-1): ``x_s = alpha_s x0_hat + sigma_s eps_hat``."""
    return cs.alpha * x0 + cs.sigma * eps


def ddim_step_from_x0(x_t: Tensor, x0: Tensor, ct: PathCoefficients, cs: PathCoefficients) -> Tensor:
    """DDIM written with x0 only: ``x_s = (sigma_s/sigma_t) x_t + (alpha_s - alpha_t sigma_s/sigma_t) x0``."""
    r = cs.sigma / ct.sigma
    return r * x_t + (cs.alpha - ct.alpha * r) * x0


def inverse_ddim_x0(z_s: Tensor, x_t: Tensor, ct: PathCoefficients, cs: PathCoefficients) -> Tensor:
    """The x0 whose DDIM step from ``x_t`` lands on ``z_s`` (Salimans & Ho 2022, Alg. 2):
    ``x0 = (z_s - (sigma_s/sigma_t) x_t) / (alpha_s - (sigma_s/sigma_t) alpha_t)``. Ill-conditioned as s -> t."""
    r = cs.sigma / ct.sigma
    return (z_s - r * x_t) / (cs.alpha - r * ct.alpha)


def renoise(x0: Tensor, noise: Tensor, cs: PathCoefficients) -> Tensor:
    """Consistency-sampler step (LCM, DMD2, sCM): ``x_s = alpha_s x0_hat + sigma_s noise`` with fresh noise."""
    return cs.alpha * x0 + cs.sigma * noise


def euler_step(x: Tensor, velocity: Tensor, dt) -> Tensor:
    """Explicit Euler on dx/dt: ``x + dt * velocity`` (dt = t_next - t, negative when sampling)."""
    return x + dt * velocity


def heun_step(x: Tensor, t: Tensor, t_next: Tensor, velocity_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Heun (EDM 2nd order): Euler predictor, trapezoidal corrector."""
    dt = t_next - t
    d = velocity_fn(x, t)
    x_pred = x + dt * d
    return x + dt * 0.5 * (d + velocity_fn(x_pred, t_next))


def dpmpp_2m_step(
    x_t: Tensor, d_cur: Tensor, d_prev: Tensor | None, h: Tensor | None, h_prev: Tensor | None,
    ct: PathCoefficients, cs: PathCoefficients,
) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022): with r = h_prev/h,
    ``D = (1 + 1/(2r)) D_i - 1/(2r) D_{i-1}``, ``x_s = (sigma_s/sigma_t) x_t + alpha_s (1 - e^{-h}) D``.
    First order (DDIM) when there is no previous x0 or when ``s`` is the clean end (sigma_s = 0)."""
    if d_prev is None or h is None or h_prev is None or not torch.all(cs.sigma > 0):
        d = d_cur
    else:
        r = h_prev / h
        d = (1 + 1 / (2 * r)) * d_cur - (1 / (2 * r)) * d_prev
    return ddim_step_from_x0(x_t, d, ct, cs)


def trailing_timesteps(num_train_timesteps: int, num_steps: int) -> list[int]:
    """Integer timesteps ``round(T - k T/n) - 1`` for k = 0..n-1 ("trailing" spacing: starts at T-1).
    With T=1000, n=50 this is the LCM solver grid {999, 979, ..., 19}."""
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step = num_train_timesteps / num_steps
    return [int(round(num_train_timesteps - k * step)) - 1 for k in range(num_steps)]


SOLVERS = ("ddim", "dpmpp_2m", "euler", "heun")


def sample_deterministic(
    predict: Predictor, process: NoiseProcess, timesteps: Sequence, x_T: Tensor, solver: str = "ddim",
) -> Tensor:
    """Integrate the PF-ODE from ``x_T`` along ``timesteps`` (descending) and return the clean sample.

    The last update goes from ``timesteps[-1]`` to clean, i.e. returns that step's x0_hat (first order for every
    solver). NFE = len(timesteps) for ddim/dpmpp_2m/euler, about twice that for heun.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if solver in ("euler", "heun") and not process.has_derivatives:
        raise ValueError(f"solver {solver!r} needs a continuous-time process; {process.kind} is discrete: use ddim or dpmpp_2m")
    ts = [torch.as_tensor(t) for t in timesteps]
    x = x_T
    d_prev = h_prev = None
    for i, t in enumerate(ts):
        last = i == len(ts) - 1
        ct = process.coefficients(t, like=x, derivatives=process.has_derivatives)
        x0, eps = predict(x, t)
        if last:
            return x0
        t_next = ts[i + 1]
        cs = process.coefficients(t_next, like=x, derivatives=process.has_derivatives)
        if solver == "ddim":
            x = ddim_step(x0, eps, cs)
        elif solver == "dpmpp_2m":
            h = process.eta(t_next) - process.eta(t)
            x = dpmpp_2m_step(x, x0, d_prev, h.to(x.dtype), None if h_prev is None else h_prev.to(x.dtype), ct, cs)
            d_prev, h_prev = x0, h
        else:
            def velocity(xx: Tensor, tt: Tensor) -> Tensor:
                c = process.coefficients(tt, like=xx, derivatives=True)
                x0_, eps_ = (x0, eps) if tt is t and xx is x else predict(xx, tt)
                return c.d_alpha * x0_ + c.d_sigma * eps_

            dt = (t_next - t).to(x.dtype)
            x = euler_step(x, velocity(x, t), dt) if solver == "euler" else heun_step(x, t, t_next, velocity)
    return x
