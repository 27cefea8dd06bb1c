"""DMD2 (spec B.8): the DM gradient and its normalisation, exact zero when fake == real, LoRA fake score at init,
two-time-scale schedule, backward simulation, GAN head on the fake score's bottleneck, and stock-Diffusers export
of 1-step and 4-step students (fresh process)."""

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.config import config_from_dict
from stepdistill.models.backbones import unwrap
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.dmd2 import DMD2Options, DMD2Recipe, renoise_rollout
from stepdistill.recipes.score_distill import dm_gradient, surrogate_loss
from stepdistill.testing.stock_load import load_and_sample_in_fresh_process
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir


@pytest.fixture(scope="module")
def sd_dir():
    return tiny_pipeline_dir("sd")


def _sd_recipe(sd_dir, **kw):
    kw.setdefault("sample_conditions", ["a cat"])
    kw.setdefault("fake_lora_rank", 4)
    kw.setdefault("fake_lora_alpha", 4.0)
    return DMD2Recipe(TeacherBundle.from_pipeline(load_pipeline(sd_dir)), DMD2Options(**kw))


def test_dm_gradient_normalisation_and_surrogate_gradient():
    g = torch.Generator().manual_seed(0)
    x, real, fake = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    grad = dm_gradient(x, real, fake)
    assert grad.dtype == torch.float64
    norm = (x - real).abs().double().mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(grad, (fake - real).double() / norm)
    x.requires_grad_(True)
    surrogate_loss(x, grad).backward()
    assert torch.allclose(x.grad.double(), grad / x.numel(), atol=1e-7)  # d/dx 1/2 mean((x - sg(x - g))^2) = g / N
    # x0_gen == x0_real makes the normaliser 0: nan_to_num keeps the gradient finite
    assert torch.isfinite(dm_gradient(real, real, fake)).all()


@pytest.mark.parametrize("fake_score", ["full", "lora"])
def test_dm_gradient_is_exactly_zero_when_fake_equals_real(sd_dir, fake_score):
    r = _sd_recipe(sd_dir, w_real=1.0, fake_score=fake_score, gan_weight_gen=0.0, gan_weight_disc=0.0)
    cond, uncond = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    x0 = torch.randn(2, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, logs = r.dm_loss(x0, cond, uncond, torch.Generator().manual_seed(1))
    assert logs["dm/real_fake_gap"] == 0 and logs["dm/grad_abs_mean"] == 0
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(x0.grad) == 0


def test_dm_gradient_is_nonzero_with_guidance(sd_dir):
    r = _sd_recipe(sd_dir, w_real=3.0, gan_weight_gen=0.0, gan_weight_disc=0.0)
    cond, uncond = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    x0 = torch.randn(2, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    _, logs = r.dm_loss(x0, cond, uncond, torch.Generator().manual_seed(1))
    assert logs["dm/grad_abs_mean"] > 0


def test_lora_fake_score_equals_teacher_at_init_and_only_lora_trains(sd_dir):
    r = _sd_recipe(sd_dir, fake_score="lora", gan_weight_gen=0.0, gan_weight_disc=0.0)
    assert r.fake.denoiser.backbone is r.teacher.denoiser.backbone  # one backbone in memory
    assert not any("lora_" in n for n, _ in unwrap(r.student.backbone).named_parameters())  # generator: plain copy
    cond, _ = r.teacher.encode_conditions(["a cat"], "cpu")
    x = torch.randn(1, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    with torch.no_grad():
        fake = r.fake.denoiser.predict(x, t, cond, want="eps")["eps"]
        with r.fake.teacher_context():
            real = r.teacher.denoiser.predict(x, t, cond, want="eps")["eps"]
    assert torch.equal(fake, real)
    params = r.optimizer_params()["fake_score"]
    names = {id(p): n for n, p in unwrap(r.fake.denoiser.backbone).named_parameters()}
    assert params and all("lora_" in names[id(p)] for p in params)
    assert set(r.fake.state_dict()) and all("lora_" in k for k in r.fake.state_dict())


def test_two_time_scale_schedule_and_losses():
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, update_ratio=5, fake_warmup_steps=2))
    assert [s for s in range(20) if r.generator_updates(s)] == [2, 7, 12, 17]
    mix = r.teacher.mixture
    x0, labels = mix.sample(64, torch.Generator().manual_seed(0))
    batch = {"images": x0.float(), "conditions": labels}
    out = r.training_step(batch, 3, torch.Generator().manual_seed(0))
    assert list(out.losses) == ["fake_score"] and not out.losses["fake_score"].grad_fn is None
    out = r.training_step(batch, 7, torch.Generator().manual_seed(0))
    assert list(out.losses) == ["student", "fake_score"]
    for key in ("sample/mean", "sample/std", "loss_dm", "loss_gan_gen", "loss_gan_disc", "loss_fake_denoise"):
        assert key in out.logs
    # the fake-score loss must not reach the generator; the generator loss must reach it
    student = r.optimizer_params()["student"]
    grads = torch.autograd.grad(out.losses["fake_score"], student, allow_unused=True)
    assert all(g is None for g in grads)
    grads = torch.autograd.grad(out.losses["student"], student, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_dm_timestep_range_and_annealing():
    """U{floor(0.02 T) .. floor(dm_t_max T)}; from dm_t_anneal_step on the upper end is dm_t_max_late, and every DM
    timestep drawn then lies in the late range."""
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, gan_weight_gen=0.0, gan_weight_disc=0.0))
    assert r.dm_t_range() == (20, 980) and r.dm_t_range(10**6) == (20, 980)
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, dm_t_max_late=0.35, dm_t_anneal_step=100,
                                                            gan_weight_gen=0.0, gan_weight_disc=0.0))
    assert r.dm_t_range(None) == (20, 980) and r.dm_t_range(99) == (20, 980) and r.dm_t_range(100) == (20, 350)
    seen = []
    orig = r.process.add_noise
    r.process.add_noise = lambda x0, noise, t: seen.append(t.clone()) or orig(x0, noise, t)
    cond, uncond = r.teacher.encode_conditions(torch.arange(256) % 4, "cpu")
    r.dm_loss(torch.randn(256, 2), cond, uncond, torch.Generator().manual_seed(0), step=100)
    assert 20 <= seen[0].min() and seen[0].max() <= 350 and seen[0].max() > 300
    with pytest.raises(ValueError, match="dm_t_max_late"):
        DMD2Options(dm_t_max_late=0.01).validate()


