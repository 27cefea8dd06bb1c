"""BOOT (Gu et al. 2023, "BOOT: Data-free Distillation of Denoising Diffusion Models with Bootstrapping"); spec B.9.

Data-free one-step distillation. A time-conditioned student ``g_theta(eps, t, c)`` takes the *noise* eps (not x_t)
and predicts the **signal** ``y_t = (x_t - sigma_t eps) / alpha_t`` of the teacher's guided DDIM trajectory that
starts from ``x_T = eps``. With ``lambda_t = log(sigma_t / alpha_t)`` the signal obeys the paper's Signal-ODE

    dy_t/dt = -lambda'_t (f(x_t, t) - y_t),   x_t = alpha_t y_t + sigma_t eps,

and one DDIM step of the teacher from t down to s is, exactly (spec B.9, derived from A.4's DDIM update),

    y_s = y_t + delta (f(x_t, t) - y_t),
    delta = 1 - e^{lambda_s - lambda_t} = 1 - (sigma_s alpha_t) / (alpha_s sigma_t).

Training (prompts / class labels only, no images):

1. the teacher grid is the trailing DDIM grid of ``teacher_steps`` points (:func:`.progressive.pd_grid`, the grid
   of Diffusers' ``DDIMScheduler(timestep_spacing="trailing")``) plus the clean end; draw ``t = grid[k]``,
   ``k ~ U{1..N}``, and let ``s = grid[k - 1]`` be the next point below (``s`` = clean for k = 1: delta = 1);
2. ``y_hat_t = sg g(eps, t)``, ``x_hat_t = alpha_t y_hat_t + sigma_t eps``;
3. target ``y* = y_hat_t + delta (f~(x_hat_t, t, c, w) - y_hat_t)`` with ``f~`` the teacher's CFG x0 prediction
   (Imagen ``w``, spec A.3), in float32 under no_grad;
4. loss ``(1 / delta^2) ||g(eps, s) - y*||^2`` (the spec's derivative-matching normalisation; ``loss_scaling:
   none`` drops it), mean over elements and samples.

Boundary (spec B.9 [choose]: hard-wired). ``g(eps, t) = y_T(eps) + kappa(t) (NN(eps, t) - y_T(eps))`` with
``y_T(eps) = eps (1 - sigma_T) / alpha_T`` (the exact signal of ``x_T = eps``: then ``x_hat_T = eps``) and
``kappa(t) = 1 - e^{lambda_t - lambda_T}``, the fraction of the way from T to t that one DDIM step with a frozen
teacher prediction covers. ``kappa(T) = 0`` (the boundary holds exactly), ``kappa(clean) = 1``, so the one-step sample
is the raw network output ``g(eps, clean) = NN(eps, 0)``. Consequence (the unit test): at the first step (t = T) the
student's signal is ``y_T`` exactly and the bootstrap target *is* the signal of the teacher's own first DDIM step from
``x_T = eps``.

Sampling: one network call, ``x0 = g(eps, clean)``; the network receives timestep 0 for the clean end. Export: the
student UNet in the teacher's pipeline class with a stock ``DDIMScheduler`` (``timestep_spacing="linspace"``,
``set_alpha_to_one=True``, ``prediction_type="sample"``): its single step is at timestep 0 and returns the UNet output
unchanged ("leading" spacing would need ``steps_offset=0``, which StableDiffusionPipeline resets to 1);
``guidance_scale=1`` (the teacher's CFG is distilled in).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..diffusion.processes import PathCoefficients
from ..models.backbones import unwrap
from ..models.denoiser import Denoiser
from ..models.student import copy_backbone, freeze
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe
from .common import discrete_vp_process
from .progressive import path_coefficients, pd_grid
from .score_distill import guided_predict

__all__ = ["BOOTOptions", "BOOTRecipe", "signal_step_delta", "bootstrap_target", "boundary_signal", "boundary_kappa",
           "signal_of"]


@dataclass
class BOOTOptions:
    """Options of the ``boot`` recipe (``recipe.*`` keys)."""

    guidance_scale: float = 7.5
    """Imagen CFG scale w of the teacher, distilled into the student (1 = no guidance)."""
    teacher_steps: int = 50
    """Points of the teacher's DDIM grid that t and s are drawn from (spec: 50-1000; finer = less bias, slower
    propagation of the boundary from T downward)."""
    loss_scaling: str = "delta2"
    """"delta2": (1/delta^2) ||g(eps, s) - y*||^2 (spec B.9); "none": the plain squared error."""
    gradient_checkpointing: bool = False
    """Enable gradient checkpointing on the student (Diffusers backbones)."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""

    def validate(self) -> None:
        if self.teacher_steps < 1:
            raise ValueError(f"recipe.teacher_steps must be >= 1, got {self.teacher_steps}")
        if self.loss_scaling not in ("delta2", "none"):
            raise ValueError(f"recipe.loss_scaling must be 'delta2' or 'none', got {self.loss_scaling!r}")
        if self.guidance_scale < 0:
            raise ValueError(f"recipe.guidance_scale must be >= 0 (Imagen w; 1 = no guidance), got "
                             f"{self.guidance_scale}")


