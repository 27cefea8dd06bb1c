"""MLCM (spec B.4): segment schedule, the multistep consistency target, teacher-trajectory states, short training runs
on toy2d and the tiny SD pipeline, and the export sampled by stock Diffusers at the segment boundaries."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.diffusion.solvers import ddim_step, ddim_step_from_x0
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.lcm import lcm_solver_grid
from stepdistill.recipes.mlcm import MLCMOptions, MLCMRecipe, mlcm_fine_grid, multistep_consistency, \
    segment_boundaries, segment_lower_boundary, stage_index
from stepdistill.testing.stock_load import load_and_sample_in_fresh_process
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

REPO = Path(__file__).resolve().parents[1]


def test_segment_boundaries_at_each_stage_are_nested():
    b = {m: segment_boundaries(1000, m).tolist() for m in (8, 4, 2, 1)}
    assert b[8] == [999, 874, 749, 624, 499, 374, 249, 124, 0]  # spec B.4 (TLCM inference boundaries)
    assert b[4] == [999, 749, 499, 249, 0]
    assert b[2] == [999, 499, 0]
    assert b[1] == [999, 0]
    assert set(b[4]) <= set(b[8]) and set(b[2]) <= set(b[4]) and set(b[1]) <= set(b[2])
    grid = mlcm_fine_grid(1000, 50, [8, 4, 2, 1])
    assert set(lcm_solver_grid(1000, 50).tolist()) <= set(grid.tolist()) and set(b[8]) <= set(grid.tolist())
    assert grid[0] == 999 and grid[-1] == 0 and torch.all(grid[:-1] > grid[1:])
    # the progressive stages: 8 segments for the first 10 updates, then 4, 2, and 1 from update 30 on
    assert [stage_index(k, [10, 10, 10]) for k in (0, 9, 10, 19, 20, 29, 30, 10_000)] == [0, 0, 1, 1, 2, 2, 3, 3]


def test_segment_lower_boundary_never_lets_a_teacher_step_cross_a_boundary():
    b8 = segment_boundaries(1000, 8)
    t = torch.tensor([999, 979, 875, 874, 873, 500, 499, 125, 124, 19])
    assert segment_lower_boundary(t, b8).tolist() == [874, 874, 874, 749, 749, 499, 374, 124, 0, 0]
    assert segment_lower_boundary(t, segment_boundaries(1000, 1)).tolist() == [0] * len(t)
    grid = mlcm_fine_grid(1000, 50, [8, 4, 2, 1])
    for m in (8, 4, 2, 1):
        s = segment_lower_boundary(grid[:-1], segment_boundaries(1000, m))
        assert torch.all(grid[1:] >= s), "the next fine-grid point t' must stay inside the segment (t' >= s)"
    with pytest.raises(ValueError, match="t > 0"):
        segment_lower_boundary(torch.tensor([0]), b8)


def test_bad_schedules_are_clear_errors():
    bundle = toy_teacher_bundle("ring8")
    with pytest.raises(ValueError, match="divid"):
        MLCMRecipe(bundle, MLCMOptions(segment_schedule=[8, 3], stage_steps=[5]))
    with pytest.raises(ValueError, match="stage_steps"):
        MLCMRecipe(bundle, MLCMOptions(segment_schedule=[8, 4, 1], stage_steps=[5]))
    with pytest.raises(ValueError, match="loss_space"):
        MLCMRecipe(bundle, MLCMOptions(loss_space="v"))
    with pytest.raises(ValueError, match="must divide the teacher's 1000"):
        MLCMRecipe(bundle, MLCMOptions(segment_schedule=[6, 3, 1], stage_steps=[5, 5]))


def _toy_recipe(**kw):
    opts = dict(omega_min=0.0, omega_max=2.0, loss="l2", segment_schedule=[8, 4, 2, 1], stage_steps=[10, 10, 10],
                bank_size=16)
    opts.update(kw)
    return MLCMRecipe(toy_teacher_bundle("ring8"), MLCMOptions(**opts))


def test_multistep_consistency_is_identity_at_the_boundary_and_target_maps_to_segment_start():
    r = _toy_recipe()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 2, generator=g)
    x0 = torch.randn(4, 2, generator=g) * 5  # any x0 prediction: f_s(z, s) = z regardless
    for t in (874, 499, 19):
        c = r.process.coefficients(torch.full((4,), t), like=z)
        assert torch.allclose(multistep_consistency(z, x0, c, c), z, atol=1e-6)
    cond = r.teacher.encode_conditions(torch.tensor([0, 1, 2, 3]), "cpu")[0]
    emb = torch.ones(4)
    # t' = s: the target is the teacher state itself (no student evaluation); t' > s: the target network's DDIM hop
    t_next, s = torch.tensor([874, 979, 19, 39]), torch.tensor([874, 874, 0, 0])
    with torch.no_grad():
        tgt = r.boundary_target(z, t_next, s, cond, emb)
        assert torch.equal(tgt[0], z[0])
        for i in (1, 3):
            f = r.consistency(r.target_denoiser, z[i:i + 1], t_next[i:i + 1], cond.index(slice(i, i + 1)), emb[:1])
            ct = r.process.coefficients(t_next[i:i + 1], like=f)
            cs = r.process.coefficients(s[i:i + 1], like=f)
            assert torch.allclose(tgt[i], ddim_step_from_x0(z[i:i + 1], f, ct, cs)[0], atol=1e-6)
        assert not torch.allclose(tgt[1], z[1])


def test_training_states_are_the_guided_teacher_trajectory():
    r = _toy_recipe(bank_refresh_every=3)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    batch = {"images": torch.zeros(8, 2), "conditions": labels}
    bank = r._bank_for(batch, 0, torch.Generator().manual_seed(0))
    assert bank.states.shape == (16, len(r.fine_grid), 2)
    assert torch.equal(bank.cond.class_labels, labels.repeat(2))  # conditions cycled from the batch
    cond, uncond = r.teacher.encode_conditions(bank.cond.class_labels, "cpu")
    j = 7  # one teacher CFG DDIM step (LCM convention, per-trajectory omega) between consecutive fine-grid points
    t, t_next = r.fine_grid[j], r.fine_grid[j + 1]
    den = r.teacher.denoiser
    c = den.predict(bank.states[:, j], t.expand(16), cond, want=("x0", "eps"))
    u = den.predict(bank.states[:, j], t.expand(16), uncond, want=("x0", "eps"))
    w = bank.omega[:, None]
    x0g, epsg = (1 + w) * c["x0"] - w * u["x0"], (1 + w) * c["eps"] - w * u["eps"]
    expect = ddim_step(x0g, epsg, r.process.coefficients(t_next.expand(16), like=x0g))
    assert torch.allclose(bank.states[:, j + 1], expect, atol=1e-5)
    assert bank.omega.min() >= 0 and bank.omega.max() <= 2 and bank.omega.std() > 0  # omega drawn per trajectory
    # the bank is rebuilt only every bank_refresh_every updates, and survives a checkpoint round trip
    assert r._bank_for(batch, 2, torch.Generator().manual_seed(5)) is bank
    assert r._bank_for(batch, 3, torch.Generator().manual_seed(5)) is not bank
    state = r.state_dict_for_checkpoint()
    r2 = _toy_recipe(bank_refresh_every=3)
    r2.load_state_dict_from_checkpoint(state)
    assert torch.equal(r2.bank.states, r.bank.states) and r2.bank.built_at == 3
    assert torch.equal(r2.bank.cond.class_labels, r.bank.cond.class_labels)
    assert r2._bank_for(batch, 4, torch.Generator()) is r2.bank


def test_short_toy2d_run_lowers_the_loss_through_every_stage(one_thread):
    torch.manual_seed(0)
    r = _toy_recipe(bank_size=128, bank_refresh_every=4, stage_steps=[40, 40, 40])
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=1e-3)
    mix = r.teacher.mixture
    losses, segments = [], []
    for step in range(160):
        x0, labels = mix.sample(128, torch.Generator().manual_seed(step))
        out = r.training_step({"images": x0.float(), "conditions": labels}, step, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
        r.after_optimizer_step("student", step)
        losses.append(out.losses["student"].item())
        segments.append(out.logs["segments"])
    assert segments[0] == 8 and segments[45] == 4 and segments[85] == 2 and segments[-1] == 1
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, (first, last)
    # one student samples at 1, 2, 4 and 8 steps, one network evaluation per step at the segment boundaries
    assert r.sampling_timesteps(2) == [999, 499] and r.sampling_timesteps(4) == [999, 749, 499, 249]
    assert r.sampling_timesteps(8) == segment_boundaries(1000, 8).tolist()[:-1]
    x = r.sample(64, torch.Generator().manual_seed(0), conditions=torch.zeros(64, dtype=torch.long), steps=4,
                 guidance_scale=2.0)
    assert x.shape == (64, 2) and torch.isfinite(x).all()


@pytest.fixture(scope="module")
def sd_dir():
    return tiny_pipeline_dir("sd")


def test_tiny_sd_training_step_reaches_only_the_student(sd_dir):
    pipe = load_pipeline(sd_dir)
    # a coarse fine grid (N = 10 plus the 8 boundaries) keeps the two teacher trajectories short
    r = MLCMRecipe(TeacherBundle.from_pipeline(pipe), MLCMOptions(segment_schedule=[8, 1], stage_steps=[1], bank_size=2,
                                                                  num_ddim_timesteps=10, sample_conditions=["a cat"]))
    batch = {"images": torch.zeros(2, 3, 32, 32), "conditions": ["a cat", "a dog"]}
    for step in (0, 1):
        out = r.training_step(batch, step, torch.Generator().manual_seed(step))
        assert torch.isfinite(out.losses["student"]) and out.logs["segments"] == (8 if step == 0 else 1)
        out.losses["student"].backward()
    assert r.bank.states.shape == (2, len(r.fine_grid), *r.teacher.sample_shape)
    trainable = r.optimizer_params()["student"]
    assert trainable and all(p.grad is not None for p in trainable)
    assert all(p.grad is None for p in r.teacher.denoiser.backbone.parameters())
    assert all(p.grad is None for p in r.target.parameters())


@pytest.mark.slow  # train (CLI) + export + two fresh-process stock loads: ~40 s alone, ~2 min on loaded shared cores
def test_tiny_sd_train_export_and_stock_load_at_the_segment_boundaries(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "stepdistill", "train", str(REPO / "recipes/mlcm/tiny-sd.yaml"),
                           f"run.output_dir={run_dir}", "--no-export"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-0000004" / "manifest.json").is_file()
    out = tmp_path / "student"
    proc = subprocess.run([sys.executable, "-m", "stepdistill", "export", str(run_dir), str(out)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "999, 749, 499, 249" in (out / "README.md").read_text()
    # the exported defaults (4 steps) and an 8-step call: the stock LCMScheduler visits the segment boundaries
    for call, expected in (({}, [999, 749, 499, 249]),
                           ({"num_inference_steps": 8}, [999, 874, 749, 624, 499, 374, 249, 124])):
        summary = load_and_sample_in_fresh_process(out, {"prompt": ["a cat"], "height": 32, "width": 32, **call})
        assert summary["stepdistill_imported"] is False
        assert summary["pipeline"] == "LatentConsistencyModelPipeline" and summary["scheduler"] == "LCMScheduler"
        assert summary["timesteps"] == expected, summary  # one forward per segment boundary, no CFG pass
        assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]


def test_ddim_sampler_hops_deterministically_through_the_boundaries(one_thread):
    """recipe.sampler = "ddim": one student evaluation per boundary, each hop is f_s = DDIM(z_b, x0_theta; b -> b')
    (the map the loss trains), no noise after the starting draw, and the 1-step sample equals the LCM sampler's."""
    r = _toy_recipe(sampler="ddim")
    labels = torch.arange(32) % r.teacher.mixture.num_classes

    def run(steps, seed_after, sampler=None):
        g = torch.Generator().manual_seed(0)
        calls = []
        orig = r.consistency

        def spy(net, z, t, cond, emb):
            calls.append((z.clone(), t.clone()))
            return orig(net, z, t, cond, emb)

        r.consistency = spy
        try:
            torch.manual_seed(seed_after)
            out = r.sample(32, g, conditions=labels, steps=steps, guidance_scale=2.0, sampler=sampler)
        finally:
            del r.consistency
        return out, calls

    start = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    out8, calls = run(8, 0)
    assert [int(t[0]) for _, t in calls] == segment_boundaries(1000, 8).tolist()[:-1]
    assert torch.equal(calls[0][0], start), "the starting noise is the generator's first draw"
    with torch.no_grad():
        for (z, t), (z_next, s) in zip(calls, calls[1:]):
            x0 = orig_consistency(r, z, t, labels)
            expect = ddim_step_from_x0(z, x0, r.process.coefficients(t, like=x0), r.process.coefficients(s, like=x0))
            assert torch.allclose(z_next, expect, atol=1e-6)
    out8b, _ = run(8, 1)
    assert torch.equal(out8, out8b), "deterministic after the starting noise"
    one_ddim, _ = run(1, 0)
    one_lcm, _ = run(1, 0, sampler="lcm")
    assert torch.allclose(one_ddim, one_lcm, atol=1e-5)
    with pytest.raises(ValueError, match="sampler"):
        _toy_recipe(sampler="euler")


def orig_consistency(r, z, t, labels):
    cond, _ = r.teacher.encode_conditions(labels, "cpu")
    omega = torch.full((z.shape[0],), 1.0)
    return MLCMRecipe.consistency(r, r.student, z, t, cond, omega)


def test_sample_max_timestep_moves_the_sampler_start_off_the_top_boundary(sd_dir, tmp_path):
    r = _toy_recipe()
    assert r.sampling_timesteps(2) == [999, 499]  # the top two-segment boundaries by default
    r = _toy_recipe(sample_max_timestep=600)
    assert r.sampling_timesteps(1) == [600] and r.sampling_timesteps(2) == [600, 300]
    assert r.sampling_timesteps(8) == [600, 525, 450, 375, 300, 225, 150, 75]
    from stepdistill.export import read_sampling_spec

    sd = MLCMRecipe(TeacherBundle.from_pipeline(load_pipeline(sd_dir)),
                    MLCMOptions(sample_max_timestep=600, sample_conditions=["a cat"]))
    out = sd.export(tmp_path / "mlcm600")
    spec = read_sampling_spec(out)
    assert spec.extra["timesteps_by_steps"]["2"] == [600, 300] and "sample_max_timestep" in spec.notes
