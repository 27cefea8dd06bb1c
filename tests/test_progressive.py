"""Progressive distillation (spec B.1): the two-teacher-step target, the nested grids, the rounds inside one run
(each finished round's student kept and becoming the next teacher), eps/v/flow students, and stock-Diffusers export."""

import json

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_process, toy_teacher_bundle
from stepdistill.benchmarks.toy2d.mixture import load_mixture
from stepdistill.benchmarks.toy2d.teacher import AnalyticGMMDenoiserNet, guided_posterior_mean_x0
from stepdistill.diffusion.parameterization import from_x0_eps, to_x0_eps
from stepdistill.diffusion.processes import CosineVP, PathCoefficients, RectifiedFlow
from stepdistill.diffusion.solvers import ddim_step, ddim_step_from_x0
from stepdistill.models.denoiser import Denoiser
from stepdistill.models.mlp import ToyMLP
from stepdistill.models.teacher_io import TeacherBundle
from stepdistill.recipes.progressive import (PDOptions, ProgressiveRecipe, path_coefficients, pd_grid, pd_target,
                                             round_schedule, truncated_snr_weight, two_teacher_ddim_steps)

MIX = load_mixture("ring8")


def _analytic_predict64(process, labels, w):
    """The exact guided toy teacher in float64: (x, t) -> (x0, eps)."""

    def predict(x, t):
        c = path_coefficients(process, t.double() if torch.is_tensor(t) else t, x)
        x0 = guided_posterior_mean_x0(MIX, x, c.alpha, c.sigma, labels, w)
        return x0, (x - c.alpha * x0) / c.sigma

    return predict


@pytest.mark.parametrize("process", [toy_process(), CosineVP(), RectifiedFlow()], ids=lambda p: p.kind)
@pytest.mark.parametrize("kind", ["x0", "v", "eps", "flow"])
def test_target_reproduces_two_teacher_ddim_steps_float64(process, kind):
    """A student whose output is the target x~ (expressed in its own parameterization) takes ONE DDIM step from z and
    lands exactly where two teacher DDIM steps land, at every grid index, including the last step (i = 1)."""
    if kind == "flow" and not isinstance(process, RectifiedFlow):
        pytest.skip("flow outputs need a continuous-time path")
    if kind == "eps" and isinstance(process, RectifiedFlow):
        pytest.skip("alpha = 0 at s = 1: eps cannot express x0 there (spec B.1: never eps-prediction)")
    N = 8
    gen = torch.Generator().manual_seed(0)
    i = torch.arange(1, N + 1).repeat(4)
    n = i.numel()
    labels = torch.randint(0, MIX.num_classes, (n,), generator=gen)
    grid = pd_grid(process, 2 * N)
    t, t_mid, t_next = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
    x = MIX.sample(n, gen, dtype=torch.float64)[0]
    z_proto = torch.zeros(n, 2, dtype=torch.float64)
    c_t = path_coefficients(process, t, z_proto)
    z = c_t.alpha * x + c_t.sigma * torch.randn(n, 2, generator=gen, dtype=torch.float64)
    c_mid, c_next = path_coefficients(process, t_mid, z), path_coefficients(process, t_next, z)
    predict = _analytic_predict64(process, labels, 2.5)
    z_next, x_b = two_teacher_ddim_steps(predict, z, t, t_mid, c_mid, c_next)
    target = pd_target(z, z_next, x_b, c_t, c_next, i == 1)

    # the student's native output that decodes to x~ at (z, t), then one DDIM step z -> u''
    c_full = process.coefficients(t, like=z, derivatives=process.has_derivatives) if kind == "flow" else c_t
    eps_of_target = (z - c_t.alpha * target) / c_t.sigma
    native = from_x0_eps(target, eps_of_target, kind, c_full)
    x_hat, eps_hat = to_x0_eps(native, kind, z, c_full)
    one_step = ddim_step(x_hat, eps_hat, c_next)
    assert torch.allclose(one_step, z_next, atol=1e-9, rtol=1e-9), (one_step - z_next).abs().max()
    assert torch.allclose(ddim_step_from_x0(z, target, c_t, c_next), z_next, atol=1e-9, rtol=1e-9)
    last = i == 1
    assert torch.equal(target[last], x_b[last]), "i = 1: the target is the teacher's second x-prediction"
    assert torch.allclose(z_next[last], x_b[last]), "u'' = 0 is the clean end (alpha = 1, sigma = 0)"
    # the two teacher steps really are two steps (the target is not just the teacher's first x0)
    x_a, _ = predict(z, t)
    assert (target[~last] - x_a[~last]).abs().max() > 1e-4


