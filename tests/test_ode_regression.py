"""Teacher ODE-pair regression (DMD Sec. 3.3; DMD2's one-step warm-start, spec B.8): the pair targets are the guided
teacher's DDIM ODE, the pool fills batch by batch and survives a checkpoint, and DMD2's warm-up trains the generator
on L_reg alone before distribution matching starts."""

import pytest
import torch

from stepdistill.benchmarks.toy2d.bench import reference_grid
from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.benchmarks.toy2d.teacher import teacher_ode_endpoint
from stepdistill.models.conditioning import Conditioning
from stepdistill.recipes.dmd2 import DMD2Options, DMD2Recipe
from stepdistill.recipes.ode_regression import ODEPairPool, regression_loss, teacher_ode_samples


def test_pair_targets_are_the_guided_teacher_ode():
    bundle = toy_teacher_bundle("ring8")
    proc = bundle.denoiser.process
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, bundle.mixture.num_classes, (64,), generator=g)
    noise = torch.randn((64, 2), generator=g)
    cond, uncond = bundle.encode_conditions(labels, "cpu")
    ours = teacher_ode_samples(bundle.denoiser, noise, cond, uncond, 2.0, 999, 1000, proc.num_train_timesteps)
    ref = teacher_ode_endpoint(bundle.mixture, lambda t: (proc.alpha(t), proc.sigma(t)), reference_grid(proc),
                               noise.double(), 2.0, labels)
    assert (ours.double() - ref).abs().max() < 1e-3
    # guidance matters: the unguided ODE ends somewhere else
    unguided = teacher_ode_samples(bundle.denoiser, noise, cond, uncond, 1.0, 999, 1000, proc.num_train_timesteps)
    assert (unguided - ours).abs().mean() > 0.05


def test_pool_fills_batch_by_batch_draws_consistent_pairs_and_round_trips():
    bundle = toy_teacher_bundle("ring8")
    proc = bundle.denoiser.process
    pool = ODEPairPool(100)
    g = torch.Generator().manual_seed(1)
    added = []
    for _ in range(3):
        labels = torch.randint(0, bundle.mixture.num_classes, (64,), generator=g)
        cond, uncond = bundle.encode_conditions(labels, "cpu")
        added.append(pool.add(bundle.denoiser, cond, uncond, 2.0, 999, 20, 1000, (2,), g))
    assert added == [64, 36, 0] and pool.full and pool.count == 100
    noise, target, cond = pool.draw(32, torch.Generator().manual_seed(2))
    again = teacher_ode_samples(bundle.denoiser, noise, cond, Conditioning(class_labels=torch.full((32,), -1)), 2.0,
                                999, 20, proc.num_train_timesteps)
    assert torch.allclose(again, target, atol=1e-5)
    state = pool.state_dict()
    back = ODEPairPool(100)
    back.load_state_dict(state)
    assert torch.equal(back.noise, pool.noise) and torch.equal(back.target, pool.target)
    assert torch.equal(back.cond.class_labels, pool.cond.class_labels)
    assert regression_loss(target, target) == 0


def test_a_partly_filled_pool_resumes_filling_and_a_larger_checkpoint_is_refused():
    bundle = toy_teacher_bundle("ring8")
    g = torch.Generator().manual_seed(3)
    labels = torch.randint(0, bundle.mixture.num_classes, (40,), generator=g)
    cond, uncond = bundle.encode_conditions(labels, "cpu")
    pool = ODEPairPool(100)
    pool.add(bundle.denoiser, cond, uncond, 2.0, 999, 10, 1000, (2,), g)
    state = pool.state_dict()
    assert state["noise"].shape[0] == 40  # only the filled rows are saved
    back = ODEPairPool(100)
    back.load_state_dict(state)
    assert back.count == 40 and not back.full
    assert torch.equal(back.target[:40], pool.target[:40])
    assert back.add(bundle.denoiser, cond, uncond, 2.0, 999, 10, 1000, (2,), g) == 40 and back.count == 80
    assert torch.equal(back.cond.class_labels[40:80], labels) and torch.equal(back.cond.class_labels[:40], labels)
    with pytest.raises(ValueError, match="regression_pairs"):
        ODEPairPool(20).load_state_dict(state)


def _toy_batch(recipe, n=64, seed=0):
    x0, labels = recipe.teacher.mixture.sample(n, torch.Generator().manual_seed(seed))
    return {"images": x0.float(), "conditions": labels}


