"""toy2d benchmark pieces (spec Part C): the analytic teacher's posterior mean on VP, rectified-flow and TrigFlow
paths, the guided reference ODE, the metrics (sliced W2 and its floor, MMD, mode weights) and mixture JSON files."""

import json
import math

import pytest
import torch

from stepdistill.benchmarks.toy2d import (
    GaussianMixture2D,
    load_mixture,
    marginal_log_prob,
    mmd_rbf,
    mode_weight_error,
    mode_weights,
    posterior_mean_x0,
    reference_samples,
    sliced_wasserstein2,
    sw2_noise_floor,
)
from stepdistill.benchmarks.toy2d.bundle import toy_process
from stepdistill.diffusion.processes import RectifiedFlow, TrigFlow

# (name, alpha, sigma) at a mid-noise time of each family (spec A.1).
_VP = toy_process()
_PATHS = {
    "vp": (_VP.alpha(torch.tensor([400])).item(), _VP.sigma(torch.tensor([400])).item()),
    "rectified_flow": (RectifiedFlow().alpha(torch.tensor([0.45])).item(), RectifiedFlow().sigma(torch.tensor([0.45])).item()),
    "trigflow": (TrigFlow(0.5).alpha(torch.tensor([1.1])).item(), TrigFlow(0.5).sigma(torch.tensor([1.1])).item()),
}


def _two_modes() -> GaussianMixture2D:
    return GaussianMixture2D(means=[[1.5, 0.0], [-1.0, 0.5]], stds=[0.3, 0.5], weights=[0.35, 0.65], classes=[0, 1])


