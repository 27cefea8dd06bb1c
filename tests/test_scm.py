"""sCM / sCD (spec B.6): boundary condition, JVP tangent vs finite differences (C.5 item 7), exact teacher->TrigFlow
conversion (float64), the tangent formula, samplers, training steps on toy2d and tiny:sd, and the stock export."""

import math

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.scm import (SCMOptions, SCMRecipe, TrigFlowNetwork, consistency_function, scm_sampling_times,
                                     scm_tangent, trigflow_time_of)
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

D = torch.float64


@pytest.fixture(scope="module")
def sd_bundle():
    return TeacherBundle.from_pipeline(load_pipeline(tiny_pipeline_dir("sd")))


def _toy(**kw):
    return SCMRecipe(toy_teacher_bundle("ring8"), SCMOptions(guidance_scale=2.0, tangent_warmup=4, **kw), "cpu")


@pytest.mark.parametrize("mode", ["trigflow", "teacher"])
def test_boundary_condition_toy(mode):
    r = _toy(parameterization=mode, time_scale=100.0)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(8) % 4
    cond, _ = r.teacher.encode_conditions(labels, "cpu")
    with torch.no_grad():
        f0 = r.consistency(x, torch.zeros(8), cond)
        f1 = r.consistency(x, torch.full((8,), 0.7), cond)
    assert torch.equal(f0, x), "f(x, 0) = x exactly"
    assert not torch.allclose(f1, x)


def test_boundary_condition_and_init_equals_teacher_sd(sd_bundle):
    r = SCMRecipe(sd_bundle, SCMOptions(sample_conditions=["a cat"]), "cpu")
    assert r.mode == "teacher" and r.jvp_replaced, "a Diffusers student gets JVP-capable attention automatically"
    x = torch.randn(2, *sd_bundle.sample_shape, generator=torch.Generator().manual_seed(0))
    cond, _ = sd_bundle.encode_conditions(["a cat", "a dog"], "cpu")
    with torch.no_grad():
        assert torch.equal(r.consistency(x, torch.zeros(2), cond), x)


def _fd_check(net, x, t, v_x, v_t, cond, h, rtol):
    with torch.no_grad():
        _, jv = torch.func.jvp(lambda a, b: net(a, b, cond), (x, t), (v_x, v_t))
        fd = (net(x + h * v_x, t + h * v_t, cond) - net(x - h * v_x, t - h * v_t, cond)) / (2 * h)
    scale = jv.abs().max()
    assert scale > 0 and torch.isfinite(jv).all()
    err = (jv - fd).abs().max()
    assert err <= rtol * scale, f"JVP vs central differences: {err.item():.3g} > {rtol} * {scale.item():.3g}"
    return jv


@pytest.mark.parametrize("mode", ["trigflow", "teacher"])
def test_jvp_matches_finite_differences_toy(mode):
    """C.5 item 7 on the toy student, float64. Tangent in x only: exact to 1e-7; in (x, t): the time embedding is
    computed in float32 on purpose (fp32 time embedding), which bounds the finite-difference accuracy (h = 1e-3)."""
    r = _toy(parameterization=mode, time_scale=100.0)
    net = r.student.to(D)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 2, generator=g, dtype=D)
    t = torch.rand(16, generator=g, dtype=D) * 1.4 + 0.1
    v_x = torch.randn(16, 2, generator=g, dtype=D)
    cond, _ = r.teacher.encode_conditions(torch.arange(16) % 4, "cpu")
    _fd_check(net, x, t, v_x, torch.zeros_like(t), cond, 1e-5, 1e-7)
    _fd_check(net, x, t, v_x, torch.cos(t) * torch.sin(t), cond, 1e-3, 1e-3)


