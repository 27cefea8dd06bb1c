"""BOOT (spec B.9): the Signal-ODE step is the teacher's DDIM step (float64), the hard-wired boundary makes the first
bootstrap update equal the teacher step it bootstraps, training moves the one-step sample toward the teacher's ODE
endpoint, and the tiny-SD student exports to a stock one-step Diffusers pipeline that computes exactly g(eps, 0)."""

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_process, toy_teacher_bundle
from stepdistill.benchmarks.toy2d.teacher import guided_posterior_mean_x0, teacher_ode_endpoint
from stepdistill.diffusion.solvers import ddim_step_from_x0
from stepdistill.recipes.boot import (BOOTOptions, BOOTRecipe, boundary_kappa, boundary_signal, bootstrap_target,
                                      signal_of, signal_step_delta)
from stepdistill.recipes.progressive import path_coefficients, pd_grid

W = 2.0


def _c(process, t, like):
    return path_coefficients(process, torch.as_tensor(t, dtype=torch.float64), like)


def test_signal_ode_step_is_the_teacher_ddim_step_and_the_first_update_is_exact_float64():
    """At t = T the student's signal is y_T(eps) and x_hat_T = eps = x_T, so the bootstrap target equals the signal of
    the teacher's own DDIM step from x_T (exact algebra; float64 to 1e-12). The same identity holds at any (t, s)
    for any y_t, and the last step (s = clean, delta = 1) targets the teacher's x0 itself."""
    bundle = toy_teacher_bundle("ring8")
    mix, process = bundle.mixture, toy_process()
    grid = pd_grid(process, 32)
    g = torch.Generator().manual_seed(0)
    n = 256
    eps = torch.randn(n, 2, generator=g, dtype=torch.float64)
    labels = torch.randint(0, mix.num_classes, (n,), generator=g)

    def teacher(x, c):
        return guided_posterior_mean_x0(mix, x, c.alpha, c.sigma, labels, W)

    T = grid[-1].repeat(n)
    c_T, c_s = _c(process, T, eps), _c(process, grid[-2].repeat(n), eps)
    y_T = boundary_signal(eps, c_T)
    x_T = c_T.alpha * y_T + c_T.sigma * eps
    assert torch.allclose(x_T, eps, rtol=0, atol=1e-14)
    f = teacher(x_T, c_T)
    target = bootstrap_target(y_T, f, signal_step_delta(c_T, c_s))
    teacher_step = ddim_step_from_x0(eps, f, c_T, c_s)  # the teacher's first DDIM step from x_T = eps
    assert torch.allclose(target, signal_of(teacher_step, eps, c_s), rtol=0, atol=1e-12)
    assert boundary_kappa(c_T, c_T).abs().max() == 0  # the hard-wired boundary: g(eps, T) = y_T exactly

    # any interior step, any current signal estimate
    k = torch.randint(2, 33, (n,), generator=g)
    c_t, c_s = _c(process, grid[k], eps), _c(process, grid[k - 1], eps)
    y_t = torch.randn(n, 2, generator=g, dtype=torch.float64)
    x_t = c_t.alpha * y_t + c_t.sigma * eps
    f = teacher(x_t, c_t)
    target = bootstrap_target(y_t, f, signal_step_delta(c_t, c_s))
    assert torch.allclose(target, signal_of(ddim_step_from_x0(x_t, f, c_t, c_s), eps, c_s), rtol=0, atol=1e-10)

    # last step to the clean end: delta = 1, the target is the teacher's x0
    c_0 = _c(process, torch.full((n,), float("nan")), eps)
    assert torch.equal(signal_step_delta(c_t, c_0), torch.ones_like(c_t.alpha))
    assert torch.equal(boundary_kappa(c_0, c_T), torch.ones_like(c_T.alpha))


def test_recipe_first_update_target_equals_the_teacher_step_and_clean_signal_is_the_raw_output():
    bundle = toy_teacher_bundle("ring8")
    r = BOOTRecipe(bundle, BOOTOptions(guidance_scale=W, teacher_steps=16))
    n = 64
    g = torch.Generator().manual_seed(1)
    eps = torch.randn(n, 2, generator=g)
    labels = torch.randint(0, bundle.mixture.num_classes, (n,), generator=g)
    cond, uncond = bundle.encode_conditions(labels, "cpu")
    T, s = r.grid[-1].repeat(n), r.grid[-2].repeat(n)
    with torch.no_grad():
        y_T = r.signal(eps, T, cond)
        e64, c_T64, c_s64 = eps.double(), _c(r.process, T, eps.double()), _c(r.process, s, eps.double())
        # independent of the (random) network; 1 - sigma_T needs float64 (in float32 it is off by ~0.2%)
        assert torch.equal(y_T, boundary_signal(e64, c_T64).float())
        target, delta = r.bootstrap(eps, T, s, cond, uncond)
        f = bundle.denoiser.predict(eps, T.long(), cond, want="x0", cfg_scale=W, uncond=uncond)["x0"].double()
        expected = signal_of(ddim_step_from_x0(e64, f, c_T64, c_s64), e64, c_s64)  # the teacher step, in float64
        assert torch.allclose(target.double(), expected, rtol=0, atol=1e-6), (target.double() - expected).abs().max()
        assert torch.all((delta > 0) & (delta < 1))
        clean = torch.full((n,), float("nan"), dtype=torch.float64)
        raw = r.student.native(eps, torch.zeros(n, dtype=torch.long), cond)
        assert torch.equal(r.signal(eps, clean, cond), raw)  # the exported network output is the sample