@pytest.mark.parametrize("family", sorted(_PATHS))
def test_posterior_mean_one_component_closed_form(family):
    """One component: p(x0, x_t) is jointly Gaussian, so E[x0 | x_t] = mu + Cov(x0, x_t) Cov(x_t)^-1 (x_t - alpha mu)."""
    alpha, sigma = _PATHS[family]
    mu, s = torch.tensor([0.7, -1.2], dtype=torch.float64), 0.4
    mix = GaussianMixture2D(means=[mu.tolist()], stds=[s], weights=[1.0])
    x_t = torch.randn(64, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    eye = torch.eye(2, dtype=torch.float64)
    cov_0t, cov_tt = alpha * s**2 * eye, (alpha**2 * s**2 + sigma**2) * eye
    expected = mu + (x_t - alpha * mu) @ torch.linalg.solve(cov_tt, cov_0t)
    got = posterior_mean_x0(mix, x_t, alpha, sigma)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def _importance_posterior(mix: GaussianMixture2D, x_t: torch.Tensor, alpha: float, sigma: float, label=None,
                          m: int = 400_000) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalised importance estimate of E[x0 | x_t]: x0_i ~ prior (or the class sub-mixture),
    weights N(x_t; alpha x0_i, sigma^2 I). Returns (estimate, effective sample size) per row of x_t."""
    g = torch.Generator().manual_seed(7)
    x0, _ = mix.sample(m, g, class_labels=label, dtype=torch.float64)
    logw = -((x_t[:, None, :] - alpha * x0[None, :, :]) ** 2).sum(-1) / (2 * sigma**2)  # (P, m)
    wts = torch.softmax(logw, dim=1)
    return wts @ x0, 1.0 / (wts**2).sum(dim=1)


@pytest.mark.parametrize("family", sorted(_PATHS))
def test_posterior_mean_matches_importance_estimate(family):
    alpha, sigma = _PATHS[family]
    mix = _two_modes()
    g = torch.Generator().manual_seed(3)
    x0, _ = mix.sample(6, g, dtype=torch.float64)
    x_t = alpha * x0 + sigma * torch.randn(6, 2, generator=g, dtype=torch.float64)
    est, ess = _importance_posterior(mix, x_t, alpha, sigma)
    assert (ess > 2000).all(), f"importance estimate too noisy for this test (ESS {ess.min():.0f})"
    torch.testing.assert_close(posterior_mean_x0(mix, x_t, alpha, sigma), est, rtol=0, atol=0.03)
    # conditional on class 1: only that component may explain x_t
    est_c, _ = _importance_posterior(mix, x_t, alpha, sigma, label=1)
    torch.testing.assert_close(posterior_mean_x0(mix, x_t, alpha, sigma, class_labels=1), est_c, rtol=0, atol=0.03)
    # and the two differ (the test would notice a conditioning that is ignored)
    assert (posterior_mean_x0(mix, x_t, alpha, sigma) - est_c).abs().max() > 0.05


@pytest.mark.parametrize("family", sorted(_PATHS))
def test_posterior_mean_is_tweedie(family):
    """E[x0 | x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with the gradient from autograd."""
    alpha, sigma = _PATHS[family]
    mix = load_mixture("ring8")
    x_t = (torch.randn(32, 2, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 2).requires_grad_()
    (score,) = torch.autograd.grad(marginal_log_prob(mix, x_t, alpha, sigma).sum(), x_t)
    torch.testing.assert_close(posterior_mean_x0(mix, x_t.detach(), alpha, sigma),
                               (x_t.detach() + sigma**2 * score) / alpha, rtol=1e-9, atol=1e-9)


def test_unguided_reference_ode_reproduces_the_mixture():
    """At w = 1 the teacher ODE (DDIM, every 5th integer timestep: 200 steps, to keep the test fast) samples the exact
    class-conditional mixture up to the SW2 noise floor."""
    mix = load_mixture("ring8")
    n, proc, grid = 2000, toy_process(), torch.arange(999, -1, -5)
    labels = torch.multinomial(torch.tensor([0.25, 0.25, 0.3, 0.2]), n, replacement=True,
                               generator=torch.Generator().manual_seed(0))
    ode = reference_samples(mix, lambda t: (proc.alpha(t), proc.sigma(t)), grid, n, w=1.0,
                            class_labels=labels, generator=torch.Generator().manual_seed(1))
    exact, _ = mix.sample(n, torch.Generator().manual_seed(2), class_labels=labels)
    floor = sw2_noise_floor(mix, n, class_labels=labels)
    assert sliced_wasserstein2(ode, exact) < 2.0 * floor
    # guidance changes the distribution: at w = 4 the samples are sharper / pushed away from other classes
    guided = reference_samples(mix, lambda t: (proc.alpha(t), proc.sigma(t)), grid, n, w=4.0,
                               class_labels=labels, generator=torch.Generator().manual_seed(1))
    assert sliced_wasserstein2(guided, exact) > 3.0 * floor


# ------------------------------------------------------------------------------------------------------- metrics


def test_sw2_of_independent_sets_is_at_the_floor_and_a_shift_is_far_above():
    mix = load_mixture("ring8")
    floor = sw2_noise_floor(mix, 10000)
    a, _ = mix.sample(10000, torch.Generator().manual_seed(11))
    b, _ = mix.sample(10000, torch.Generator().manual_seed(12))
    assert 0.5 * floor < sliced_wasserstein2(a, b) < 2.0 * floor
    shift = torch.tensor([0.5, 0.0])
    assert sliced_wasserstein2(a, b + shift) > 5.0 * floor
    # a pure shift of the same set: SW2 = |delta| / sqrt(d) in expectation over directions
    few = a[:500]
    assert sliced_wasserstein2(few, few + shift, num_projections=2048) == pytest.approx(0.5 / math.sqrt(2), rel=0.03)
    assert sliced_wasserstein2(a, a) == 0.0


def test_mmd_small_for_same_distribution_large_for_shift():
    mix = load_mixture("grid25")
    a, _ = mix.sample(2000, torch.Generator().manual_seed(1))
    b, _ = mix.sample(2000, torch.Generator().manual_seed(2))
    same, shifted = mmd_rbf(a, b), mmd_rbf(a, b + torch.tensor([0.5, 0.5]))
    assert same < 0.05 and shifted > 4 * same


def test_mode_weights_match_mixture_weights():
    mix = load_mixture("ring8")
    x, _ = mix.sample(40000, torch.Generator().manual_seed(4))
    torch.testing.assert_close(mode_weights(x, mix), mix.weights, rtol=0, atol=0.01)
    # class 1 only: modes 2 and 3 with renormalised weights, the others empty
    xc, _ = mix.sample(20000, torch.Generator().manual_seed(5), class_labels=1)
    assert mode_weight_error(xc, mix.component_weights(1), mix) < 0.015
    assert mode_weight_error(xc, mix.weights, mix) > 0.3
    # all samples on mode 0: error = 1 - pi_0 for the full-mixture target
    on_zero = mix.means[0].expand(100, 2).float()
    assert mode_weight_error(on_zero, mix.weights, mix) == pytest.approx(1 - 0.2)


# ------------------------------------------------------------------------------------------------------- JSON


def test_mixture_json_round_trip(tmp_path):
    mix = _two_modes()
    loaded = load_mixture(str(mix.to_json(tmp_path / "two.json")))
    for field in ("means", "stds", "weights", "classes"):
        assert torch.equal(getattr(loaded, field), getattr(mix, field))
    assert loaded.num_classes == 2 and loaded.name == "mixture"
    assert {"ring8", "grid25"} <= {load_mixture(n).name for n in ("ring8", "grid25")}


@pytest.mark.parametrize("text, needle", [
    ("{not json", "not valid JSON"),
    (json.dumps({"means": [[0, 0]], "weights": [1.0]}), "missing required key(s) ['stds']"),
    (json.dumps({"means": [[0, 0], [1, 1]], "stds": [0.1, 0.1], "weights": [0.5, 0.4]}), "sum to"),
    (json.dumps({"means": [[0, 0, 0]], "stds": [0.1], "weights": [1.0]}), "shape (K, 2)"),
    (json.dumps({"means": [[0, 0]], "stds": [-0.1], "weights": [1.0]}), "stds[0]"),
    (json.dumps({"means": [[0, 0]], "stds": [0.1], "weights": [1.0], "colour": 3}), "unknown key(s) ['colour']"),
    (json.dumps([1, 2]), "expected a JSON object"),
])
def test_malformed_mixture_file_names_the_problem(tmp_path, text, needle):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError) as err:
        load_mixture(str(path))
    assert needle in str(err.value) and str(path) in str(err.value)


def test_missing_mixture_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a bundled mixture"):
        load_mixture(str(tmp_path / "nope.json"))
