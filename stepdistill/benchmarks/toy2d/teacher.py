"""The analytic toy2d teacher: the exact denoiser of a Gaussian mixture on any Gaussian path (spec C.1).

For ``x_t = alpha x0 + sigma eps`` with ``p(x0) = sum_k pi_k N(mu_k, s_k^2 I)``:

* ``p_t(x_t) = sum_k pi_k N(x_t; alpha mu_k, v_k I)`` with ``v_k = alpha^2 s_k^2 + sigma^2``;
* responsibilities ``gamma_k(x_t) = softmax_k[log pi_k + log N(x_t; alpha mu_k, v_k I)]``;
* posterior mean ``E[x0 | x_t] = sum_k gamma_k [mu_k + (alpha s_k^2 / v_k)(x_t - alpha mu_k)]``.

Only ``(alpha, sigma)`` enter, so one function serves every family of spec A.1: VP (discrete or
cosine), rectified flow (``alpha = 1 - s``, ``sigma = s``), TrigFlow (``alpha = cos t``,
``sigma = sigma_d sin t``) and EDM (``alpha = 1``). Conditioning on class ``c`` restricts the
softmax to the components of ``c`` (renormalising ``pi`` inside the class only shifts all logits
of a row by one constant, so it cancels). Everything runs in float64 with log-sum-exp, so it is
exact at tiny ``sigma`` (``x0 -> x_t / alpha``, even far from every mode) and at huge ``sigma``
or ``alpha = 0`` (``x0 -> `` the prior or class mean).

The *guided* teacher uses classifier-free guidance in the Imagen convention (spec A.3) on x0:
``x0_w = x0_u + w (x0_c - x0_u)``, and ``eps_w = (x_t - alpha x0_w) / sigma`` from the same guided
x0. Its distribution has no closed form; spec C.1 defines it as the endpoint of the guided
PF-ODE solved with 1000 DDIM steps from pure noise (:func:`reference_samples`).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from stepdistill.diffusion.guidance import apply_cfg

from .mixture import NULL_CLASS, GaussianMixture2D

__all__ = [
    "REFERENCE_STEPS",
    "AlphaSigmaFn",
    "AnalyticGMMDenoiserNet",
    "guided_posterior_mean_x0",
    "marginal_log_prob",
    "posterior_mean_x0",
    "reference_samples",
    "teacher_ode_endpoint",
    "uniform_times",
]

REFERENCE_STEPS = 1000
"""DDIM steps that define the guided teacher distribution (spec C.1)."""

AlphaSigmaFn = Callable[[Tensor], "tuple[Tensor, Tensor]"]
"""``t -> (alpha(t), sigma(t))`` for a 1-D tensor of times, e.g. ``lambda t: (proc.alpha(t), proc.sigma(t))``
for a ``stepdistill.diffusion`` process, or ``lambda s: (1 - s, s)`` for rectified flow."""

LabelsLike = Tensor | Sequence[int] | int | None


# ---------------------------------------------------------------------------------------- posterior


def _coefficient(value, n: int, device: torch.device, what: str) -> Tensor:
    """alpha or sigma as a float64 (n, 1) column. Accepts a float, a 0-d, (n,), (1,), (n, 1) or (1, 1) tensor."""
    c = torch.as_tensor(value, dtype=torch.float64, device=device)
    if c.ndim == 1:
        c = c[:, None]
    elif c.ndim == 0:
        c = c.reshape(1, 1)
    if c.ndim != 2 or c.shape[1] != 1 or c.shape[0] not in (1, n):
        raise ValueError(f"{what} must be a scalar or have shape ({n},) or ({n}, 1) to match x_t; got {tuple(c.shape)}")
    if (c < 0).any() or not torch.isfinite(c).all():
        raise ValueError(f"{what} must be finite and >= 0 (a Gaussian path has alpha, sigma >= 0); got {c.flatten()[:8].tolist()}")
    return c.expand(n, 1)


def _component_terms(
    mixture: GaussianMixture2D, x_t: Tensor, alpha, sigma
) -> tuple[Tensor, Tensor]:
    """Per-component log-joint ``log pi_k + log N(x_t; alpha mu_k, v_k I)`` (N, K) and per-component
    posterior means ``mu_k + (alpha s_k^2 / v_k)(x_t - alpha mu_k)`` (N, K, d), both float64."""
    if x_t.ndim != 2 or x_t.shape[1] != mixture.dim:
        raise ValueError(f"x_t must have shape (N, {mixture.dim}); got {tuple(x_t.shape)}")
    n, device = x_t.shape[0], x_t.device
    x = x_t.to(torch.float64)
    a = _coefficient(alpha, n, device, "alpha")
    s = _coefficient(sigma, n, device, "sigma")
    means = mixture.means.to(device)  # (K, d) float64
    var0 = mixture.stds.to(device) ** 2  # (K,)
    v = a**2 * var0[None, :] + s**2  # (N, K)
    if not (v > 0).all():
        raise ValueError("alpha and sigma are both 0 for some sample: x_t carries no information; use sigma > 0")
    resid = x[:, None, :] - a[:, :, None] * means[None, :, :]  # (N, K, d)
    sq = (resid**2).sum(dim=-1)
    logits = mixture.weights.to(device).log()[None, :] - 0.5 * sq / v - 0.5 * mixture.dim * torch.log(2 * math.pi * v)
    gain = (a * var0[None, :] / v)[:, :, None]  # (N, K, 1)
    comp_means = means[None, :, :] + gain * resid
    return logits, comp_means


def _masked_logits(logits: Tensor, mask: Tensor | None) -> Tensor:
    return logits if mask is None else logits.masked_fill(~mask, float("-inf"))


def _posterior_from_terms(logits: Tensor, comp_means: Tensor, mask: Tensor | None) -> Tensor:
    gamma = torch.softmax(_masked_logits(logits, mask), dim=1)  # log-sum-exp stable
    return (gamma[:, :, None] * comp_means).sum(dim=1)


def _label_mask(mixture: GaussianMixture2D, class_labels: LabelsLike, n: int, device: torch.device) -> Tensor | None:
    """(N, K) allowed-component mask, or None when every sample is unconditional."""
    if class_labels is None:
        return None
    labels = mixture.per_sample_labels(class_labels, n).to(device)
    if (labels == NULL_CLASS).all():
        return None
    return mixture.allowed_mask(labels)


def posterior_mean_x0(
    mixture: GaussianMixture2D, x_t: Tensor, alpha, sigma, class_labels: LabelsLike = None
) -> Tensor:
    """Exact ``E[x0 | x_t]`` (spec C.1) for ``x_t = alpha x0 + sigma eps``.

    Args:
        mixture: the data distribution.
        x_t: (N, 2) noisy points.
        alpha, sigma: path coefficients, a float or a tensor broadcastable to (N, 1) (shape (), (N,) or (N, 1)).
        class_labels: None (unconditional), an int, or (N,) ints with -1 meaning unconditional; a class
            label conditions on that class's sub-mixture.

    Returns (N, 2) in ``x_t.dtype`` (computed in float64).
    """
    logits, comp_means = _component_terms(mixture, x_t, alpha, sigma)
    mask = _label_mask(mixture, class_labels, x_t.shape[0], x_t.device)
    return _posterior_from_terms(logits, comp_means, mask).to(x_t.dtype)


def guided_posterior_mean_x0(
    mixture: GaussianMixture2D, x_t: Tensor, alpha, sigma, class_labels: LabelsLike, w
) -> Tensor:
    """Classifier-free-guided x0, Imagen convention (spec A.3): ``x0_u + w (x0_c - x0_u)``.

    ``w`` is a float or an (N,) tensor; ``w = 1`` is the conditional posterior mean, ``w = 0`` the
    unconditional one. Rows whose label is -1 (or all rows when ``class_labels`` is None) have
    ``x0_c = x0_u``, so guidance leaves them unchanged, as on a real model. The component terms are
    computed once and shared by the conditional and unconditional branches.
    """
    mask = _label_mask(mixture, class_labels, x_t.shape[0], x_t.device)
    return _guided_x0(mixture, x_t, alpha, sigma, mask, w).to(x_t.dtype)


def _guided_x0(mixture: GaussianMixture2D, x_t: Tensor, alpha, sigma, mask: Tensor | None, w) -> Tensor:
    """Guided x0 in float64 given the (N, K) conditional mask (None = all unconditional)."""
    logits, comp_means = _component_terms(mixture, x_t, alpha, sigma)
    cond = _posterior_from_terms(logits, comp_means, mask)
    if mask is None or (not torch.is_tensor(w) and w == 1):
        return cond
    uncond = _posterior_from_terms(logits, comp_means, None)
    scale = w.to(device=x_t.device, dtype=torch.float64) if torch.is_tensor(w) else float(w)
    return apply_cfg(cond, uncond, scale, convention="imagen")


def marginal_log_prob(
    mixture: GaussianMixture2D, x_t: Tensor, alpha, sigma, class_labels: LabelsLike = None
) -> Tensor:
    """``log p_t(x_t)`` (or ``log p_t(x_t | c)``), float64 (N,). Differentiable in ``x_t``; by Tweedie's
    formula ``E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha``."""
    logits, _ = _component_terms(mixture, x_t, alpha, sigma)
    mask = _label_mask(mixture, class_labels, x_t.shape[0], x_t.device)
    if mask is None:
        return torch.logsumexp(logits, dim=1)
    log_class_mass = torch.logsumexp(_masked_logits(mixture.weights.to(x_t.device).log().expand_as(logits), mask), 1)
    return torch.logsumexp(_masked_logits(logits, mask), dim=1) - log_class_mass


class AnalyticGMMDenoiserNet(nn.Module):
    """The exact mixture denoiser as a backbone: ``forward(x_t, alpha, sigma, class_labels) -> x0``.

    It has no parameters and no state-dict entries (the mixture is a plain attribute, kept in
    float64 and moved to ``x_t``'s device per call, so ``.to(dtype)`` cannot round it). A
    ``Denoiser`` wrapper applies classifier-free guidance exactly as on a trained model: one call
    with the class labels, one with -1 (the null label), ``x0_u + w (x0_c - x0_u)``;
    :meth:`guided` does the same in one pass.
    """

    null_class = NULL_CLASS

    def __init__(self, mixture: GaussianMixture2D):
        super().__init__()
        if not isinstance(mixture, GaussianMixture2D):
            raise TypeError(f"AnalyticGMMDenoiserNet needs a GaussianMixture2D; got {type(mixture).__name__}")
        self.mixture = mixture

    @property
    def num_classes(self) -> int:
        return self.mixture.num_classes

    def forward(self, x_t: Tensor, alpha, sigma, class_labels: LabelsLike = None) -> Tensor:
        return posterior_mean_x0(self.mixture, x_t, alpha, sigma, class_labels)

    def guided(self, x_t: Tensor, alpha, sigma, class_labels: LabelsLike, w) -> Tensor:
        return guided_posterior_mean_x0(self.mixture, x_t, alpha, sigma, class_labels, w)

    def extra_repr(self) -> str:
        return repr(self.mixture)


# ---------------------------------------------------------------------------------------- guided PF-ODE


def uniform_times(t_noisiest: float, t_cleanest: float, steps: int = REFERENCE_STEPS) -> Tensor:
    """``steps + 1`` equally spaced float64 times from the noisiest to the cleanest."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    return torch.linspace(float(t_noisiest), float(t_cleanest), steps + 1, dtype=torch.float64)


def _path_on_grid(process_alpha_sigma: AlphaSigmaFn, times, steps: int | None) -> tuple[Tensor, Tensor]:
    """alpha, sigma (float64, CPU) on the validated time grid; see :func:`teacher_ode_endpoint`."""
    times = torch.as_tensor(times, dtype=torch.float64).flatten().cpu()
    if times.numel() < 2:
        raise ValueError("times must hold at least 2 values: (t_noisiest, t_cleanest) or a full descending grid")
    if times.numel() == 2:
        times = uniform_times(times[0].item(), times[1].item(), REFERENCE_STEPS if steps is None else steps)
    elif steps is not None and steps != times.numel() - 1:
        raise ValueError(
            f"steps={steps} disagrees with the {times.numel()}-point time grid ({times.numel() - 1} steps); "
            f"pass steps=None with a full grid, or only the two end times"
        )
    out = process_alpha_sigma(times)
    if not (isinstance(out, (tuple, list)) and len(out) == 2):
        raise ValueError("process_alpha_sigma must return a pair (alpha, sigma) for the given times")
    alpha, sigma = (torch.as_tensor(v, dtype=torch.float64).cpu().expand(times.shape).clone() for v in out)
    if (alpha < 0).any() or (sigma < 0).any() or not (torch.isfinite(alpha).all() and torch.isfinite(sigma).all()):
        raise ValueError("process_alpha_sigma returned a negative or non-finite alpha or sigma on the time grid")
    eta = torch.log(alpha) - torch.log(sigma)  # half log-SNR; -inf at pure noise, +inf at clean data
    if torch.isnan(eta).any() or not (eta[1:] > eta[:-1]).all():
        raise ValueError(
            "times must run from the noisiest to the cleanest: alpha/sigma must strictly increase along the grid "
            "(sigma = 0 is allowed only at the last time, alpha = 0 only at the first)"
        )
    return alpha, sigma


def teacher_ode_endpoint(
    mixture: GaussianMixture2D,
    process_alpha_sigma: AlphaSigmaFn,
    times,
    noise: Tensor,
    w=1.0,
    class_labels: LabelsLike = None,
    steps: int | None = None,
) -> Tensor:
    """Solve the guided teacher PF-ODE with DDIM (spec A.4) from given noise; the target of paired errors.

    Start ``x = sigma_T * noise`` (pure noise scaled like the teacher's sampler; exact when
    ``alpha_T = 0``), then for consecutive grid times ``t -> s``::

        x0 = x0_w(x, t);  eps = (x - alpha_t x0) / sigma_t;  x = alpha_s x0 + sigma_s eps

    and return ``x0_w`` at the last time (a final DDIM step to alpha = 1, sigma = 0, like Diffusers'
    DDIM with ``set_alpha_to_one``; when the grid ends at sigma = 0 this is just ``x / alpha``).

    Args:
        process_alpha_sigma: ``t -> (alpha, sigma)``, called once with the 1-D float64 grid.
        times: the two end times ``(t_noisiest, t_cleanest)``, split into ``steps`` (default
            :data:`REFERENCE_STEPS` = 1000) uniform steps, or a full descending grid (more than 2
            points) used as given. Any time variable works as long as alpha/sigma strictly increase.
        noise: (N, 2) standard normal starting noise.
        w: Imagen guidance scale (float or (N,) tensor); 1 = no guidance.
        class_labels: None, int or (N,) with -1 for unconditional.

    Returns (N, 2) in ``noise.dtype`` (integrated in float64).
    """
    alpha, sigma = _path_on_grid(process_alpha_sigma, times, steps)
    if noise.ndim != 2 or noise.shape[1] != mixture.dim:
        raise ValueError(f"noise must have shape (N, {mixture.dim}); got {tuple(noise.shape)}")
    mask = _label_mask(mixture, class_labels, noise.shape[0], noise.device)
    x = sigma[0].item() * noise.to(torch.float64)
    for i in range(alpha.numel() - 1):
        a_t, s_t, a_s, s_s = alpha[i].item(), sigma[i].item(), alpha[i + 1].item(), sigma[i + 1].item()
        x0 = _guided_x0(mixture, x, a_t, s_t, mask, w)
        eps = (x - a_t * x0) / s_t
        x = a_s * x0 + s_s * eps
    x0 = _guided_x0(mixture, x, alpha[-1].item(), sigma[-1].item(), mask, w)
    return x0.to(noise.dtype)


def reference_samples(
    mixture: GaussianMixture2D,
    process_alpha_sigma: AlphaSigmaFn,
    times,
    n: int,
    w=1.0,
    class_labels: LabelsLike = None,
    generator: torch.Generator | None = None,
    steps: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """``n`` samples of the (guided) teacher distribution: :func:`teacher_ode_endpoint` from fresh noise
    ``N(0, I)`` drawn with ``generator`` (on its device). With the default 1000 steps this *defines*
    the guided target of spec C.1; at ``w = 1`` it reproduces the exact (conditional) mixture up to
    discretisation error. Returns (n, 2) in ``dtype``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive integer number of samples; got {n!r}")
    device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn(n, mixture.dim, generator=generator, device=device, dtype=torch.float64)
    out = teacher_ode_endpoint(mixture, process_alpha_sigma, times, noise, w, class_labels, steps)
    return out.to(dtype)
