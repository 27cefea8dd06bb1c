"""Guidance distillation (spec B.2, Meng et al.): the omega-conditioned student at init, the stage-1 CFG target, the
stages (matching, then PD rounds keeping omega as an input), and a tiny-SD run exported to stock Diffusers where
``guidance_scale`` goes through the UNet's time_cond_proj_dim embedding with one UNet call per step."""

from pathlib import Path

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.benchmarks.toy2d.mixture import load_mixture
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.guidance_distill import GuidanceDistillOptions, GuidanceDistillRecipe
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

REPO = Path(__file__).resolve().parents[1]
MIX = load_mixture("ring8")


@pytest.fixture(scope="module")
def sd_dir():
    return tiny_pipeline_dir("sd")


def test_unet_student_at_init_is_the_conditional_teacher_and_target_is_meng_cfg(sd_dir):
    bundle = TeacherBundle.from_pipeline(load_pipeline(sd_dir))
    r = GuidanceDistillRecipe(bundle, GuidanceDistillOptions(omega_min=1.0, omega_max=6.0, teacher_steps=8,
                                                             final_steps=4, sample_conditions=["a cat"]))
    unet = r.student.backbone
    assert unet.config.time_cond_proj_dim == 256 and torch.all(unet.time_embedding.cond_proj.weight == 0)
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, *bundle.sample_shape, generator=gen)
    t = torch.tensor([999, 249])
    cond, uncond = bundle.encode_conditions(["a cat", "a dog"], "cpu")
    with torch.no_grad():
        teacher_c = bundle.denoiser.predict(z, t, cond, want="x0")["x0"]
        teacher_u = bundle.denoiser.predict(z, t, uncond, want="x0")["x0"]
        for omega in (0.0, 3.0, 6.0):
            s = r.student.predict(z, t, cond, want="x0", guidance_input=torch.full((2,), omega))["x0"]
            assert torch.allclose(s, teacher_c, atol=1e-5), "zero-init guidance embedding: student = conditional teacher"
        omega = torch.tensor([1.5, 4.0])
        target = r.match_target(z, t, cond, uncond, omega)
    expected = (1 + omega.view(2, 1, 1, 1)) * teacher_c - omega.view(2, 1, 1, 1) * teacher_u
    assert torch.allclose(target, expected, atol=1e-4)


def test_toy_stages_match_then_pd_rounds_with_omega_fed_to_the_teacher():
    r = GuidanceDistillRecipe(toy_teacher_bundle("ring8"), GuidanceDistillOptions(
        omega_min=0.0, omega_max=2.0, match_steps=3, teacher_steps=8, final_steps=2, steps_per_round=2))
    assert [(s.kind, s.steps, s.start) for s in r.stages] == [("match", 8, 0), ("pd", 4, 3), ("pd", 2, 5)]
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(r.optimizer_params()["student"], lr=1e-2)
    for step in range(6):
        x, labels = MIX.sample(64, gen)
        out = r.training_step({"images": x.float(), "conditions": labels}, step, gen)
        opt.zero_grad()
        out.losses["student"].backward()
        opt.step()
        assert 0.0 <= out.logs["omega"].item() <= 2.0
    assert r.stage == 2 and set(r.sampleable_steps()) == {8, 4, 2}
    # the teacher of the PD rounds is a w-conditioned network: its output depends on omega
    teacher = r.round_teacher
    assert teacher.backbone.guidance_proj is not None
    z, t = torch.randn(8, 2), torch.full((8,), 499)
    cond, _ = r.teacher.encode_conditions(torch.zeros(8, dtype=torch.long), "cpu")
    a = teacher.predict(z, t, cond, want="x0", guidance_input=torch.zeros(8))["x0"]
    b = teacher.predict(z, t, cond, want="x0", guidance_input=torch.full((8,), 2.0))["x0"]
    assert (a - b).abs().max() > 1e-4
    # sampling takes the Imagen scale w and feeds omega = w - 1
    pts = r.sample(16, torch.Generator().manual_seed(0), conditions=torch.zeros(16, dtype=torch.long), steps=2,
                   guidance_scale=3.0)
    assert pts.shape == (16, 2) and torch.isfinite(pts).all()


@pytest.mark.slow
def test_tiny_sd_train_export_and_sample_in_fresh_stock_process(tmp_path):
    """`stepdistill train recipes/guidance/tiny-sd.yaml` (stage 1 + one PD round), export, then stock Diffusers in a
    process that cannot import stepdistill samples 4 steps with guidance_scale (one UNet call per step)."""
    from diffusers import DiffusionPipeline

    from stepdistill.config import load_config
    from stepdistill.runner import run_training
    from stepdistill.testing.stock_load import load_and_sample_in_fresh_process

    cfg = load_config(REPO / "recipes/guidance/tiny-sd.yaml", [f"run.output_dir={tmp_path / 'run'}"])
    run_dir = run_training(cfg)
    folder = run_dir / "export"
    summary = load_and_sample_in_fresh_process(folder, {"prompt": ["a cat"], "height": 32, "width": 32,
                                                        "guidance_scale": 5.0})
    assert summary["stepdistill_imported"] is False and summary["finite"]
    assert summary["pipeline"] == "StableDiffusionPipeline" and summary["scheduler"] == "DDIMScheduler"
    assert summary["timesteps"] == [999, 749, 499, 249], summary

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.time_cond_proj_dim == 256
    calls = []
    orig = pipe.unet.forward

    def spy(sample, timestep, *a, **k):
        calls.append((sample.shape[0], k.get("timestep_cond")))
        return orig(sample, timestep, *a, **k)

    pipe.unet.forward = spy
    out = {}
    for w in (2.0, 6.0):
        calls.clear()
        out[w] = pipe("a cat", height=32, width=32, num_inference_steps=4, guidance_scale=w, output_type="np",
                      generator=torch.Generator().manual_seed(0)).images
        assert [c[0] for c in calls] == [1, 1, 1, 1], "no CFG doubling: one UNet call on the batch per step"
        assert all(c[1] is not None for c in calls), "guidance_scale enters through timestep_cond"
    assert not torch.equal(torch.as_tensor(out[2.0]), torch.as_tensor(out[6.0])), "the trained embedding reads w"
