"""The toy2d teacher as a ``TeacherBundle``: the exact mixture denoiser on a discrete VP process, with a fresh
``ToyMLP`` student factory (spec C.2), so every recipe runs on it exactly as on a Diffusers teacher.

The process is the DDPM "linear" schedule (beta 1e-4 .. 0.02, T = 1000); its terminal alpha_T ~ 6e-3, so t = 999
is effectively pure noise. Students predict v (stable at both ends of the schedule).
"""

from __future__ import annotations

from ...diffusion.processes import DiscreteVP
from ...models.denoiser import Denoiser
from ...models.mlp import ToyMLP
from ...models.teacher_io import TeacherBundle
from .mixture import GaussianMixture2D, load_mixture
from .teacher import AnalyticGMMDenoiserNet

__all__ = ["TOY_SCHEDULER_CONFIG", "toy_teacher_bundle", "toy_process"]

TOY_SCHEDULER_CONFIG = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001,
                        "beta_end": 0.02, "beta_schedule": "linear", "prediction_type": "epsilon",
                        "clip_sample": False, "set_alpha_to_one": False, "steps_offset": 1}


def toy_process() -> DiscreteVP:
    return DiscreteVP.from_scheduler_config(TOY_SCHEDULER_CONFIG)


def toy_teacher_bundle(mixture: str | GaussianMixture2D = "ring8", hidden: int = 256, depth: int = 4) -> TeacherBundle:
    mix = load_mixture(mixture)
    teacher = Denoiser(AnalyticGMMDenoiserNet(mix), toy_process(), "x0", family="analytic")

    def make_student() -> ToyMLP:
        return ToyMLP(dim=2, hidden=hidden, depth=depth, num_classes=mix.num_classes)

    bundle = TeacherBundle(teacher, (2,), TOY_SCHEDULER_CONFIG, make_student=make_student, student_prediction="v")
    bundle.mixture = mix
    return bundle


def _toy2d_data(data):
    """``data.kind: toy2d``: exact mixture samples with their class labels; ``data.path`` names the mixture."""
    from ...training.data import step_indexed

    mix = load_mixture(data.path or "ring8")

    def sample(k, g):
        x0, labels = mix.sample(data.batch_size, g)
        return {"images": x0.float(), "conditions": labels}

    return step_indexed(sample)


def _register() -> None:
    from ...training.data import register_data_kind

    register_data_kind("toy2d", _toy2d_data)


_register()