def test_dmd2_regression_warmup_then_distribution_matching():
    opts = DMD2Options(w_real=2.0, update_ratio=2, fake_warmup_steps=1, regression_pairs=96, regression_ode_steps=10,
                       regression_warmup_steps=3, regression_weight=0.25)
    r = DMD2Recipe(toy_teacher_bundle("ring8"), opts)
    # warm-up updates 0..2 train the generator every step; then the fake warm-up (1) and ratio 2 count from 3
    assert [s for s in range(10) if r.generator_updates(s)] == [0, 1, 2, 4, 6, 8]
    out = r.training_step(_toy_batch(r), 0, torch.Generator().manual_seed(0))
    assert r.regression.pool.count == 64
    assert torch.equal(out.losses["student"], out.logs["loss_regression"])  # L_reg alone: no DM or GAN term
    assert "loss_dm" not in out.logs and "loss_gan_gen" not in out.logs
    r.training_step(_toy_batch(r, seed=1), 1, torch.Generator().manual_seed(1))
    assert r.regression.pool.full
    out = r.training_step(_toy_batch(r, seed=2), 4, torch.Generator().manual_seed(2))
    assert "loss_dm" in out.logs and "loss_regression" in out.logs
    expected = out.logs["loss_dm"] + opts.gan_weight_gen * out.logs["loss_gan_gen"] + 0.25 * out.logs["loss_regression"]
    assert torch.allclose(out.losses["student"].detach(), expected)
    # the pool is part of the checkpoint; a fresh recipe resumes with the same pairs
    state = r.state_dict_for_checkpoint()
    fresh = DMD2Recipe(toy_teacher_bundle("ring8"), DMD2Options(**{**opts.__dict__}))
    fresh.load_state_dict_from_checkpoint(state)
    assert torch.equal(fresh.regression.pool.target, r.regression.pool.target)


def test_dmd2_regression_warmup_learns_the_ode_map():
    """A few hundred L_reg-only updates bring the one-step generator close to the teacher ODE on the pairs."""
    opts = DMD2Options(w_real=2.0, regression_pairs=512, regression_ode_steps=20, regression_warmup_steps=10_000,
                       gan_weight_gen=0.0, gan_weight_disc=0.0, data_mode="prompts")
    r = DMD2Recipe(toy_teacher_bundle("ring8", hidden=64, depth=3), opts)
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    first = None
    for step in range(300):
        out = r.training_step({"conditions": torch.randint(0, 4, (256,), generator=g)}, step, g)
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
        first = first if first is not None else float(out.logs["loss_regression"])
    last = float(out.logs["loss_regression"])
    assert last < 0.2 * first, (first, last)


@pytest.mark.parametrize("kw, match", [
    ({"regression_warmup_steps": 10}, "regression_pairs"),
    ({"regression_weight": 0.25}, "regression_pairs"),
    ({"regression_pairs": -1}, ">= 0"),
    ({"regression_pairs": 10, "regression_ode_steps": 0}, "regression_ode_steps"),
])
def test_bad_regression_options_are_reported(kw, match):
    with pytest.raises(ValueError, match=match):
        DMD2Options(**kw).validate()


def test_vsd_regression_warmup_then_vsd():
    from stepdistill.recipes.vsd import VSDOptions, VSDRecipe

    opts = VSDOptions(guidance_scale=2.0, fake_score="full", fake_warmup_steps=2, regression_pairs=64,
                      regression_ode_steps=10, regression_warmup_steps=2, regression_weight=0.5)
    r = VSDRecipe(toy_teacher_bundle("ring8"), opts)
    assert [s for s in range(6) if r.student_updates(s)] == [0, 1, 4, 5]
    out = r.training_step(_toy_batch(r), 0, torch.Generator().manual_seed(0))
    assert torch.equal(out.losses["student"], out.logs["loss_regression"]) and "loss_vsd" not in out.logs
    out = r.training_step(_toy_batch(r, seed=1), 2, torch.Generator().manual_seed(1))
    assert list(out.losses) == ["fake_score"]
    out = r.training_step(_toy_batch(r, seed=2), 4, torch.Generator().manual_seed(2))
    assert torch.allclose(out.losses["student"].detach(), out.logs["loss_vsd"] + 0.5 * out.logs["loss_regression"])
    fresh = VSDRecipe(toy_teacher_bundle("ring8"), VSDOptions(**{**opts.__dict__}))
    fresh.load_state_dict_from_checkpoint(r.state_dict_for_checkpoint())
    assert torch.equal(fresh.regression.pool.noise, r.regression.pool.noise)
