"""Custom timestep grids for pipelines that take no ``timesteps`` argument (``DiTPipeline``, ``DDPMPipeline``)."""

from __future__ import annotations

import json

import pytest
import torch

from stepdistill.export import SamplingSpec, export_full_student, fit_step_count_schedule, pipeline_takes_timesteps
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.testing.stock_load import load_and_sample_in_fresh_process
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir


def _lcm(**kw):
    from diffusers import LCMScheduler

    return LCMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                        **kw)


@pytest.fixture(scope="module")
def dit_bundle():
    return TeacherBundle.from_pipeline(load_pipeline(tiny_pipeline_dir("dit")))


def test_which_pipelines_take_timesteps():
    from diffusers import DDPMPipeline, DiTPipeline, StableDiffusionPipeline

    assert pipeline_takes_timesteps(StableDiffusionPipeline)
    assert not pipeline_takes_timesteps(DiTPipeline)
    assert not pipeline_takes_timesteps(DDPMPipeline)


@pytest.mark.parametrize("grid", [[999], [999, 749, 499, 249], [999, 499], [993]])
def test_reachable_grids_are_fitted_exactly(grid):
    sched, got = fit_step_count_schedule(_lcm(), grid, exact=True)
    assert got == grid
    sched.set_timesteps(len(grid))  # what a stock pipeline does with num_inference_steps alone
    assert sched.timesteps.tolist() == grid


def test_unreachable_grid_is_refused_exactly_and_snapped_when_allowed():
    # set_timesteps(2) with original_inference_steps O gives [O k - 1, (O - floor(O / 2)) k - 1], k = 1000 // O:
    # O = 9 (k = 111) gives [998, 554], summed distance 4 from [999, 557]; no O gives 557 itself.
    with pytest.raises(ValueError, match="no LCMScheduler step count reproduces the timesteps"):
        fit_step_count_schedule(_lcm(), [999, 557], exact=True)
    sched, got = fit_step_count_schedule(_lcm(), [999, 557], exact=False)
    assert got == [998, 554] and sched.config.original_inference_steps == 9
    sched.set_timesteps(2)
    assert sched.timesteps.tolist() == [998, 554]


def test_only_lcm_schedulers_are_fitted():
    from diffusers import DDIMScheduler

    with pytest.raises(ValueError, match="only LCMScheduler"):
        fit_step_count_schedule(DDIMScheduler(), [999])


def test_export_refuses_timesteps_the_pipeline_cannot_take(dit_bundle, tmp_path):
    spec = SamplingSpec(recipe="dmd2", num_inference_steps=2, guidance_scale=1.0, scheduler="LCMScheduler",
                        timesteps=[999, 557])
    with pytest.raises(ValueError, match="DiTPipeline takes no `timesteps` argument"):
        export_full_student(dit_bundle, dit_bundle.pipeline.transformer, _lcm(), tmp_path / "out", spec)
    assert not (tmp_path / "out").exists()


def test_spec_call_kwargs_use_the_step_count_when_the_scheduler_carries_the_grid():
    spec = SamplingSpec(recipe="dmd2", num_inference_steps=4, guidance_scale=1.0, scheduler="LCMScheduler",
                        timesteps=[999, 749, 499, 249], timesteps_from_steps=True)
    assert spec.call_kwargs() == {"num_inference_steps": 4, "guidance_scale": 1.0}
    spec.timesteps_from_steps = False
    assert spec.call_kwargs() == {"timesteps": [999, 749, 499, 249], "guidance_scale": 1.0}


def test_dmd2_refuses_at_construction_a_grid_a_dit_pipeline_cannot_sample(dit_bundle):
    from stepdistill.recipes.dmd2 import DMD2Options, DMD2Recipe

    with pytest.raises(ValueError, match="recipe.timesteps: no LCMScheduler step count"):
        DMD2Recipe(dit_bundle, DMD2Options(timesteps=[999, 557], gan_weight_gen=0.0, gan_weight_disc=0.0,
                                           data_mode="prompts"))


@pytest.mark.slow
def test_dmd2_dit_student_samples_its_grid_in_stock_dit_pipeline(dit_bundle, tmp_path):
    from stepdistill.recipes.dmd2 import DMD2Options, DMD2Recipe

    grid = [999, 749, 499, 249]
    r = DMD2Recipe(dit_bundle, DMD2Options(timesteps=grid, gan_weight_gen=0.0, gan_weight_disc=0.0,
                                           data_mode="prompts", w_real=1.0))
    out = r.export(tmp_path / "export")
    spec = json.loads((out / "stepdistill_sampling.json").read_text())
    assert spec["timesteps"] == grid and spec["timesteps_from_steps"] is True
    assert spec["extra"]["teacher"], spec  # `stepdistill eval` finds the teacher without --teacher
    summary = load_and_sample_in_fresh_process(out, {"class_labels": [3]})
    assert summary["pipeline"] == "DiTPipeline" and summary["stepdistill_imported"] is False
    assert summary["timesteps"] == grid, summary  # one transformer call per grid time, no CFG batch


@pytest.mark.slow
def test_scm_dit_student_samples_the_nearest_step_count_grid(dit_bundle, tmp_path):
    from stepdistill.recipes.scm import SCMOptions, SCMRecipe, scm_sampling_times

    r = SCMRecipe(dit_bundle, SCMOptions(sample_steps=2, guidance_scale=1.0), "cpu")
    wanted = [r._vp_index(t) for t in scm_sampling_times(2, r.t_max, r.options.t_mid)]
    out = r.export(tmp_path / "export")
    spec = json.loads((out / "stepdistill_sampling.json").read_text())
    _, nearest = fit_step_count_schedule(_lcm(), wanted, exact=False)
    assert spec["timesteps_from_steps"] is True and spec["timesteps"] == nearest
    # the recorded TrigFlow times are those of the grid actually sampled
    assert torch.allclose(torch.tensor(spec["extra"]["trigflow_times"], dtype=torch.float64),
                          r.grid_t[spec["timesteps"]].to(torch.float64))
    summary = load_and_sample_in_fresh_process(out, {"class_labels": [3]})
    assert summary["pipeline"] == "DiTPipeline" and summary["timesteps"] == spec["timesteps"], summary