# ---------------------------------------------------------------------------------------------------- math


def signal_step_delta(c_t: PathCoefficients, c_s: PathCoefficients) -> Tensor:
    """``delta = 1 - e^{lambda_s - lambda_t} = 1 - (sigma_s alpha_t) / (alpha_s sigma_t)``; 1 when s is clean."""
    return 1.0 - (c_s.sigma * c_t.alpha) / (c_s.alpha * c_t.sigma)


def bootstrap_target(y_t: Tensor, f_t: Tensor, delta: Tensor) -> Tensor:
    """One exact DDIM step of the Signal-ODE: ``y_s = y_t + delta (f(x_t, t) - y_t)`` (spec B.9)."""
    return y_t + delta * (f_t - y_t)


def signal_of(x_t: Tensor, eps: Tensor, c: PathCoefficients) -> Tensor:
    """``y_t = (x_t - sigma_t eps) / alpha_t``."""
    return (x_t - c.sigma * eps) / c.alpha


def boundary_signal(eps: Tensor, c_T: PathCoefficients) -> Tensor:
    """``y_T(eps) = eps (1 - sigma_T) / alpha_T``: the signal of ``x_T = eps`` (-> 0 as alpha_T -> 0)."""
    return eps * (1.0 - c_T.sigma) / c_T.alpha


def boundary_kappa(c_t: PathCoefficients, c_T: PathCoefficients) -> Tensor:
    """``kappa(t) = 1 - e^{lambda_t - lambda_T}``: 0 at T, 1 at the clean end, increasing toward the data."""
    return 1.0 - (c_t.sigma * c_T.alpha) / (c_t.alpha * c_T.sigma)


# ---------------------------------------------------------------------------------------------------- recipe


