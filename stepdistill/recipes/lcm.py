"""Latent consistency distillation: LCM (full student with a guidance embedding) and LCM-LoRA (Luo et al. 2023).

Spec B.3. With the skipping-step grid ``tau_j = k (j + 1) - 1`` (k = T / N_ddim, e.g. {19, 39, ..., 999}):

1. ``t1 = tau_j``, ``t0 = max(t1 - k, 0)``, ``z1 = alpha_t1 x0 + sigma_t1 eps`` (real data, forward-noised);
2. teacher CFG in the LCM convention, ``y = (1 + omega) y_c - omega y_u``, applied to x0 and eps alike, then one
   DDIM step ``z0 = alpha_t0 x0_g + sigma_t0 eps_g`` (LCM paper Eq. 8 with the DDIM solver);
3. consistency function ``f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t)``, with
   ``c_skip = sigma_d^2 / ((s t)^2 + sigma_d^2)``, ``c_out = s t / sqrt((s t)^2 + sigma_d^2)``, s = timestep_scaling
   = 10 and sigma_d = 0.5 (LCM Eq. 5 / the Diffusers LCMScheduler), so f(z, 0) = z exactly;
4. loss ``d(f_theta(z1, omega, c, t1), sg f_theta-(z0, omega, c, t0))`` with d = elementwise Huber (c = 0.001) or L2;
   theta- is an EMA of theta (mu = 0.95) for the full student, and theta itself under no_grad for LCM-LoRA (mu = 0).

The full student embeds omega through ``time_cond_proj_dim`` (zero-initialised, see ``models.student``), exactly
as the stock Diffusers pipelines do with ``guidance_scale - 1``. LCM-LoRA has no embedding: it learns one fixed
omega (``omega``, 7.5 in the LCM-LoRA report) or an average over the sampled range (the Diffusers script).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..diffusion.processes import DiscreteVP, diffusers_prediction_type
from ..diffusion.solvers import ddim_step
from ..models.backbones import unwrap
from ..models.denoiser import Denoiser
from ..models.student import UNET_LORA_TARGETS, add_lora, adapters_disabled, copy_backbone, freeze, lora_state_dict, \
    with_guidance_embedding
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe
from .common import draw_uniform, update_target_ema
from .losses import distance

__all__ = ["LCMOptions", "LCMRecipe", "lcm_boundary_scalings", "lcm_solver_grid", "original_steps_starting_at"]


@dataclass
class LCMOptions:
    """Options of the ``lcm`` recipe (``recipe.*`` keys in a run config)."""

    variant: str = "full"
    """"full": a full student with a guidance embedding and an EMA target; "lora": LCM-LoRA on the frozen teacher."""
    omega_min: float = 5.0
    """Lower end of the sampled guidance omega (LCM convention omega = w - 1; Diffusers scripts use [5, 15])."""
    omega_max: float = 15.0
    """Upper end of the sampled guidance omega."""
    omega: float | None = None
    """A fixed omega instead of the range (the LCM-LoRA report distils with 7.5)."""
    num_ddim_timesteps: int = 50
    """N of the skipping-step solver grid; skip k = T / N."""
    loss: str = "huber"
    """"huber" (elementwise, c = huber_c) or "l2"."""
    huber_c: float = 0.001
    """Huber constant."""
    target_ema_decay: float = 0.95
    """mu of the target network (full variant); LCM-LoRA always uses mu = 0."""
    timestep_scaling: float = 10.0
    """Boundary-condition timestep scaling (must match LCMScheduler's)."""
    sigma_data: float = 0.5
    """Boundary-condition sigma_data."""
    guidance_embed_dim: int = 256
    """Dimension of the guidance embedding (time_cond_proj_dim)."""
    lora_rank: int = 64
    """LoRA rank (variant lora)."""
    lora_alpha: float = 64.0
    """LoRA alpha (variant lora)."""
    lora_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    """Module-name suffixes that receive LoRA adapters."""
    sample_steps: int = 4
    """Default number of sampling steps of the exported student."""
    sample_guidance_scale: float = 8.0
    """Default Imagen guidance scale w given to the exported full student (embedded as w - 1); LoRA samples with 1."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""
    sample_max_timestep: int | None = None
    """Teacher timestep the exported sampler starts from (None: the top of the grid, T - 1). Lower it on teachers
    whose top is ill-conditioned for an eps-prediction student: with linear betas alpha(999) = 0.0064, so
    x0 = (x - sigma eps) / alpha multiplies the student's eps error by 157 there. Training is unchanged; the saved
    ``LCMScheduler`` gets ``original_inference_steps`` O with ``(T // O) O - 1`` equal to this value (O = t + 1 for
    t >= T / 2), so ``set_timesteps(n)`` in any stock pipeline, with or without a ``timesteps`` argument, starts there
    (see :func:`original_steps_starting_at`)."""


def lcm_solver_grid(num_train_timesteps: int, num_ddim_timesteps: int) -> Tensor:
    """``tau_j = k (j + 1) - 1`` for j = 0..N-1 with ``k = T // N`` (spec B.3: {19, 39, ..., 999})."""
    if num_train_timesteps % num_ddim_timesteps:
        raise ValueError(f"num_ddim_timesteps={num_ddim_timesteps} must divide the teacher's {num_train_timesteps} "
                         f"training timesteps")
    k = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * k - 1


def original_steps_starting_at(num_train_timesteps: int, start: int) -> int:
    """The ``original_inference_steps`` O whose ``LCMScheduler`` grid ``{k i - 1 : i = 1..O}``, ``k = T // O``, tops
    out at ``start`` (``set_timesteps(n)`` always begins at the grid's top): the largest O with ``k O - 1 = start``.
    For ``start >= T / 2`` that is O = start + 1 (k = 1, the grid is every integer 0..start). Raises ``ValueError``
    naming the nearest reachable starts when no O gives ``start``."""
    T, start = int(num_train_timesteps), int(start)
    if not 0 < start < T:
        raise ValueError(f"recipe.sample_max_timestep must lie in [1, {T - 1}] (the teacher's timesteps), got {start}")
    for o in range(T, 0, -1):
        if (T // o) * o - 1 == start:
            return o
    tops = sorted({(T // o) * o - 1 for o in range(1, T + 1)})
    near = sorted(tops, key=lambda v: abs(v - start))[:3]
    raise ValueError(f"recipe.sample_max_timestep={start}: no LCMScheduler original_inference_steps makes the sampler "
                     f"start at timestep {start}; "
                     f"nearest reachable starts: {sorted(near)} (every value >= {T // 2} is reachable)")


def lcm_boundary_scalings(t: Tensor, sigma_data: float = 0.5, timestep_scaling: float = 10.0) -> tuple[Tensor, Tensor]:
    """(c_skip, c_out) of LCM's consistency parameterization at integer timesteps ``t``."""
    st = t.to(torch.float64) * timestep_scaling
    c_skip = sigma_data**2 / (st**2 + sigma_data**2)
    c_out = st / torch.sqrt(st**2 + sigma_data**2)
    return c_skip.float(), c_out.float()


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    return v.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))


@register_recipe("lcm")
class LCMRecipe(Recipe):
    name = "lcm"
    options_class = LCMOptions

    def __init__(self, teacher: TeacherBundle, options: LCMOptions, device: torch.device | str = "cpu"):
        if not isinstance(teacher.denoiser.process, DiscreteVP):
            raise ValueError(f"LCM needs a discrete VP teacher (DDPM-style scheduler); this teacher's process is "
                             f"{teacher.denoiser.process.kind}. Use the sCM recipe for flow/TrigFlow teachers.")
        if options.variant not in ("full", "lora"):
            raise ValueError(f"recipe.variant must be 'full' or 'lora', got {options.variant!r}")
        if options.omega is None and not options.omega_min <= options.omega_max:
            raise ValueError(f"recipe.omega_min ({options.omega_min}) must not exceed recipe.omega_max ({options.omega_max})")
        self.options, self.teacher, self.device = options, teacher, torch.device(device)
        process = teacher.denoiser.process
        self.process = process
        self.grid = lcm_solver_grid(process.num_train_timesteps, options.num_ddim_timesteps)
        self.skip = process.num_train_timesteps // options.num_ddim_timesteps
        if options.sample_max_timestep is not None:  # fail before training, not at export
            original_steps_starting_at(process.num_train_timesteps, options.sample_max_timestep)
        freeze(teacher.denoiser.backbone)
        base = teacher.denoiser.backbone
        if options.variant == "lora":
            add_lora(base, options.lora_rank, options.lora_alpha, options.lora_targets)
            self.embeds_guidance = False
            student_backbone = base
            self.target = None
        else:
            seed = teacher.student_seed()
            self.embeds_guidance = type(unwrap(seed)).__name__ in ("UNet2DConditionModel", "ToyMLP")
            if self.embeds_guidance and type(unwrap(seed)).__name__ == "UNet2DConditionModel":
                student_backbone = with_guidance_embedding(seed, options.guidance_embed_dim)
            else:
                student_backbone = copy_backbone(seed)
                if self.embeds_guidance:
                    student_backbone.add_guidance_embedding()
            if not self.embeds_guidance and options.omega is None:
                raise ValueError(f"{type(unwrap(base)).__name__} has no guidance embedding; set recipe.omega to the one "
                                 f"guidance strength this student should learn")
            self.target = freeze(copy.deepcopy(student_backbone))
        student_backbone.to(self.device)
        self.student = Denoiser(student_backbone, process, teacher.student_prediction)
        self.target_denoiser = None if self.target is None else Denoiser(self.target.to(self.device), process,
                                                                         teacher.student_prediction)
        teacher.denoiser.to(self.device)
        self._sample_conditions = options.sample_conditions

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        return {"student": self.student.backbone}

    def optimizer_params(self):
        return {"student": [p for p in self.student.backbone.parameters() if p.requires_grad]}

    def set_prepared(self, name, module):
        self.student.backbone = module

    def _omega(self, n: int, generator: torch.Generator) -> Tensor:
        o = self.options
        if o.omega is not None:
            return torch.full((n,), float(o.omega))
        return draw_uniform(n, o.omega_min, o.omega_max, generator)

    def _teacher_ctx(self):
        if self.options.variant == "lora":
            return adapters_disabled(self.student.backbone)
        import contextlib

        return contextlib.nullcontext()

    def consistency(self, denoiser: Denoiser, z: Tensor, t: Tensor, cond, omega: Tensor | None) -> Tensor:
        """f(z, t) = c_skip(t) z + c_out(t) x0_hat(z, t)."""
        x0 = denoiser.predict(z, t, cond, want="x0", guidance_input=omega)["x0"]
        c_skip, c_out = lcm_boundary_scalings(t, self.options.sigma_data, self.options.timestep_scaling)
        return _bcast(c_skip, z) * z.float() + _bcast(c_out, z) * x0

    def training_step(self, batch, step, generator):
        dev = self.device
        x0 = self.teacher.codec.encode(batch["images"].to(dev))
        cond, uncond = self.teacher.encode_conditions(batch["conditions"], dev)
        n = x0.shape[0]
        j = torch.randint(0, len(self.grid), (n,), generator=generator)
        t1 = self.grid[j].to(dev)
        t0 = (t1 - self.skip).clamp(min=0)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        omega = self._omega(n, generator).to(dev)
        emb = omega if self.embeds_guidance else None
        z1 = self.process.add_noise(x0, noise, t1)

        pred = self.consistency(self.student, z1, t1, cond, emb)
        with torch.no_grad():
            with self._teacher_ctx():
                tp = self.teacher.denoiser.predict(z1, t1, cond, want=("x0", "eps"), cfg_scale=omega, uncond=uncond,
                                                   convention="lcm")
            z0 = ddim_step(tp["x0"], tp["eps"], self.process.coefficients(t0, like=tp["x0"]))
            target_net = self.target_denoiser if self.target_denoiser is not None else self.student
            target = self.consistency(target_net, z0, t0, cond, emb)
        loss = distance(self.options.loss, pred, target, self.options.huber_c)
        return StepOutput(losses={"student": loss}, logs={"loss": loss.detach(), "omega": omega.mean()})

    def after_optimizer_step(self, name, step):
        if self.target is not None:
            update_target_ema(self.target, unwrap(self.student.backbone), self.options.target_ema_decay)

    def state_dict_for_checkpoint(self):
        student = unwrap(self.student.backbone)
        if self.options.variant == "lora":
            return {"student_lora": {k: v for k, v in student.state_dict().items() if "lora_" in k}}
        return {"student": student.state_dict(), "target": self.target.state_dict()}

    def load_state_dict_from_checkpoint(self, state):
        student = unwrap(self.student.backbone)
        if self.options.variant == "lora":
            missing, unexpected = student.load_state_dict(state["student_lora"], strict=False)
            if unexpected or any("lora_" in k for k in missing):
                raise RuntimeError(f"LoRA checkpoint does not match the student: unexpected={unexpected[:5]}")
            return
        student.load_state_dict(state["student"])
        self.target.load_state_dict(state["target"])

    # ------------------------------------------------------------------ sampling and export
    def sampling_defaults(self) -> dict:
        o = self.options
        w = o.sample_guidance_scale if self.embeds_guidance else 1.0
        return {"num_inference_steps": o.sample_steps, "guidance_scale": w}

    def scheduler(self):
        from diffusers import LCMScheduler

        cfg = {k: v for k, v in self.teacher.scheduler_config.items() if not k.startswith("_")}
        start = self.options.sample_max_timestep
        original = (self.options.num_ddim_timesteps if start is None else
                    original_steps_starting_at(self.process.num_train_timesteps, start))
        cfg.update(original_inference_steps=original, timestep_scaling=self.options.timestep_scaling,
                   timestep_spacing="leading", prediction_type=diffusers_prediction_type(self.student.prediction))
        cfg.pop("clip_sample_range", None)
        return LCMScheduler.from_config(cfg)

    def sampling_timesteps(self, steps: int) -> list[int]:
        """The timesteps an n-step sample visits: the saved ``LCMScheduler``'s default ``set_timesteps(n)`` (for MLCM,
        the segment boundaries)."""
        sched = self.scheduler()
        sched.set_timesteps(steps)
        return [int(t) for t in sched.timesteps]

    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None):
        """Student samples with the stock ``LCMScheduler`` (the same update the exported pipeline runs)."""
        defaults = self.sampling_defaults()
        steps = steps or defaults["num_inference_steps"]
        w = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        sched = self.scheduler()
        sched.set_timesteps(steps, device=self.device)
        x = torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        omega = torch.full((num,), float(w) - 1.0, device=self.device) if self.embeds_guidance else None
        denoised = x
        for t in sched.timesteps:
            out = self.student.native(x, t, cond, omega)
            x, denoised = sched.step(out, t, x, generator=generator, return_dict=False)
        return self.teacher.codec.decode(denoised)

    def export(self, out_dir):
        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, export_full_student, export_lora_student

        extra = {"teacher": teacher_reference(self.teacher.pipeline)}
        notes = ""
        start = self.options.sample_max_timestep
        if start is not None:
            by_steps = {str(n): self.sampling_timesteps(n) for n in (1, 2, 4, 8)}
            extra["timesteps_by_steps"] = by_steps
            notes = (f"Sampled from timestep {start} (recipe.sample_max_timestep), not {self.process.num_train_timesteps - 1}: "
                     f"the scheduler's original_inference_steps = {self.scheduler().config.original_inference_steps} gives " +
                     ", ".join(f"{n} step(s): {ts}" for n, ts in by_steps.items()) + ".")
        spec = SamplingSpec(recipe="lcm", variant=self.options.variant, scheduler="LCMScheduler",
                            **self.sampling_defaults(), notes=notes, extra=extra)
        if self.options.variant == "lora":
            return export_lora_student(self.teacher, lora_state_dict(self.student.backbone), self.scheduler(), out_dir, spec)
        return export_full_student(self.teacher, unwrap(self.student.backbone), self.scheduler(), out_dir, spec)
