"""Guidance distillation (Meng et al. 2023, "On Distillation of Guided Diffusion Models").

Spec B.2. Two stages in one run (update counter driven, like :mod:`.progressive`'s rounds):

* **Stage 1, output matching** (updates ``0 .. match_steps - 1``): one student ``x_eta(z_u, c, omega)`` learns the
  teacher's classifier-free-guided output for every guidance strength in ``[omega_min, omega_max]``. With
  ``u ~ U(0, 1]`` (a uniform integer timestep for discrete teachers), ``omega ~ U[omega_min, omega_max]`` and
  ``z_u = alpha_u x + sigma_u eps`` on real data, the target is Meng et al.'s
  ``x^omega = (1 + omega) x_c(z_u) - omega x_u(z_u)`` (their Eq. for the guided x-prediction; ``omega = w - 1`` for
  the Imagen/Diffusers scale w, spec A.3) and the loss ``max(SNR_u, 1) ||x_eta - x^omega||^2`` (PD's truncated-SNR
  weighting; the paper's weighting is not restated in the spec: [choose]).
* **Stage 2, progressive distillation** (then ``steps_per_round`` updates per round): Salimans & Ho's halving rounds
  (:mod:`.progressive`, B.1) with the stage-1 student as the first teacher; every example carries its own omega, fed
  to both the teacher and the student, so the teacher target is computed at the same omega.

The guidance strength enters the network as an extra embedding added to the time embedding, zero-initialised so the
student starts exactly equal to its teacher's *conditional* output: a UNet2DConditionModel gets
``time_cond_proj_dim`` (the sinusoidal embedding of ``1000 omega``, :func:`models.student.with_guidance_embedding`),
the toy ToyMLP its own guidance projection. For the UNet this is precisely the input the stock Diffusers pipelines
build from ``guidance_scale - 1`` when ``unet.config.time_cond_proj_dim`` is set; those pipelines then *skip* the CFG
doubling (``do_classifier_free_guidance`` is False), so the exported folder (a ``StableDiffusionPipeline`` with a
trailing-grid ``DDIMScheduler``) takes ``guidance_scale`` and makes one UNet call per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..diffusion.processes import DiscreteVP
from ..models.backbones import unwrap
from ..models.student import copy_backbone, with_guidance_embedding
from .base import StepOutput, register_recipe
from .common import draw_uniform
from .progressive import ProgressiveRecipe, Stage, round_schedule, truncated_snr_weight, weighted_x_loss

__all__ = ["GuidanceDistillOptions", "GuidanceDistillRecipe"]


@dataclass
class GuidanceDistillOptions:
    """Options of the ``guidance_distill`` recipe (``recipe.*`` keys)."""

    omega_min: float = 0.0
    """Lower end of the guidance strength omega = w - 1 (Meng convention; Meng et al. use [0, 4] on ImageNet 64)."""
    omega_max: float = 4.0
    """Upper end of omega."""
    match_steps: int = 1000
    """Updates of stage 1 (output matching); the PD rounds follow."""
    teacher_steps: int = 64
    """DDIM steps of the stage-1 student used as the first PD teacher (round 0's student has half)."""
    final_steps: int = 4
    """Student steps after the last PD round."""
    steps_per_round: int = 1000
    """Updates per PD halving. train.max_steps = match_steps + steps_per_round x rounds."""
    student_prediction: str = "auto"
    """Student output kind: "auto" (the teacher bundle's student kind), "x0", "v", "eps" or "flow"."""
    weighting: str = "snr_trunc"
    """Loss weight on the x-space error, both stages: "snr_trunc" (max(SNR, 1)), "x" or "snr"."""
    guidance_embed_dim: int = 256
    """UNet guidance embedding size (time_cond_proj_dim)."""
    sample_guidance_scale: float = 3.0
    """Default Imagen w of sample grids and of the exported folder (embedded as w - 1)."""
    keep_round_students: bool = True
    """Keep (and checkpoint) the stage-1 and every finished round's student, each sampleable by its step count."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""


@register_recipe("guidance_distill")
class GuidanceDistillRecipe(ProgressiveRecipe):
    name = "guidance_distill"
    options_class = GuidanceDistillOptions
    w_conditioned = True

    def __init__(self, teacher, options: GuidanceDistillOptions, device="cpu"):
        if not options.omega_min <= options.omega_max:
            raise ValueError(f"recipe.omega_min ({options.omega_min}) must not exceed recipe.omega_max "
                             f"({options.omega_max})")
        if options.omega_min < 0:
            raise ValueError(f"recipe.omega_min must be >= 0 (omega = w - 1; omega = 0 is the conditional model), got "
                             f"{options.omega_min}")
        if options.match_steps < 0:
            raise ValueError(f"recipe.match_steps must be >= 0, got {options.match_steps}")
        super().__init__(teacher, options, device)

    # ------------------------------------------------------------------ hooks of ProgressiveRecipe
    def build_stages(self) -> list[Stage]:
        o = self.options
        rounds = round_schedule(o.teacher_steps, o.final_steps)
        return [Stage("match", o.teacher_steps, 0)] + [
            Stage("pd", n, o.match_steps + r * o.steps_per_round) for r, n in enumerate(rounds)]

    def make_student_backbone(self) -> nn.Module:
        base = self.teacher.denoiser.backbone
        kind = type(unwrap(base)).__name__
        if kind == "UNet2DConditionModel":
            return with_guidance_embedding(base, self.options.guidance_embed_dim)
        student = copy_backbone(self.teacher.student_seed())
        if not hasattr(student, "add_guidance_embedding"):
            raise ValueError(f"guidance distillation needs a student that takes the guidance strength as an input: a "
                             f"UNet2DConditionModel (time_cond_proj_dim) or the toy ToyMLP; this teacher is {kind}")
        student.add_guidance_embedding()
        return student

    def omega(self, n: int, generator: torch.Generator) -> Tensor:
        return draw_uniform(n, self.options.omega_min, self.options.omega_max, generator)

    def student_guidance_input(self, num: int, guidance_scale: float | None) -> Tensor:
        w = self.options.sample_guidance_scale if guidance_scale is None else float(guidance_scale)
        return torch.full((num,), w - 1.0, device=self.device)

    def sampling_defaults(self) -> dict:
        return {"num_inference_steps": self.current_steps(), "guidance_scale": float(self.options.sample_guidance_scale)}

    # ------------------------------------------------------------------ stage 1
    def _draw_times(self, n: int, generator: torch.Generator) -> Tensor:
        """Uniform training times: integer timesteps 0..T-1 (discrete) or t_min + u (t_max - t_min), u ~ U(0, 1]."""
        if isinstance(self.process, DiscreteVP):
            return torch.randint(0, self.process.num_train_timesteps, (n,), generator=generator).to(torch.float64)
        u = 1.0 - torch.rand(n, generator=generator, dtype=torch.float64)
        return self.process.t_min + u * (self.process.t_max - self.process.t_min)

    def match_target(self, z: Tensor, t: Tensor, cond, uncond, omega: Tensor) -> Tensor:
        """Meng et al.'s guided target ``(1 + omega) x_c - omega x_u`` (one batched CFG teacher call)."""
        return self.teacher.denoiser.predict(z, t, cond, want="x0", cfg_scale=omega, uncond=uncond,
                                             convention="lcm")["x0"]

    def training_step(self, batch, step, generator):
        self.advance_to(self.stage_of(step))
        if self.stages[self.stage].kind != "match":
            return super().training_step(batch, step, generator)
        from .progressive import path_coefficients

        self.remember_conditions(batch)
        dev = self.device
        x0 = self.teacher.codec.encode(batch["images"].to(dev)).float()
        cond, uncond = self.teacher.encode_conditions(batch["conditions"], dev)
        n = x0.shape[0]
        t = self._draw_times(n, generator)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        omega = self.omega(n, generator).to(dev)
        c_t = path_coefficients(self.process, t, x0)
        z = c_t.alpha * x0 + c_t.sigma * noise
        t_model = self._model_time(t)
        with torch.no_grad():
            target = self.match_target(z, t_model, cond, uncond, omega)
        x_pred = self.student.predict(z, t_model, cond, want="x0", guidance_input=omega)["x0"]
        loss = weighted_x_loss(x_pred, target, truncated_snr_weight(c_t, self.options.weighting))
        return StepOutput(losses={"student": loss}, logs={"loss": loss.detach(), "omega": omega.mean(),
                                                          "round_steps": float(self.stages[self.stage].steps)})