def test_guided_real_x0_at_high_noise_overshoots_the_class():
    """Why the toy2d DMD2 bench restricts the DM range (bench.TOY_DEFAULTS): at high t the CFG real x0 is
    ~ x0_u + w (x0_c - x0_u), for ring8 about w times the class centroid, far outside the data ring of radius 2;
    with the full range the DM fixed point moves the generator's modes outward."""
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, gan_weight_gen=0.0, gan_weight_disc=0.0))
    cond, uncond = r.teacher.encode_conditions(torch.zeros(512, dtype=torch.long), "cpu")
    t = torch.full((512,), 950)
    x_t = r.process.add_noise(torch.zeros(512, 2), torch.randn(512, 2, generator=torch.Generator().manual_seed(0)), t)
    from stepdistill.recipes.score_distill import guided_predict
    x0_c = guided_predict(r.teacher.denoiser, x_t, t, cond, uncond, 1.0, "x0")["x0"]
    x0_g = guided_predict(r.teacher.denoiser, x_t, t, cond, uncond, 2.0, "x0")["x0"]
    assert 1.5 < x0_c.norm(dim=1).mean() < 2.0  # the class-0 centroid (two modes 45 degrees apart on radius 2)
    assert x0_g.norm(dim=1).mean() > 3.0


def test_backward_simulation_on_the_grid():
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, timesteps=[999, 749, 499, 249]))
    ks = {r._simulation_index(s) for s in range(64)}
    assert ks == {0, 1, 2, 3}
    assert r._simulation_index(5) == r._simulation_index(5)  # a function of the step: the same on every rank
    step = next(s for s in range(64) if r._simulation_index(s) == 2)
    cond, _ = r.teacher.encode_conditions(torch.tensor([0, 1, 2, 3]), "cpu")
    x, t = r.generator_input(4, cond, step, torch.Generator().manual_seed(3))
    assert t.tolist() == [499] * 4
    g = torch.Generator().manual_seed(3)  # redo by hand: noise -> G at 999 -> re-noise to 749 -> G -> re-noise to 499
    z = torch.randn(4, 2, generator=g)
    with torch.no_grad():
        for t_now, t_next in ((999, 749), (749, 499)):
            x0 = r.student.predict(z, torch.full((4,), t_now), cond, want="x0")["x0"]
            z = r.process.add_noise(x0, torch.randn(4, 2, generator=g), torch.full((4,), t_next))
    assert torch.allclose(x, z)
    assert torch.equal(renoise_rollout(r.student, z, [249], cond, g), z)


