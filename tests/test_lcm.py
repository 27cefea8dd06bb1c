"""LCM / LCM-LoRA: boundary condition, solver grid, target construction, init equality, and stock-Diffusers export."""

import pytest
import torch

from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.lcm import (LCMOptions, LCMRecipe, lcm_boundary_scalings, lcm_solver_grid,
                                    original_steps_starting_at)
from stepdistill.testing.stock_load import load_and_sample_in_fresh_process
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir


def test_solver_grid_and_boundary_condition():
    grid = lcm_solver_grid(1000, 50)
    assert grid[0] == 19 and grid[-1] == 999 and len(grid) == 50
    c_skip, c_out = lcm_boundary_scalings(torch.tensor([0, 19, 999]))
    assert c_skip[0] == 1.0 and c_out[0] == 0.0  # f(z, 0) = z exactly
    assert abs(c_skip[1].item() - 0.25 / (190.0**2 + 0.25)) < 1e-9  # spec B.3: c_skip(19) ~ 7e-6
    with pytest.raises(ValueError, match="must divide"):
        lcm_solver_grid(1000, 30)


def test_lcm_matches_stock_lcmscheduler_scalings():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in (0, 19, 259, 999):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        ours = lcm_boundary_scalings(torch.tensor([t]))
        assert abs(ours[0].item() - float(c_skip)) < 1e-7 and abs(ours[1].item() - float(c_out)) < 1e-7


@pytest.fixture(scope="module")
def sd_dir():
    return tiny_pipeline_dir("sd")


def _recipe(sd_dir, variant, **kw):
    pipe = load_pipeline(sd_dir)
    return LCMRecipe(TeacherBundle.from_pipeline(pipe), LCMOptions(variant=variant, lora_rank=4, lora_alpha=4,
                                                                    sample_conditions=["a cat"], **kw))


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_student_equals_teacher_at_init_and_boundary(sd_dir, variant):
    r = _recipe(sd_dir, variant)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, *r.teacher.sample_shape, generator=gen)
    cond, _ = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    t = torch.tensor([499, 19])
    omega = torch.tensor([6.0, 6.0]) if r.embeds_guidance else None
    with torch.no_grad():
        s = r.student.predict(z, t, cond, want="x0", guidance_input=omega)["x0"]
        with r._teacher_ctx():
            te = r.teacher.denoiser.predict(z, t, cond, want="x0")["x0"]
        assert torch.allclose(s, te, atol=1e-5), "zero-init guidance embedding / LoRA B=0 must leave the output unchanged"
        f0 = r.consistency(r.student, z, torch.tensor([0, 0]), cond, omega)
    assert torch.equal(f0, z.float()), "boundary condition f(z, 0) = z"