def test_jvp_matches_finite_differences_tiny_sd(sd_bundle):
    """The same check through a Diffusers UNet with the JVP-capable attention and the VP->TrigFlow conversion."""
    r = SCMRecipe(sd_bundle, SCMOptions(), "cpu")
    net = r.student.to(D)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, *sd_bundle.sample_shape, generator=g, dtype=D)
    t = torch.tensor([0.4, 1.2], dtype=D)
    cond, _ = sd_bundle.encode_conditions(["a cat", "a dog"], "cpu")
    cond = cond.to(dtype=D)
    v_x = torch.randn(x.shape, generator=g, dtype=D)
    _fd_check(net, x, t, v_x, torch.zeros_like(t), cond, 1e-5, 1e-6)
    # in t the DDPM timestep moves ~200-900 indices per radian and the UNet's sinusoidal embedding is very curved
    # there (the spec's "large time-embedding scale" pitfall): central differences need h = 1e-4 (truncation ~1e-3),
    # and the fp32 time embedding keeps h from going much lower
    _fd_check(net, x, t, v_x, torch.cos(t) * torch.sin(t), cond, 1e-4, 3e-3)


@pytest.mark.parametrize("family,prediction", [("sd", "epsilon"), ("sd", "v_prediction"), ("sd3", None)])
def test_teacher_conversion_reproduces_teacher_x0(family, prediction):
    """f(x_t, t) of the TrigFlow-wrapped teacher == the teacher's own x0 prediction at the equal-SNR native time and
    rescaled input (float64). VP: at a teacher index; rectified flow: at a continuous time."""
    kw = {"prediction_type": prediction} if prediction else {}
    bundle = TeacherBundle.from_pipeline(load_pipeline(tiny_pipeline_dir(family, **kw)))
    den = bundle.denoiser
    den.backbone.to(D)
    sd_ = 0.5
    net = TrigFlowNetwork(den.backbone, den.process, den.prediction, sd_, "teacher")
    g = torch.Generator().manual_seed(3)
    x_nat = torch.randn(2, *bundle.sample_shape, generator=g, dtype=D)
    cond, _ = bundle.encode_conditions(["a cat", "a dog"], "cpu")
    cond = cond.to(dtype=D)
    if family == "sd":
        native_t = torch.tensor([137, 805])
        c = den.process.coefficients(native_t, like=x_nat)
        ts = native_t
    else:
        native_t = torch.tensor([0.23, 0.81], dtype=D)
        c = den.process.coefficients(native_t, like=x_nat, derivatives=True)
        ts = den.process.num_train_timesteps * native_t
    t = trigflow_time_of(den.process, native_t, sd_)
    x_t = x_nat * torch.cos(t).reshape(-1, 1, 1, 1) / c.alpha  # x_nat = (alpha / cos t) x_t
    from stepdistill.diffusion.parameterization import to_x0_eps
    from stepdistill.models.backbones import call_backbone

    with torch.no_grad():
        out = call_backbone(den.family, den.backbone, x_nat, ts.to(D), cond)
        x0_teacher, _ = to_x0_eps(out, den.prediction, x_nat, c)
        F_out = net(x_t / sd_, t, cond)
        f = consistency_function(F_out, x_t, t, sd_)
    assert torch.allclose(f, x0_teacher, atol=1e-9, rtol=1e-9)


def test_teacher_velocity_is_the_trigflow_pf_ode_toy():
    """On the analytic toy teacher: dx/dt = sigma_d F_T, and x0 = cos t x_t - sin t dx/dt equals the teacher's guided x0
    at the snapped timestep (the PF-ODE of TrigFlow: dx/dt = (cos t x_t - x0) / sin t ... rearranged)."""
    r = _toy()
    g = torch.Generator().manual_seed(4)
    t64, idx = r.draw_times(64, g)
    assert idx is not None and torch.allclose(t64, r.grid_t[idx])
    x_t = torch.randn(64, 2, generator=g)
    labels = torch.arange(64) % 4
    cond, uncond = r.teacher.encode_conditions(labels, "cpu")
    dxdt = r.teacher_velocity(x_t, t64, idx, cond, uncond)
    c = r.process.coefficients(idx)
    x_nat = (c.alpha / torch.cos(t64)).float()[:, None] * x_t
    ref = r.teacher.denoiser.predict(x_nat, idx, cond, want="x0", cfg_scale=2.0, uncond=uncond)["x0"]
    tt = t64.float()[:, None]
    x0 = torch.cos(tt) * x_t - torch.sin(tt) * dxdt
    assert torch.allclose(x0, ref, atol=1e-4)


