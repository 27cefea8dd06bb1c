"""VSD / SwiftBrush (Nguyen & Tran 2024), with SwiftBrushV2 and SNOOPI switches; spec B.7.

Image-free one-step distillation. Networks: the one-step student (a float32 copy of the teacher, or a few-step model
from ``student_init_path``: SwiftBrushV2 starts from SD-Turbo), the frozen teacher, and the fake score: peft LoRA on
the teacher's own backbone (rank 64, alpha 108, targets to_q / to_v; the teacher is the same module with the
adapters disabled) or, for the analytic toy teacher, a fully trained MLP (spec B.7 sanity check).

One step, both networks updated (1:1):

1. Student: ``z ~ N(0, I)`` labelled ``t* = 999``; ``x0_hat = X0(G(z, t*, c))`` (``(z - sigma_T eps_G) / alpha_T``
   for an eps-predicting UNet).
2. VSD (B.7 steps 1-4): ``t ~ U{20..980}``, ``x_t = alpha_t x0_hat + sigma_t eps``; ``eps_T`` = teacher with CFG w
   (4.5), ``eps_L`` = fake score (guided with the same w only when ``fake_cfg``, default off);
   ``g = nan_to_num(sigma_t^2 (eps_T - eps_L))``; ``L_VSD = 1/2 mean((x0_hat - sg(x0_hat - g))^2)``.
   SNOOPI (PG-SB, ``random_guidance``): w ~ U[w_min, w_max] per sample, used for the teacher and, when the fake
   score is guided, for the fake score too (PG-SB varies the scale of both "teachers").
   SwiftBrushV2 clamped CLIP loss (``clip_weight > 0``): ``lambda relu(margin - cos(E_img(D(x0_hat)), E_txt(c)))``
   on the decoded image (open_clip weights from a local file).
3. Fake score (B.7 fake-score step): ``t ~ U{0..T-1}`` on the *detached* x0_hat, the prompt replaced by the
   unconditional one with probability 0.1, loss ``mean((alpha_t (eps_phi - eps))^2)``.

SwiftBrushV2 weight merging (``merge_path``): the exported student is ``(1 - m) theta + m theta_other`` for another
student of the same architecture in a local Diffusers folder (e.g. the LoRA+CLIP student merged into the full one).

Sampling and export: one evaluation at t* on pure noise, x0 returned (the stock ``LCMScheduler`` with
``timesteps=[999]``: its c_skip at 999 is ~2.5e-9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..models.backbones import unwrap
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe
from .clip_loss import ClampedClipLoss
from .dmd2 import grid_scheduler
from .ode_regression import ODERegression, ODERegressionOptions
from .score_distill import annealed_range, build_generator_and_fake_score, discrete_vp_process, draw_timesteps, \
    drop_conditions, fake_denoising_loss, guided_predict, load_unet_from, sample_stats, surrogate_loss, vsd_gradient

__all__ = ["VSDOptions", "VSDRecipe", "merge_weights"]


@dataclass
class VSDOptions(ODERegressionOptions):
    """Options of the ``vsd`` recipe (``recipe.*`` keys). Defaults: SwiftBrush on SD2.1-base [code]."""

    guidance_scale: float = 4.5
    """Imagen CFG scale w of the teacher score (SwiftBrush 4.5; ProlificDreamer 7.5)."""
    fake_cfg: bool = False
    """Guide the fake score with the same w (SwiftBrush does; ProlificDreamer and DMD2 do not). Default off."""
    random_guidance: bool = False
    """SNOOPI PG-SB: draw w ~ U[guidance_min, guidance_max] per sample instead of the fixed guidance_scale."""
    guidance_min: float = 2.0
    """Lower end of the SNOOPI guidance range [choose]."""
    guidance_max: float = 8.0
    """Upper end of the SNOOPI guidance range [choose]."""
    conditioning_timestep: int = 999
    """t* the one-step student is labelled with (its input is pure noise)."""
    t_min: int = 20
    """VSD timesteps t ~ U{t_min .. t_max} (SwiftBrush 20..980; extreme t gives NaN)."""
    t_max: int = 980
    """Upper end of the VSD timestep range."""
    t_max_late: int | None = None
    """t annealing (ProlificDreamer: [0.02, 0.98]T, then [0.02, 0.5]T late in training): from update
    ``t_anneal_step`` on, the upper end of the VSD range is ``t_max_late`` (None = no annealing)."""
    t_anneal_step: int = 0
    """Update index at which ``t_max_late`` takes over."""
    fake_score: str = "lora"
    """"lora": LoRA on the teacher (one backbone in memory); "full": a trainable copy (the toy teacher needs this)."""
    fake_lora_rank: int = 64
    """LoRA rank of the fake score (SwiftBrush 64)."""
    fake_lora_alpha: float = 108.0
    """LoRA alpha of the fake score (SwiftBrush 108)."""
    fake_lora_targets: list[str] = field(default_factory=lambda: ["to_q", "to_v"])
    """Module-name suffixes with LoRA adapters (SwiftBrush: to_q, to_v)."""
    fake_cond_drop: float = 0.1
    """Probability of training the fake score on the unconditional prompt (CFG dropout)."""
    fake_loss_weighting: str = "alpha2"
    """"alpha2": mean((alpha_t (eps_phi - eps))^2) (SwiftBrush); "eps": plain eps-MSE; "v": 1/alpha_t^2 (toy)."""
    fake_lr: float | None = None
    """Learning rate of the fake score (and GAN head); None = train.lr (SwiftBrush: 1e-3 vs the student's 1e-6)."""
    fake_warmup_steps: int = 0
    """Steps at the start that update only the fake score (a freshly initialised toy fake score)."""
    student_init_path: str | None = None
    """SwiftBrushV2: initialise the student from this local few-step model (e.g. SD-Turbo) instead of the teacher."""
    clip_weight: float = 0.0
    """SwiftBrushV2 clamped CLIP loss weight (0 = off)."""
    clip_margin: float = 0.35
    """Cosine similarity above which the CLIP loss stops pushing [choose; unpublished in code]."""
    clip_model: str = "ViT-B-32"
    """open_clip architecture name of the CLIP weights."""
    clip_weights_path: str | None = None
    """Local open_clip checkpoint file (required when clip_weight > 0; nothing is downloaded)."""
    merge_path: str | None = None
    """SwiftBrushV2 weight merging: another student (local Diffusers folder) interpolated in at export."""
    merge_weight: float = 0.5
    """m in (1 - m) theta + m theta_other."""
    gradient_checkpointing: bool = False
    """Enable gradient checkpointing on the student (Diffusers backbones)."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""

    def validate(self) -> None:
        self.validate_regression()
        if not 0 <= self.t_min <= self.t_max:
            raise ValueError(f"need 0 <= recipe.t_min <= recipe.t_max, got {self.t_min}, {self.t_max}")
        if self.t_max_late is not None and not self.t_min <= self.t_max_late:
            raise ValueError(f"need recipe.t_min <= recipe.t_max_late, got {self.t_min}, {self.t_max_late}")
        if self.t_anneal_step < 0:
            raise ValueError(f"recipe.t_anneal_step must be >= 0, got {self.t_anneal_step}")
        if self.random_guidance and not self.guidance_min <= self.guidance_max:
            raise ValueError(f"recipe.guidance_min ({self.guidance_min}) must not exceed recipe.guidance_max "
                             f"({self.guidance_max})")
        if not 0 <= self.fake_cond_drop < 1:
            raise ValueError(f"recipe.fake_cond_drop must be in [0, 1), got {self.fake_cond_drop}")
        if not 0 <= self.merge_weight <= 1:
            raise ValueError(f"recipe.merge_weight must be in [0, 1], got {self.merge_weight}")


def merge_weights(state: dict[str, Tensor], other: dict[str, Tensor], m: float) -> dict[str, Tensor]:
    """SwiftBrushV2 weight-space interpolation ``(1 - m) theta + m theta_other`` over matching floating tensors."""
    if set(state) != set(other):
        diff = sorted(set(state) ^ set(other))[:5]
        raise ValueError(f"cannot merge students with different parameters (e.g. {diff}); merge_path must hold a "
                         f"student of the same architecture")
    out = {}
    for k, v in state.items():
        o = other[k]
        if v.shape != o.shape:
            raise ValueError(f"cannot merge {k}: shapes {tuple(v.shape)} and {tuple(o.shape)} differ")
        out[k] = torch.lerp(v.float(), o.to(v.device).float(), m).to(v.dtype) if v.is_floating_point() else v
    return out


@register_recipe("vsd")
class VSDRecipe(Recipe):
    name = "vsd"
    options_class = VSDOptions

    def __init__(self, teacher: TeacherBundle, options: VSDOptions, device: torch.device | str = "cpu"):
        options.validate()
        process = discrete_vp_process(teacher, "VSD")
        T = process.num_train_timesteps
        if not 0 <= options.conditioning_timestep < T or max(options.t_max, options.t_max_late or 0) >= T:
            raise ValueError(f"recipe.conditioning_timestep and recipe.t_max must be below the teacher's {T} timesteps")
        self.options, self.teacher, self.device, self.process = options, teacher, torch.device(device), process
        self.clip = ClampedClipLoss.from_options(options, self.device) if options.clip_weight > 0 else None
        self.student, self.fake = build_generator_and_fake_score(teacher, options, self.device)
        if options.gradient_checkpointing and hasattr(unwrap(self.student.backbone), "enable_gradient_checkpointing"):
            unwrap(self.student.backbone).enable_gradient_checkpointing()
        teacher.denoiser.to(self.device)
        # ODE pairs at the fixed guidance_scale (also with random_guidance: the pairs need one w)
        self.regression = ODERegression(options, teacher, process, options.guidance_scale,
                                        options.conditioning_timestep, self.fake.teacher_context) \
            if options.regression else None
        self._sample_conditions = options.sample_conditions

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        return {"student": self.student.backbone, "fake_score": self.fake.denoiser.backbone}

    def optimizer_params(self):
        fake = self.fake.trainable_parameters()
        fake = [{"params": fake, "lr": self.options.fake_lr}] if self.options.fake_lr is not None else fake
        return {"student": [p for p in self.student.backbone.parameters() if p.requires_grad], "fake_score": fake}

    def set_prepared(self, name, module):
        if name == "student":
            self.student.backbone = module
        else:
            self.fake.denoiser.backbone = module

    def _guidance(self, n: int, generator: torch.Generator):
        o = self.options
        if o.random_guidance:
            return (o.guidance_min + (o.guidance_max - o.guidance_min) * torch.rand(n, generator=generator)).to(self.device)
        return float(o.guidance_scale)

    def student_updates(self, step: int) -> bool:
        """Whether update ``step`` trains the student: every step of the regression warm-up, then every step after
        the fake-score warm-up (which counts from the end of the regression warm-up)."""
        o = self.options
        return step < o.regression_warmup_steps or step - o.regression_warmup_steps >= o.fake_warmup_steps

    def student_x0(self, n: int, cond, generator: torch.Generator) -> Tensor:
        z = torch.randn((n, *self.teacher.sample_shape), generator=generator).to(self.device)
        return self._x0_from_noise(z, cond)

    def _x0_from_noise(self, z: Tensor, cond) -> Tensor:
        t = torch.full((z.shape[0],), self.options.conditioning_timestep, device=self.device)
        return self.student.predict(z, t, cond, want="x0")["x0"]

    def t_range(self, step: int | None = None) -> tuple[int, int]:
        """The VSD timestep range at update ``step`` (``t_max_late`` from ``t_anneal_step`` on)."""
        o = self.options
        return annealed_range(o.t_min, o.t_max, o.t_max_late, o.t_anneal_step, step)

    def vsd_loss(self, x0: Tensor, cond, uncond, generator: torch.Generator,
                 step: int | None = None) -> tuple[Tensor, dict]:
        """L_VSD of spec B.7 (steps 1-4) and its diagnostics."""
        n = x0.shape[0]
        w = self._guidance(n, generator)
        t = draw_timesteps(n, *self.t_range(step), generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        with torch.no_grad():
            x_t = self.process.add_noise(x0.detach(), noise, t)
            with self.fake.teacher_context():
                eps_t = guided_predict(self.teacher.denoiser, x_t, t, cond, uncond, w, "eps")["eps"]
            eps_l = guided_predict(self.fake.denoiser, x_t, t, cond, uncond, w if self.options.fake_cfg else 1.0,
                                   "eps")["eps"]
            sigma = self.process.coefficients(t, like=x_t).sigma
            g = vsd_gradient(eps_t, eps_l, sigma)
        logs = {"vsd/grad_abs_mean": g.abs().mean()}
        if torch.is_tensor(w):
            logs["vsd/guidance_mean"] = w.mean()
        return surrogate_loss(x0, g), logs

    def training_step(self, batch, step, generator):
        o, dev = self.options, self.device
        self.remember_conditions(batch)
        conditions = batch["conditions"]
        cond, uncond = self.teacher.encode_conditions(conditions, dev)
        n = cond.batch_size or len(conditions)
        regressing = self.regression is not None and self.regression.warming_up(step)
        update_student = self.student_updates(step)
        if self.regression is not None:
            self.regression.fill(cond, uncond, generator, dev)
        with torch.set_grad_enabled(update_student and not regressing):
            x0 = self.student_x0(n, cond, generator)
        logs = dict(sample_stats(x0))
        losses = {}
        loss_reg = None if self.regression is None else \
            self.regression.student_term(step, update_student, self._x0_from_noise, n, generator, dev, logs)
        if regressing:
            losses["student"] = loss_reg
        elif update_student:
            loss_s, vlogs = self.vsd_loss(x0, cond, uncond, generator, step)
            logs.update(vlogs)
            logs["loss_vsd"] = loss_s.detach()
            if self.clip is not None:
                clip = self.clip(self.teacher.codec, x0, conditions)
                logs["loss_clip"] = clip.detach()
                loss_s = loss_s + o.clip_weight * clip
            if loss_reg is not None:
                loss_s = loss_s + o.regression_weight * loss_reg
            losses["student"] = loss_s
        t_f = draw_timesteps(n, 0, self.process.num_train_timesteps - 1, generator).to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        cond_f = drop_conditions(cond, uncond, o.fake_cond_drop, generator)
        loss_f = fake_denoising_loss(self.fake.denoiser, x0.detach(), cond_f, t_f, noise, o.fake_loss_weighting)
        logs["loss_fake_denoise"] = loss_f.detach()
        losses["fake_score"] = loss_f
        return StepOutput(losses=losses, logs=logs)

    def state_dict_for_checkpoint(self):
        state = {"student": unwrap(self.student.backbone).state_dict(), "fake_score": self.fake.state_dict()}
        if self.regression is not None and self.regression.pool.count:
            state["ode_pairs"] = self.regression.pool.state_dict()
        return state

    def load_state_dict_from_checkpoint(self, state):
        unwrap(self.student.backbone).load_state_dict(state["student"])
        self.fake.load_state_dict(state["fake_score"])
        if self.regression is not None and "ode_pairs" in state:
            self.regression.pool.load_state_dict(state["ode_pairs"])

    # ------------------------------------------------------------------ sampling and export
    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None):
        """One-step samples: ``randn`` from ``generator``, one student evaluation at t*, x0. The guidance is
        distilled in; a ``guidance_scale`` other than the trained one is an error, and so is ``steps`` > 1."""
        o = self.options
        if steps not in (None, 1):
            raise ValueError(f"the VSD student is a one-step generator; got steps={steps}")
        if guidance_scale is not None and not o.random_guidance and float(guidance_scale) != float(o.guidance_scale):
            raise ValueError(f"this VSD student was distilled at guidance_scale={o.guidance_scale}; it cannot sample "
                             f"at {guidance_scale} (retrain with recipe.guidance_scale={guidance_scale})")
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        return self.teacher.codec.decode(self.student_x0(num, cond, generator))

    def export_state(self) -> dict[str, Tensor]:
        """The student weights to export, merged with ``merge_path`` when configured (SwiftBrushV2)."""
        net = unwrap(self.student.backbone)
        state = net.state_dict()
        if self.options.merge_path:
            other = load_unet_from(self.options.merge_path, net).state_dict()
            state = merge_weights(state, other, self.options.merge_weight)
        return state

    def export(self, out_dir):
        import copy

        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, export_full_student

        net = unwrap(self.student.backbone)
        if self.options.merge_path:
            net = copy.deepcopy(net)
            net.load_state_dict(self.export_state())
        t = self.options.conditioning_timestep
        sched, by_steps = grid_scheduler(self.teacher, self.student.prediction, [t])
        spec = SamplingSpec(recipe="vsd", num_inference_steps=1, guidance_scale=1.0, scheduler="LCMScheduler",
                            timesteps=[t], timesteps_from_steps=by_steps,
                            notes=f"One step at t={t} on pure noise; no CFG (distilled in).",
                            extra={"teacher": teacher_reference(self.teacher.pipeline)})
        return export_full_student(self.teacher, net, sched, out_dir, spec)
