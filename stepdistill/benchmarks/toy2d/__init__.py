"""toy2d benchmark: 2-D Gaussian mixtures with an exact (analytic) teacher and distribution metrics (spec Part C).

* :mod:`.mixture`: ``GaussianMixture2D`` (JSON-backed, class-labelled), bundled ``ring8`` and ``grid25``.
* :mod:`.teacher`: exact posterior mean on any Gaussian path, the parameter-free backbone
  ``AnalyticGMMDenoiserNet``, and the guided reference distribution (1000-step DDIM PF-ODE).
* :mod:`.metrics`: sliced W2 and its noise floor, RBF MMD, mode weights, paired error.
"""

from .metrics import (
    median_bandwidth,
    mmd_rbf,
    mode_weight_error,
    mode_weights,
    paired_error,
    sliced_wasserstein2,
    sw2_noise_floor,
)
from .mixture import NULL_CLASS, GaussianMixture2D, available_mixtures, load_mixture
from .teacher import (
    REFERENCE_STEPS,
    AnalyticGMMDenoiserNet,
    guided_posterior_mean_x0,
    marginal_log_prob,
    posterior_mean_x0,
    reference_samples,
    teacher_ode_endpoint,
    uniform_times,
)

__all__ = [
    "NULL_CLASS",
    "REFERENCE_STEPS",
    "AnalyticGMMDenoiserNet",
    "GaussianMixture2D",
    "available_mixtures",
    "guided_posterior_mean_x0",
    "load_mixture",
    "marginal_log_prob",
    "median_bandwidth",
    "mmd_rbf",
    "mode_weight_error",
    "mode_weights",
    "paired_error",
    "posterior_mean_x0",
    "reference_samples",
    "sliced_wasserstein2",
    "sw2_noise_floor",
    "teacher_ode_endpoint",
    "uniform_times",
]