def test_unrolled_simulation_trains_the_final_output_through_the_rollout():
    grid = [999, 749, 499, 249]
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, timesteps=grid, simulation="unrolled"))
    assert {r._simulation_index(s) for s in range(64)} == {3}
    cond, _ = r.teacher.encode_conditions(torch.tensor([0, 1, 2, 3]), "cpu")
    x, t = r.generator_input(4, cond, 0, torch.Generator().manual_seed(3), keep_graph=True)
    x_ng, _ = r.generator_input(4, cond, 0, torch.Generator().manual_seed(3), keep_graph=False)
    assert t.tolist() == [249] * 4 and x.grad_fn is not None and x_ng.grad_fn is None
    assert torch.allclose(x, x_ng)
    # the final output's loss reaches the generator through the state at 249 (the rollout's first three calls)
    first = r.optimizer_params()["student"][0]
    g_state = torch.autograd.grad(x.pow(2).sum(), first)[0]
    assert g_state.abs().sum() > 0
    # random_step (the paper's rule) never keeps the rollout's graph
    r2 = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0, timesteps=grid))
    step = next(s for s in range(64) if r2._simulation_index(s) == 3)
    x2, _ = r2.generator_input(4, cond, step, torch.Generator().manual_seed(3), keep_graph=True)
    assert x2.grad_fn is None
    with pytest.raises(ValueError, match="recipe.simulation"):
        DMD2Options(simulation="full").validate()


def test_gan_head_reads_the_fake_mid_block_and_stops_there(sd_dir):
    r = _sd_recipe(sd_dir, w_real=2.0, data_mode="real")
    fake = unwrap(r.fake.denoiser.backbone)
    cond, _ = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    x0 = torch.randn(2, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    logit = r._logit(x0, cond, torch.Generator().manual_seed(0))
    assert logit.shape == (2,)
    logit.sum().backward()
    assert x0.grad is not None and x0.grad.abs().sum() > 0
    assert fake.down_blocks[0].resnets[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in fake.up_blocks.parameters()), "the classify forward stops at the mid-block"
    assert all(p.grad is not None for p in r.head.parameters())
    assert all(p.grad is None for p in r.teacher.denoiser.backbone.parameters())


def test_bad_options_are_reported(sd_dir):
    with pytest.raises(ValueError, match="data_mode=prompts has no real images"):
        DMD2Options(data_mode="prompts").validate()
    with pytest.raises(ValueError, match="strictly decreasing"):
        DMD2Options(timesteps=[249, 999]).validate()
    with pytest.raises(ValueError, match="needs a Diffusers teacher"):
        DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(fake_score="lora"))
    r = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(w_real=2.0))
    with pytest.raises(ValueError, match="distilled at w_real=2.0"):
        r.sample(4, torch.Generator(), conditions=torch.tensor([0, 1, 2, 3]), guidance_scale=3.0)


@pytest.mark.slow
@pytest.mark.parametrize("config, timesteps, lora", [("tiny-sd.yaml", [999], False),
                                                      ("tiny-sd-4step.yaml", [999, 749, 499, 249], True)])
def test_train_export_and_load_in_stock_diffusers(config, timesteps, lora, tmp_path):
    import yaml

    from stepdistill.runner import run_training

    raw = yaml.safe_load(open(f"recipes/dmd2/{config}"))
    raw["run"]["output_dir"] = str(tmp_path / "run")
    run_dir = run_training(config_from_dict(raw, source=config))
    assert (run_dir / "checkpoints" / "step-0000004" / "manifest.json").is_file()
    summary = load_and_sample_in_fresh_process(run_dir / "export", {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False and summary["scheduler"] == "LCMScheduler"
    assert summary["timesteps"] == timesteps, summary  # one student evaluation per grid time, no CFG batch
    assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]