def test_training_target_is_teacher_ddim_step_then_target_network(sd_dir):
    """Recompute one step's target by hand: CFG (LCM convention) on x0 and eps, DDIM to t0, target f at t0."""
    r = _recipe(sd_dir, "full", omega=4.0)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, *r.teacher.sample_shape, generator=gen)
    cond, uncond = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    t1, t0 = torch.tensor([519, 19]), torch.tensor([499, 0])
    z1 = r.process.add_noise(x0, torch.randn_like(x0), t1)
    with torch.no_grad():
        den = r.teacher.denoiser
        c = den.predict(z1, t1, cond, want=("x0", "eps"))
        u = den.predict(z1, t1, uncond, want=("x0", "eps"))
        xg, eg = 5 * c["x0"] - 4 * u["x0"], 5 * c["eps"] - 4 * u["eps"]
        co = r.process.coefficients(t0, like=xg)
        z0 = co.alpha * xg + co.sigma * eg
        batched = den.predict(z1, t1, cond, want=("x0", "eps"), cfg_scale=torch.tensor([4.0, 4.0]), uncond=uncond,
                              convention="lcm")
    assert torch.allclose(batched["x0"], xg, atol=1e-4) and torch.allclose(batched["eps"], eg, atol=1e-4)
    assert torch.allclose(z0[1], xg[1] * co.alpha[1] + co.sigma[1] * eg[1])
    # at t0 = 0 the target is z0 itself (boundary), at t0 = 499 it is the target network's f
    tgt = r.consistency(r.target_denoiser, z0, t0, cond, torch.tensor([4.0, 4.0]))
    assert torch.equal(tgt[1], z0[1])


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_gradients_reach_only_the_student(sd_dir, variant):
    r = _recipe(sd_dir, variant)
    batch = {"images": torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "conditions": ["a cat", "a dog"]}
    out = r.training_step(batch, 0, torch.Generator().manual_seed(0))
    out.losses["student"].backward()
    trainable = r.optimizer_params()["student"]
    assert trainable and all(p.grad is not None for p in trainable)
    if variant == "lora":
        assert all("lora_" in n for n, p in r.student.backbone.named_parameters() if p.requires_grad)
    else:
        assert all(p.grad is None for p in r.teacher.denoiser.backbone.parameters())
        assert all(p.grad is None and not p.requires_grad for p in r.target.parameters())
        before = [p.detach().clone() for p in r.target.parameters()]
        with torch.no_grad():
            for p in trainable:
                p.add_(1.0)
        r.after_optimizer_step("student", 0)  # target <- 0.95 target + 0.05 student
        after = list(r.target.parameters())
        assert torch.allclose(after[0], before[0] + 0.05, atol=1e-5)


@pytest.mark.parametrize("variant", ["full", "lora"])
def test_export_loads_and_samples_in_stock_diffusers(sd_dir, variant, tmp_path):
    r = _recipe(sd_dir, variant)
    out = r.export(tmp_path / variant)
    summary = load_and_sample_in_fresh_process(out, {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False
    assert summary["scheduler"] == "LCMScheduler"
    assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]
    assert summary["timesteps"] == [999, 759, 499, 259], summary  # 4 LCM steps, one forward each (no CFG pass)
    if variant == "full":
        assert summary["pipeline"] == "LatentConsistencyModelPipeline"
    else:
        assert summary["lora"], "the LoRA adapter must be loaded by load_lora_weights"


@pytest.mark.parametrize("start", [500, 700, 999])
def test_original_steps_starting_at_makes_every_step_count_start_there(start):
    from diffusers import LCMScheduler

    o = original_steps_starting_at(1000, start)
    sched = LCMScheduler(num_train_timesteps=1000, original_inference_steps=o)
    for n in (1, 2, 4, 8):
        sched.set_timesteps(n)
        ts = [int(t) for t in sched.timesteps]
        assert ts[0] == start and len(ts) == n and ts == sorted(ts, reverse=True), (n, ts)


def test_unreachable_sample_start_is_refused_before_training(sd_dir):
    with pytest.raises(ValueError, match="nearest reachable starts"):
        original_steps_starting_at(1000, 300)
    with pytest.raises(ValueError, match="sample_max_timestep"):
        _recipe(sd_dir, "full", sample_max_timestep=300)
    with pytest.raises(ValueError, match=r"\[1, 999\]"):
        _recipe(sd_dir, "full", sample_max_timestep=1000)


def test_export_with_a_lower_sample_start_reproduces_it_in_stock_diffusers(sd_dir, tmp_path):
    r = _recipe(sd_dir, "full", sample_max_timestep=700)
    out = r.export(tmp_path / "start700")
    summary = load_and_sample_in_fresh_process(out, {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False
    assert summary["timesteps"] == [700, 525, 350, 175], summary  # the recipe's 4 steps from 700
    from stepdistill.export import read_sampling_spec

    spec = read_sampling_spec(out)
    assert spec.extra["timesteps_by_steps"]["2"] == [700, 350] and "sample_max_timestep" in spec.notes