def test_grids_are_nested_and_match_diffusers_trailing_ddim():
    from diffusers import DDIMScheduler

    process = toy_process()
    for n in (1, 2, 4, 8):
        sched = DDIMScheduler(num_train_timesteps=1000, timestep_spacing="trailing")
        sched.set_timesteps(n)
        assert pd_grid(process, n)[1:].flip(0).long().tolist() == sched.timesteps.tolist()
    for n in (2, 4, 8, 16, 32):
        fine, coarse = pd_grid(process, 2 * n), pd_grid(process, n)
        assert torch.equal(fine[2::2], coarse[1:]), "the N-step student grid is every other point of its teacher's"
    assert torch.isnan(pd_grid(RectifiedFlow(), 4)[0]) and pd_grid(RectifiedFlow(), 4)[1:].tolist() == [0.25, 0.5, 0.75, 1.0]
    assert round_schedule(64, 4) == [32, 16, 8, 4]
    with pytest.raises(ValueError, match="power of 2"):
        round_schedule(48, 4)


def test_truncated_snr_weight_is_max_of_x_and_eps_mse():
    c = PathCoefficients(torch.tensor([[0.1], [0.6], [0.99]]), torch.tensor([[0.995], [0.8], [0.141]]))
    x_err = torch.tensor([[0.3, -0.2], [0.1, 0.4], [0.05, 0.02]])
    w = truncated_snr_weight(c).flatten()
    x_mse = (x_err**2).mean(1)
    eps_mse = ((c.alpha / c.sigma) ** 2).flatten() * x_mse  # eps error = (alpha / sigma) x error at fixed z
    assert torch.allclose(w * x_mse, torch.maximum(x_mse, eps_mse))


def _toy_recipe(**kw):
    opts = dict(teacher_steps=16, final_steps=4, steps_per_round=3, guidance_scale=2.0)
    opts.update(kw)
    return ProgressiveRecipe(toy_teacher_bundle("ring8"), PDOptions(**opts))


def _batch(gen, n=64):
    x, labels = MIX.sample(n, gen)
    return {"images": x.float(), "conditions": labels}


def test_round_zero_target_uses_guided_teacher_and_loss_is_weighted_x_error():
    """Round 0's float32 target equals two hand-made DDIM steps of the CFG teacher (cond and uncond calls)."""
    r = _toy_recipe()
    gen = torch.Generator().manual_seed(3)
    x = MIX.sample(16, gen)[0].float()
    labels = torch.randint(0, 4, (16,), generator=gen)
    cond, uncond = r.teacher.encode_conditions(labels, "cpu")
    grid = pd_grid(r.process, 16)
    i = torch.randint(1, 9, (16,), generator=gen)
    t, tm, tn = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
    c_t = path_coefficients(r.process, t, x)
    z = c_t.alpha * x + c_t.sigma * torch.randn(16, 2, generator=gen)
    c_m, c_n = path_coefficients(r.process, tm, z), path_coefficients(r.process, tn, z)
    den = r.teacher.denoiser

    def by_hand(zz, tt):
        xc = den.predict(zz, tt, cond, want="x0")["x0"]
        xu = den.predict(zz, tt, uncond, want="x0")["x0"]
        xg = xu + 2.0 * (xc - xu)
        cc = path_coefficients(r.process, tt.double(), zz)
        return xg, (zz - cc.alpha * xg) / cc.sigma

    z2, xb = two_teacher_ddim_steps(by_hand, z, t.long(), tm.long(), c_m, c_n)
    expected = pd_target(z, z2, xb, c_t, c_n, i == 1)
    z2r, xbr = two_teacher_ddim_steps(r.teacher_predict(cond, uncond, None), z, t.long(), tm.long(), c_m, c_n)
    got = pd_target(z, z2r, xbr, c_t, c_n, i == 1)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4)


def test_rounds_snapshot_students_which_become_teachers_and_survive_checkpoints():
    r = _toy_recipe()
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=1e-2)
    for step in range(7):  # rounds: [0, 3) -> 8 steps, [3, 6) -> 4 steps... capped at the last round
        out = r.training_step(_batch(gen), step, gen)
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
        if step == 2:
            before_switch = r._snapshot()
    assert [s.steps for s in r.stages] == [8, 4] and r.stage == 1 and r.current_steps() == 4
    assert set(r.sampleable_steps()) == {8, 4}
    # the kept 8-step student is exactly the weights at the end of round 0, and it is round 1's (frozen) teacher
    assert all(torch.equal(before_switch[k], v) for k, v in r.snapshots[0].items())
    teacher_state = r.round_teacher.backbone.state_dict()
    assert all(torch.equal(teacher_state[k], v) for k, v in before_switch.items())
    assert not any(p.requires_grad for p in r.round_teacher.backbone.parameters())
    assert not torch.equal(r._snapshot()["net.0.weight"], before_switch["net.0.weight"]), "round 1 keeps training"
    # sampling by step count uses that round's student; the trained weights are restored afterwards
    labels = torch.zeros(32, dtype=torch.long)
    s8 = r.sample(32, torch.Generator().manual_seed(1), conditions=labels, steps=8)
    now = r._snapshot()
    r2 = _toy_recipe()
    r2.load_state_dict_from_checkpoint(r.state_dict_for_checkpoint())
    assert r2.stage == 1 and all(torch.equal(now[k], v) for k, v in r2._snapshot().items())
    assert torch.equal(r2.sample(32, torch.Generator().manual_seed(1), conditions=labels, steps=8), s8)
    z = torch.randn(5, 2)
    tt = torch.full((5,), 499)
    assert torch.equal(r2.round_teacher.predict(z, tt, r2.teacher.encode_conditions(labels[:5], "cpu")[0])["x0"],
                       r.round_teacher.predict(z, tt, r.teacher.encode_conditions(labels[:5], "cpu")[0])["x0"])
    with pytest.raises(ValueError, match="guidance_scale=2.0 baked in"):
        r.sample(4, torch.Generator().manual_seed(0), conditions=labels[:4], guidance_scale=5.0)