def test_tangent_formula_and_normalisation():
    """g at r = 1 is cos t df/dt of f = cos t x - sin t sigma_d F along the ODE (checked against autograd), and the
    normalised g has norm ||g|| / (||g|| + c)."""
    sd_ = 0.5
    g_ = torch.Generator().manual_seed(5)
    W = torch.randn(2, 2, generator=g_, dtype=D)

    def F(x, t):
        return torch.tanh(x @ W) * torch.cos(3 * t)[:, None]

    def velocity(x, t):  # an arbitrary smooth ODE dx/dt
        return torch.sin(x) + t[:, None]

    x = torch.randn(4, 2, generator=g_, dtype=D)
    t = torch.tensor([0.2, 0.6, 1.0, 1.4], dtype=D)
    dxdt = velocity(x, t)
    cs = torch.cos(t) * torch.sin(t)
    Fm, J = torch.func.jvp(F, (x / sd_, t), (cs[:, None] * dxdt / sd_, cs))
    g_raw, norm = scm_tangent(Fm, J, dxdt, x, t, sd_, 1.0, -1.0)
    # direct: d/dt f(x(t), t) along the ODE, by central differences of the flow
    h = 1e-6
    f = lambda x, t: torch.cos(t)[:, None] * x - torch.sin(t)[:, None] * sd_ * F(x / sd_, t)  # noqa: E731
    df = (f(x + h * dxdt, t + h) - f(x - h * dxdt, t - h)) / (2 * h)
    assert torch.allclose(g_raw, torch.cos(t)[:, None] * df, atol=1e-7)
    g_n, norm2 = scm_tangent(Fm, J, dxdt, x, t, sd_, 1.0, 0.1)
    assert torch.allclose(g_n.norm(dim=1), norm / (norm + 0.1)) and torch.allclose(norm, norm2)
    g_half, _ = scm_tangent(Fm, J, dxdt, x, t, sd_, 0.5, -1.0)
    assert not torch.allclose(g_half, g_raw)


def test_sampling_times_and_one_step_sampler():
    assert scm_sampling_times(1, 1.5, 1.1) == [1.5]
    assert scm_sampling_times(2, 1.5, 1.1) == [1.5, 1.1]
    assert scm_sampling_times(4, 1.6, 1.1) == pytest.approx([1.6, 1.2, 0.8, 0.4])
    with pytest.raises(ValueError, match="t_mid"):
        scm_sampling_times(2, 1.0, 1.1)
    r = _toy()
    labels = torch.arange(6) % 4
    out = r.sample(6, torch.Generator().manual_seed(7), conditions=labels, steps=1, guidance_scale=2.0)
    z = r.options.sigma_data * torch.randn(6, 2, generator=torch.Generator().manual_seed(7))
    cond, _ = r.teacher.encode_conditions(labels, "cpu")
    with torch.no_grad():
        ref = r.consistency(z, torch.full((6,), r.t_max), cond)
    assert torch.allclose(out, ref)
    with pytest.raises(ValueError, match="guidance_scale=2.0"):
        r.sample(2, torch.Generator(), conditions=labels[:2], guidance_scale=3.0)


def _train(r, batches, steps=3):
    params = [p for group in r.optimizer_params()["student"] for p in (group["params"] if isinstance(group, dict)
                                                                          else [group])]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        out = r.training_step(batches(gen), step, gen)
        loss = out.losses["student"]
        assert torch.isfinite(loss) and torch.isfinite(out.logs["g_norm"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert r.logvar.linear.weight.grad is not None and r.logvar.linear.weight.grad.abs().sum() > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, params))
    return out


def test_training_steps_toy():
    r = _toy(time_scale=100.0)
    mix = r.teacher.mixture

    def batch(g):
        x0, labels = mix.sample(64, g)
        return {"images": x0.float(), "conditions": labels}

    out = _train(r, batch, steps=5)
    assert out.logs["r"] == 1.0  # warmup of 4 steps is over
    assert r.warmup_ratio(2) == 0.5


