"""toy2d metrics (spec C.3): sliced Wasserstein-2 and its noise floor, RBF MMD, mode weights, paired error.

All metrics take (N, 2) point sets (any float dtype, any device), compute in float64 and return
Python floats (or a (K,) float64 tensor for :func:`mode_weights`). Random projections come from
the ``generator`` argument; with none, a fixed ``torch.Generator`` seeded with 0 is used, so the
same inputs always give the same number.

Targets:

* at ``w = 1`` the target is the exact mixture (or its class sub-mixture): compare with
  ``mixture.sample(...)`` and ``mixture.component_weights(c)``;
* for a guided target (``w != 1``) there is no closed form. The target distribution is
  ``teacher.reference_samples`` (the guided PF-ODE, 1000 DDIM steps, spec C.1), the target mode
  weights are ``mode_weights(reference, mixture)`` estimated from those reference samples, and the
  noise floor is the distance between two independent reference sets
  (``sw2_noise_floor(..., sampler=...)``).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from .mixture import GaussianMixture2D

__all__ = [
    "DEFAULT_METRIC_SEED",
    "median_bandwidth",
    "mmd_rbf",
    "mode_weight_error",
    "mode_weights",
    "paired_error",
    "sliced_wasserstein2",
    "sw2_noise_floor",
]

DEFAULT_METRIC_SEED = 0


def _points(x: Tensor, name: str) -> Tensor:
    if not torch.is_tensor(x) or x.ndim != 2 or x.shape[0] < 1:
        shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
        raise ValueError(f"{name} must be an (N, d) tensor of points with N >= 1; got {shape}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains nan or inf; the sampler diverged")
    return x.detach().to(torch.float64)


def _same_shape(a: Tensor, b: Tensor, why: str) -> tuple[Tensor, Tensor]:
    a, b = _points(a, "a"), _points(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape ({why}); got {tuple(a.shape)} and {tuple(b.shape)}")
    return a, b.to(a.device)


def _generator(generator: torch.Generator | None) -> torch.Generator:
    return generator if generator is not None else torch.Generator().manual_seed(DEFAULT_METRIC_SEED)


def sliced_wasserstein2(
    a: Tensor, b: Tensor, num_projections: int = 256, generator: torch.Generator | None = None
) -> float:
    """Sliced Wasserstein-2 distance ``SW2 = sqrt(mean_theta W2^2(theta.a, theta.b))`` (NOT squared).

    ``theta`` are ``num_projections`` random unit directions (Gaussian draws normalised; on the
    generator's device). Each 1-D ``W2^2`` is exact for equal-size empirical sets: sort both
    projections and average the squared differences of matched order statistics. A pure shift
    ``b = a + delta`` gives ``|delta| / sqrt(d)`` (``E[(theta . delta)^2] = |delta|^2 / d``).
    """
    a, b = _same_shape(a, b, "the exact 1-D W2 matches sorted samples one to one")
    if isinstance(num_projections, bool) or not isinstance(num_projections, int) or num_projections < 1:
        raise ValueError(f"num_projections must be a positive integer; got {num_projections!r}")
    gen = _generator(generator)
    theta = torch.randn(num_projections, a.shape[1], generator=gen, device=gen.device, dtype=torch.float64)
    theta = (theta / theta.norm(dim=1, keepdim=True)).to(a.device)
    pa = torch.sort(a @ theta.T, dim=0).values  # (N, P)
    pb = torch.sort(b @ theta.T, dim=0).values
    return math.sqrt(((pa - pb) ** 2).mean().item())


def sw2_noise_floor(
    mixture: GaussianMixture2D,
    n: int = 10000,
    generator: torch.Generator | None = None,
    num_projections: int = 256,
    class_labels=None,
    sampler: Callable[[int, torch.Generator], Tensor] | None = None,
) -> float:
    """SW2 between two independent size-``n`` sets from the target: the smallest SW2 a perfect
    model can expect at this ``n`` (spec C.3). Compare students at the same ``n`` and ``num_projections``.

    The default target is the exact mixture (conditioned on ``class_labels`` when given). For a
    guided target pass ``sampler=lambda n, g: reference_samples(mixture, ..., n=n, w=w, generator=g)``.
    Both sets and the projections are drawn from ``generator`` (seeded 0 when None), in that order.
    """
    gen = _generator(generator)
    if sampler is None:
        sampler = lambda m, g: mixture.sample(m, g, class_labels=class_labels, dtype=torch.float64)[0]  # noqa: E731
    first, second = sampler(n, gen), sampler(n, gen)
    return sliced_wasserstein2(first, second, num_projections, gen)


def median_bandwidth(a: Tensor, b: Tensor | None = None, max_points: int = 1000) -> float:
    """Median heuristic: the median pairwise Euclidean distance within the pooled set ``a ∪ b``
    (evenly strided subsample of at most ``max_points`` points from each set, so it is deterministic).
    Fix it from the target when comparing several models against one target, so all use one kernel."""
    sets = [_points(a, "a")] + ([] if b is None else [_points(b, "b").to(a.device)])
    pooled = torch.cat([s[:: max(1, math.ceil(s.shape[0] / max_points))] for s in sets])
    dist = torch.cdist(pooled, pooled)
    off_diag = dist[~torch.eye(pooled.shape[0], dtype=torch.bool, device=pooled.device)]
    if off_diag.numel() == 0:
        raise ValueError("median_bandwidth needs at least 2 points")
    h = off_diag.median().item()
    if h <= 0:
        raise ValueError("median_bandwidth: the points coincide (median distance 0); pass an explicit bandwidth")
    return h


def _mean_kernel(x: Tensor, y: Tensor, bandwidth: float, chunk: int = 2048) -> float:
    total = 0.0
    y_sq = (y**2).sum(dim=1)
    for start in range(0, x.shape[0], chunk):
        xc = x[start : start + chunk]
        sq = ((xc**2).sum(dim=1)[:, None] - 2 * xc @ y.T + y_sq[None, :]).clamp_min(0)
        total += torch.exp(-sq / (2 * bandwidth**2)).sum().item()
    return total / (x.shape[0] * y.shape[0])


def mmd_rbf(a: Tensor, b: Tensor, bandwidth: float | None = None) -> float:
    """Maximum mean discrepancy with the RBF kernel ``k(x, y) = exp(-|x - y|^2 / (2 h^2))``.

    Returns ``MMD = sqrt(mean k(a, a') + mean k(b, b') - 2 mean k(a, b))`` (the biased V-statistic,
    i.e. the RKHS distance between the empirical kernel mean embeddings: >= 0, exactly 0 for identical
    sets; NOT squared). ``h`` defaults to :func:`median_bandwidth` of the pooled sets. Sizes may differ.
    Cost is O(N M); kernel sums are chunked, so 10k x 10k fits in memory.
    """
    a, b = _points(a, "a"), _points(b, "b").to(a.device)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must have the same dimension; got {a.shape[1]} and {b.shape[1]}")
    h = median_bandwidth(a, b) if bandwidth is None else float(bandwidth)
    if not h > 0:
        raise ValueError(f"bandwidth must be > 0; got {bandwidth!r}")
    squared = _mean_kernel(a, a, h) + _mean_kernel(b, b, h) - 2 * _mean_kernel(a, b, h)
    return math.sqrt(max(squared, 0.0))


def mode_weights(samples: Tensor, mixture: GaussianMixture2D) -> Tensor:
    """(K,) fraction of ``samples`` whose nearest component mean (Euclidean) is ``mu_k`` (spec C.3)."""
    x = _points(samples, "samples")
    if x.shape[1] != mixture.dim:
        raise ValueError(f"samples must have shape (N, {mixture.dim}); got {tuple(x.shape)}")
    nearest = torch.cdist(x, mixture.means.to(x.device)).argmin(dim=1)
    return torch.bincount(nearest, minlength=mixture.num_components).to(torch.float64).cpu() / x.shape[0]


def mode_weight_error(samples: Tensor, target_weights: Tensor, mixture: GaussianMixture2D) -> float:
    """``max_k |mode_weights(samples)_k - target_k|`` (absolute). Targets: ``mixture.component_weights(c)``
    at w = 1; ``mode_weights(reference_samples(...), mixture)`` for a guided target (see module docstring)."""
    target = torch.as_tensor(target_weights, dtype=torch.float64).cpu()
    if tuple(target.shape) != (mixture.num_components,):
        raise ValueError(
            f"target_weights must have shape ({mixture.num_components},), one per component of the mixture; "
            f"got {tuple(target.shape)}"
        )
    return (mode_weights(samples, mixture) - target).abs().max().item()


def paired_error(a: Tensor, b: Tensor) -> float:
    """``mean_i |a_i - b_i|_2`` for paired rows, e.g. student(eps) vs teacher_ode_endpoint(eps) (spec C.3)."""
    a, b = _same_shape(a, b, "rows are paired: row i of a goes with row i of b")
    return (a - b).norm(dim=1).mean().item()