def test_flow_teacher_on_rectified_flow_trains_a_flow_student():
    """Rectified-flow teacher (exact toy x0 on x_s = (1 - s) x0 + s eps): PD trains a flow-predicting student."""
    teacher = Denoiser(AnalyticGMMDenoiserNet(MIX), RectifiedFlow(), "x0", family="analytic")
    bundle = TeacherBundle(teacher, (2,), {"_class_name": "FlowMatchEulerDiscreteScheduler"},
                           make_student=lambda: ToyMLP(num_classes=MIX.num_classes, hidden=64, depth=2),
                           student_prediction="flow")
    r = ProgressiveRecipe(bundle, PDOptions(teacher_steps=8, final_steps=4, steps_per_round=100, guidance_scale=1.5))
    assert r.student.prediction == "flow"
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=3e-3)
    losses = []
    for step in range(50):
        out = r.training_step(_batch(gen, 128), step, gen)
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
        losses.append(out.losses["student"].item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[40:50]) < 0.5 * sum(losses[:10]), losses  # round 0 (8 steps) learns
    pts = r.sample(64, torch.Generator().manual_seed(0), conditions=torch.zeros(64, dtype=torch.long), steps=4)
    assert pts.shape == (64, 2) and torch.isfinite(pts).all()


@pytest.mark.slow
def test_eps_teacher_student_starts_equal_to_teacher_and_exports_to_stock_diffusers(tmp_path):
    """tiny SD (eps): round 0's student is a copy of the teacher; the 4-step export samples in stock Diffusers with
    the trailing DDIM grid {999, 749, 499, 249}, one UNet call per step."""
    from stepdistill.models.teacher_io import load_pipeline
    from stepdistill.testing.stock_load import load_and_sample_in_fresh_process
    from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

    bundle = TeacherBundle.from_pipeline(load_pipeline(tiny_pipeline_dir("sd")))
    r = ProgressiveRecipe(bundle, PDOptions(teacher_steps=16, final_steps=4, steps_per_round=1, guidance_scale=3.0,
                                            sample_conditions=["a cat"]))
    assert r.student.prediction == "eps"
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, *bundle.sample_shape, generator=gen)
    cond, _ = bundle.encode_conditions(["a cat", "a dog"], "cpu")
    with torch.no_grad():
        s = r.student.predict(z, torch.tensor([999, 249]), cond, want="x0")["x0"]
        te = bundle.denoiser.predict(z, torch.tensor([999, 249]), cond, want="x0")["x0"]
    assert torch.allclose(s, te, atol=1e-5)
    batch = {"images": torch.rand(2, 3, 32, 32, generator=gen) * 2 - 1, "conditions": ["a cat", "a dog"]}
    for step in range(2):
        out = r.training_step(batch, step, gen)
        out.losses["student"].backward()
    assert r.current_steps() == 4 and r.round_teacher is not None
    assert all(p.grad is None for p in bundle.denoiser.backbone.parameters())
    folder = r.export(tmp_path / "pd")
    summary = load_and_sample_in_fresh_process(folder, {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False and summary["finite"]
    assert summary["pipeline"] == "StableDiffusionPipeline" and summary["scheduler"] == "DDIMScheduler"
    assert summary["timesteps"] == [999, 749, 499, 249], summary
    # CFG at w = 3 is baked into the weights: the export must tell the pipeline not to apply it again (one UNet call
    # per step, not a doubled CFG batch), and it names its teacher for `stepdistill eval`
    spec = json.loads((folder / "stepdistill_sampling.json").read_text())
    assert spec["guidance_scale"] == 1.0 and spec["extra"]["distilled_guidance_scale"] == 3.0
    assert spec["extra"]["teacher"] and "guidance_scale=1.0" in spec["notes"]