@register_recipe("boot")
class BOOTRecipe(Recipe):
    name = "boot"
    options_class = BOOTOptions

    def __init__(self, teacher: TeacherBundle, options: BOOTOptions, device: torch.device | str = "cpu"):
        options.validate()
        self.options, self.teacher, self.device = options, teacher, torch.device(device)
        self.process = discrete_vp_process(teacher, "BOOT", "integer timesteps, a DDIM grid")
        self.grid = pd_grid(self.process, options.teacher_steps)  # grid[0] = NaN = clean
        if self.grid[1] < 1:  # the network sees timestep 0 for the clean end: no grid point may use it too
            raise ValueError(f"recipe.teacher_steps={options.teacher_steps} puts a grid point at timestep 0, which the "
                             f"student reserves for the clean end; use at most {self.process.num_train_timesteps // 2}")
        freeze(teacher.denoiser.backbone)
        teacher.denoiser.to(self.device)
        net = copy_backbone(teacher.student_seed()).to(self.device)
        if options.gradient_checkpointing and hasattr(net, "enable_gradient_checkpointing"):
            net.enable_gradient_checkpointing()
        # The student's raw output is read as a signal (an x0-like quantity); its input is eps, not x_t.
        self.student = Denoiser(net, self.process, "x0")
        self._sample_conditions = list(options.sample_conditions)

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        return {"student": self.student.backbone}

    def set_prepared(self, name, module):
        self.student.backbone = module

    def state_dict_for_checkpoint(self):
        return {"student": unwrap(self.student.backbone).state_dict()}

    def load_state_dict_from_checkpoint(self, state):
        unwrap(self.student.backbone).load_state_dict(state["student"])

    # ------------------------------------------------------------------ the student's signal
    def _coeffs(self, t: Tensor, like: Tensor) -> PathCoefficients:
        """Path coefficients in float64 (``1 - sigma_T`` and ``alpha_T`` are tiny: float32 would lose the boundary)."""
        return path_coefficients(self.process, t, like.double())

    def _model_time(self, t: Tensor) -> Tensor:
        """Network timestep of each grid time: the integer index, and 0 for the clean end (NaN)."""
        return torch.nan_to_num(t, nan=0.0).long().to(self.device)

    def signal(self, eps: Tensor, t: Tensor, cond) -> Tensor:
        """``g(eps, t) = y_T(eps) + kappa(t) (NN(eps, t) - y_T(eps))`` (float32 out, coefficient math in float64);
        ``t`` per sample, NaN = clean."""
        e64 = eps.double()
        c_T = self._coeffs(torch.full((eps.shape[0],), float(self.grid[-1])), e64)
        c_t = self._coeffs(t, e64)
        y_T = boundary_signal(e64, c_T)
        raw = self.student.native(eps.float(), self._model_time(t), cond)
        kappa = boundary_kappa(c_t, c_T)
        out = y_T + kappa * (raw.double() - y_T)
        return torch.where(kappa == 1, raw, out.float())  # clean end: exactly the network output

    def teacher_x0(self, x_t: Tensor, t: Tensor, cond, uncond) -> Tensor:
        """The teacher's guided x0 prediction ``f~(x_t, t, c, w)`` (float32)."""
        return guided_predict(self.teacher.denoiser, x_t, t.long().to(self.device), cond, uncond,
                              float(self.options.guidance_scale), want="x0")["x0"]

    def bootstrap(self, eps: Tensor, t: Tensor, s: Tensor, cond, uncond) -> tuple[Tensor, Tensor]:
        """``(y*, delta)``: the bootstrap target of spec B.9 steps 2-3 for per-sample grid times ``t > s`` (float32
        results, computed in float64 around the float32 networks)."""
        with torch.no_grad():
            e64 = eps.double()
            c_t, c_s = self._coeffs(t, e64), self._coeffs(s, e64)
            y_t = self.signal(eps, t, cond).double()
            x_t = (c_t.alpha * y_t + c_t.sigma * e64).float()
            f = self.teacher_x0(x_t, t, cond, uncond).double()
            delta = signal_step_delta(c_t, c_s)
            return bootstrap_target(y_t, f, delta).float(), delta.float()

    def training_step(self, batch, step, generator):
        self.remember_conditions(batch)
        dev = self.device
        cond, uncond = self.teacher.encode_conditions(batch["conditions"], dev)
        n = cond.batch_size or len(batch["conditions"])
        eps = torch.randn((n, *self.teacher.sample_shape), generator=generator).to(dev)
        k = torch.randint(1, self.options.teacher_steps + 1, (n,), generator=generator)
        t, s = self.grid[k], self.grid[k - 1]
        target, delta = self.bootstrap(eps, t, s, cond, uncond)
        y_s = self.signal(eps, s, cond)
        per = ((y_s - target) ** 2).flatten(1).mean(1)
        if self.options.loss_scaling == "delta2":
            per = per / delta.flatten() ** 2
        loss = per.mean()
        return StepOutput(losses={"student": loss}, logs={"loss": loss.detach(), "delta_mean": delta.mean(),
                                                          "signal_std": y_s.detach().std()})

    # ------------------------------------------------------------------ sampling and export
    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None):
        """One-step samples ``g(eps, clean)``; ``eps = randn((num, *sample_shape))`` is the first draw from
        ``generator``. The teacher's CFG scale is distilled in: another ``guidance_scale`` is an error."""
        if steps not in (None, 1):
            raise ValueError(f"the BOOT student is a one-step generator (g(eps, 0)); got steps={steps}")
        w = float(self.options.guidance_scale)
        if guidance_scale is not None and abs(float(guidance_scale) - w) > 1e-6:
            raise ValueError(f"this BOOT student was distilled at guidance_scale={w}; it cannot sample at "
                             f"{guidance_scale} (retrain with recipe.guidance_scale={guidance_scale})")
        eps = torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        clean = torch.full((num,), float("nan"), dtype=torch.float64)
        return self.teacher.codec.decode(self.signal(eps, clean, cond))

    def scheduler(self):
        """A stock ``DDIMScheduler`` whose single step (timestep 0, ``prediction_type="sample"``, final alpha 1)
        returns the UNet output unchanged: the exported pipeline computes exactly ``g(eps, clean)``."""
        from diffusers import DDIMScheduler

        cfg = {k: v for k, v in self.teacher.scheduler_config.items() if not k.startswith("_")}
        cfg.update(timestep_spacing="linspace", set_alpha_to_one=True, clip_sample=False,
                   thresholding=False, prediction_type="sample")
        return DDIMScheduler.from_config(cfg)

    def export(self, out_dir):
        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, export_full_student

        if unwrap(self.student.backbone).__class__.__name__ == "ToyMLP":
            raise NotImplementedError("toy2d students have no Diffusers export")
        spec = SamplingSpec(recipe="boot", variant="full", num_inference_steps=1, guidance_scale=1.0,
                            scheduler="DDIMScheduler",
                            notes=f"One UNet call at timestep 0 on pure noise returns the sample (BOOT signal at t=0); "
                                  f"CFG w={self.options.guidance_scale} is distilled in, so guidance_scale=1.",
                            extra={"teacher": teacher_reference(self.teacher.pipeline)})
        return export_full_student(self.teacher, unwrap(self.student.backbone), self.scheduler(), out_dir, spec)