@pytest.mark.slow
def test_training_steps_tiny_sd_and_gradients_stay_off_the_teacher(sd_bundle):
    r = SCMRecipe(sd_bundle, SCMOptions(guidance_scale=3.0, tangent_warmup=2, sample_conditions=["a cat"]), "cpu")

    def batch(g):
        return {"images": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "conditions": ["a cat", "a dog"]}

    _train(r, batch, steps=2)
    assert all(p.grad is None for p in r.teacher.denoiser.backbone.parameters())


@pytest.mark.slow
def test_export_tiny_sd_loads_in_stock_diffusers_and_matches_the_sampler(sd_bundle, tmp_path):
    from diffusers import DiffusionPipeline

    from stepdistill.testing.stock_load import load_and_sample_in_fresh_process

    r = SCMRecipe(sd_bundle, SCMOptions(sample_steps=1, sample_conditions=["a cat"]), "cpu")
    with torch.no_grad():  # make the student differ from the teacher
        for p in r.student.backbone.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    folder = r.export(tmp_path / "scm")
    summary = load_and_sample_in_fresh_process(folder, {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False and summary["finite"]
    # no guidance embedding -> the teacher's own pipeline class with the LCMScheduler, sampled without CFG
    assert summary["pipeline"] == "StableDiffusionPipeline" and summary["scheduler"] == "LCMScheduler"
    assert summary["timesteps"] == [999]
    # the stock 1-step sampler's latent equals f(x, t_max) of the recipe, up to LCMScheduler's c_skip(999) x term
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, *sd_bundle.sample_shape, generator=torch.Generator().manual_seed(9))
    stock = pipe("a cat", latents=latents.clone(), timesteps=[999], guidance_scale=1.0, output_type="latent",
                 height=32, width=32).images
    cond, _ = sd_bundle.encode_conditions(["a cat"], "cpu")
    c = r.process.coefficients(torch.tensor([999]))
    x_t = latents * (math.cos(r.t_max) / c.alpha.item())
    with torch.no_grad():
        ours = r.consistency(x_t, torch.full((1,), r.t_max), cond)
    assert torch.allclose(stock, ours, atol=2e-4), (stock - ours).abs().max()


def test_two_step_sampler_renoises_to_t_mid():
    """2 steps: x0 = f(sigma_d z1, t_max), then f(cos t_mid x0 + sin t_mid sigma_d z2, t_mid), z1 and z2 the
    generator's first and second draws (sCM Sec. 2 / SANA-Sprint's pipeline)."""
    r = _toy(time_scale=1.0)
    labels = torch.arange(6) % 4
    out = r.sample(6, torch.Generator().manual_seed(8), conditions=labels, steps=2, guidance_scale=2.0)
    g = torch.Generator().manual_seed(8)
    sd_ = r.options.sigma_data
    z1 = sd_ * torch.randn(6, 2, generator=g)
    z2 = sd_ * torch.randn(6, 2, generator=g)
    cond, _ = r.teacher.encode_conditions(labels, "cpu")
    with torch.no_grad():
        x0 = r.consistency(z1, torch.full((6,), r.t_max), cond)
        t_mid = r.options.t_mid
        ref = r.consistency(math.cos(t_mid) * x0 + math.sin(t_mid) * z2, torch.full((6,), t_mid), cond)
    assert torch.allclose(out, ref, atol=1e-6)


def test_toy_time_input_is_smooth():
    """The toy bench's sCM student takes sCM's identity time input (c_noise = t). A large time scale (the spec B.6
    pitfall) makes the time part of the tangent JVP, cos t sin t dF/dt, an order of magnitude larger at init for the
    same network; the bench's earlier c_noise = 100 t left ring8 at 4.2x the SW2 noise floor."""
    from stepdistill.benchmarks.toy2d.bench import TOY_DEFAULTS

    assert TOY_DEFAULTS["scm"]["recipe"]["time_scale"] == 1.0
    g = torch.Generator().manual_seed(11)
    x = torch.randn(256, 2, generator=g)
    t = torch.rand(256, generator=g) * 1.4 + 0.1
    cond, _ = _toy().teacher.encode_conditions(torch.arange(256) % 4, "cpu")
    sizes = {}
    for scale in (1.0, 100.0):
        torch.manual_seed(0)
        net = _toy(parameterization="trigflow", time_scale=scale).student
        with torch.no_grad():
            v_t = torch.cos(t) * torch.sin(t)
            _, jt = torch.func.jvp(lambda a, b: net(a, b, cond), (x, t), (torch.zeros_like(x), v_t))
        sizes[scale] = jt.norm(dim=1).mean().item()
    assert sizes[100.0] > 10 * sizes[1.0], sizes


def test_v_student_reads_its_output_as_v_and_reparam_stage_regresses_the_v_target(sd_bundle):
    """recipe.student_prediction = 'v' on an eps teacher: f(x_t, t) = alpha_i x_nat - sigma_i v at the native index
    (float64), the first ``reparam_steps`` updates are denoising score matching on v = alpha eps - sigma x0 (and only
    they), the tangent warmup counts from their end, and the export's scheduler is told ``v_prediction``."""
    from stepdistill.diffusion.parameterization import to_x0_eps
    from stepdistill.models.backbones import call_backbone

    r = SCMRecipe(sd_bundle, SCMOptions(student_prediction="v", reparam_steps=2, tangent_warmup=4,
                                        sample_conditions=["a cat"]), "cpu")
    assert r.student.prediction == "v" and sd_bundle.denoiser.prediction == "eps"
    assert r.warmup_ratio(1) == 0.0 and r.warmup_ratio(4) == 0.5
    net = r.student
    net.backbone.to(D)
    g = torch.Generator().manual_seed(1)
    x_nat = torch.randn(2, *sd_bundle.sample_shape, generator=g, dtype=D)
    cond, _ = sd_bundle.encode_conditions(["a cat", "a dog"], "cpu")
    cond = cond.to(dtype=D)
    idx = torch.tensor([420, 990])
    c = r.process.coefficients(idx, like=x_nat)
    t = trigflow_time_of(r.process, idx, 0.5)
    x_t = x_nat * torch.cos(t).reshape(-1, 1, 1, 1) / c.alpha
    with torch.no_grad():
        v = call_backbone(net.family, net.backbone, x_nat, idx.to(D), cond)
        f = consistency_function(net(x_t / 0.5, t, cond), x_t, t, 0.5)
    assert torch.allclose(f, c.alpha * x_nat - c.sigma * v, atol=1e-9, rtol=1e-9)
    assert torch.allclose(f, to_x0_eps(v, "v", x_nat, c)[0], atol=1e-9)
    net.backbone.to(torch.float32)

    batch = {"images": torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, "conditions": ["a cat", "a dog"]}
    out0 = r.training_step(batch, 0, torch.Generator().manual_seed(0))
    assert set(out0.logs) == {"loss_reparam"} and torch.isfinite(out0.losses["student"])
    out2 = r.training_step(batch, 2, torch.Generator().manual_seed(0))
    assert "g_norm" in out2.logs and out2.logs["r"] == 0.0  # sCD from update 2 on, warmup just starting
    # the reparam loss is the v-target regression: zero for a backbone that outputs the exact target
    x0 = r.teacher.codec.encode(batch["images"]).float()
    gen = torch.Generator().manual_seed(5)
    idx = torch.randint(0, r.process.num_train_timesteps, (2,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    cc = r.process.coefficients(idx, like=x0)
    expected = cc.alpha * eps - cc.sigma * x0
    orig = net.backbone.forward
    net.backbone.forward = lambda *a, **k: type("O", (), {"sample": expected})()
    try:
        assert r.reparam_loss(x0, cond.to(dtype=torch.float32), torch.Generator().manual_seed(5)).item() < 1e-12
    finally:
        net.backbone.forward = orig
    from stepdistill.diffusion.processes import diffusers_prediction_type

    assert diffusers_prediction_type(r.student.prediction) == "v_prediction"  # what export() writes to the scheduler


def test_student_prediction_options_are_checked(sd_bundle):
    with pytest.raises(ValueError, match="student_prediction must be"):
        SCMRecipe(sd_bundle, SCMOptions(student_prediction="velocity"), "cpu")
    with pytest.raises(ValueError, match="reparam_steps=5 fine-tunes"):
        SCMRecipe(sd_bundle, SCMOptions(reparam_steps=5), "cpu")
    with pytest.raises(ValueError, match="discrete VP"):
        _toy(student_prediction="v")