def test_training_moves_the_one_step_sample_toward_the_teacher_ode_endpoint(one_thread):
    """150 bootstrap updates (data-free: only labels) cut the paired error to the guided teacher's ODE endpoint from
    the same noise to under 35% of its initial value (spec B.9 sanity check, paired error)."""
    torch.manual_seed(0)
    bundle = toy_teacher_bundle("ring8", hidden=128, depth=3)
    r = BOOTRecipe(bundle, BOOTOptions(guidance_scale=W, teacher_steps=4))
    mix, process = bundle.mixture, r.process
    g = torch.Generator().manual_seed(0)
    eps = torch.randn(512, 2, generator=g)
    labels = torch.randint(0, mix.num_classes, (512,), generator=g)
    ref = teacher_ode_endpoint(mix, lambda t: (process.alpha(t), process.sigma(t)),
                               torch.arange(999, -1, -1, dtype=torch.float64), eps.double(), W, labels).float()

    def paired():
        with torch.no_grad():
            cond, _ = bundle.encode_conditions(labels, "cpu")
            out = r.signal(eps, torch.full((512,), float("nan"), dtype=torch.float64), cond)
        return (out - ref).norm(dim=1).mean().item()

    before = paired()
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(150):
        batch = {"conditions": torch.randint(0, mix.num_classes, (128,), generator=gen)}
        out = r.training_step(batch, step, gen)
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
    after = paired()
    assert after < 0.35 * before, (before, after)


def test_bad_options_and_sampling_arguments():
    bundle = toy_teacher_bundle("ring8")
    with pytest.raises(ValueError, match="teacher_steps"):
        BOOTRecipe(bundle, BOOTOptions(teacher_steps=0))
    with pytest.raises(ValueError, match="timestep 0"):
        BOOTRecipe(bundle, BOOTOptions(teacher_steps=1000))
    with pytest.raises(ValueError, match="loss_scaling"):
        BOOTRecipe(bundle, BOOTOptions(loss_scaling="l1"))
    r = BOOTRecipe(bundle, BOOTOptions(guidance_scale=W, teacher_steps=4))
    labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="one-step"):
        r.sample(4, torch.Generator().manual_seed(0), conditions=labels, steps=2)
    with pytest.raises(ValueError, match="guidance_scale=2.0"):
        r.sample(4, torch.Generator().manual_seed(0), conditions=labels, guidance_scale=3.0)
    # the sample contract of the toy bench: the starting noise is the generator's first draw
    pts = r.sample(4, torch.Generator().manual_seed(0), conditions=labels)
    eps = torch.randn(4, 2, generator=torch.Generator().manual_seed(0))
    cond, _ = bundle.encode_conditions(labels, "cpu")
    with torch.no_grad():
        assert torch.equal(pts, r.signal(eps, torch.full((4,), float("nan"), dtype=torch.float64), cond))


def test_tiny_sd_steps_export_to_a_stock_one_step_pipeline_that_computes_g_eps_0(tmp_path):
    """A few BOOT updates on the tiny SD pipeline (prompts only), export, and the stock pipeline loaded from the folder
    returns exactly the student's g(eps, clean) for the same starting latents: one UNet call at timestep 0."""
    from diffusers import DiffusionPipeline

    from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
    from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

    bundle = TeacherBundle.from_pipeline(load_pipeline(tiny_pipeline_dir("sd")))
    r = BOOTRecipe(bundle, BOOTOptions(guidance_scale=4.5, teacher_steps=8, sample_conditions=["a cat"]))
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(2):
        out = r.training_step({"conditions": ["a cat", "a dog"]}, step, gen)
        assert torch.isfinite(out.losses["student"])
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
    folder = r.export(tmp_path / "export")
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.scheduler.config.prediction_type == "sample"
    calls = []
    orig = pipe.unet.forward

    def counting(*a, **k):
        calls.append((int(torch.as_tensor(a[1]).flatten()[0]), a[0].shape[0]))
        return orig(*a, **k)

    pipe.unet.forward = counting
    eps = torch.randn(1, *bundle.sample_shape, generator=torch.Generator().manual_seed(3))
    latents = pipe("a cat", latents=eps.clone(), num_inference_steps=1, guidance_scale=1.0, output_type="latent").images
    assert calls == [(0, 1)]
    cond, _ = bundle.encode_conditions(["a cat"], "cpu")
    with torch.no_grad():
        ours = r.signal(eps, torch.full((1,), float("nan"), dtype=torch.float64), cond)
    assert torch.allclose(latents.float(), ours, atol=1e-5), (latents - ours).abs().max()


@pytest.mark.slow
def test_tiny_sd_yaml_run_exports_and_loads_in_a_fresh_stock_process(tmp_path):
    import yaml

    from stepdistill.config import config_from_dict
    from stepdistill.runner import run_training
    from stepdistill.testing.stock_load import load_and_sample_in_fresh_process

    raw = yaml.safe_load(open("recipes/boot/tiny-sd.yaml"))
    raw["run"]["output_dir"] = str(tmp_path / "run")
    run_dir = run_training(config_from_dict(raw, source="tiny-sd.yaml"))
    summary = load_and_sample_in_fresh_process(run_dir / "export", {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False and summary["scheduler"] == "DDIMScheduler"
    assert summary["pipeline"] == "StableDiffusionPipeline"
    assert summary["timesteps"] == [0], summary  # one call at the clean end, no CFG batch
    assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]
