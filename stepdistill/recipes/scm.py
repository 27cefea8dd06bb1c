"""sCM / sCD: continuous-time consistency distillation in TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and
Scaling Continuous-Time Consistency Models"), spec B.6.

TrigFlow: ``x_t = cos t x0 + sin t z``, ``z ~ N(0, sigma_d^2 I)``, t in [0, pi/2]. The student is the consistency
function (sCM Eq. 6 with c_skip = cos t, c_out = -sin t sigma_d)

    ``f_theta(x_t, t) = cos t x_t - sin t sigma_d F_theta(x_t / sigma_d, t)``

so ``f(x, 0) = x`` exactly. sCD trains it with the tangent of the teacher's PF-ODE ``dx_t/dt = sigma_d F_T(x_t /
sigma_d, t)`` (CFG in F space, Imagen convention):

1. ``t = arctan(e^tau / sigma_d)``, ``tau ~ N(P_mean, P_std^2)``; on a discrete teacher t is snapped to the nearest
   teacher timestep (in log-SNR), so the frozen teacher only ever sees its integer timesteps (spec A.1);
2. ``(F^-, J) = jvp(F_theta^-, (x_t / sigma_d, t), (cos t sin t dx/dt / sigma_d, cos t sin t))`` under no_grad, so
   ``J = cos t sin t dF^-/dt`` (sCM Sec. 4.1, the JVP-rearranged tangent);
3. ``g = -cos^2 t (sigma_d F^- - dx/dt) - r (cos t sin t x_t + sigma_d J)`` (= cos t df^-/dt up to the warmup
   r = min(1, step / tangent_warmup)), then ``g <- g / (||g|| + c)`` per sample (tangent normalisation, c = 0.1);
4. ``L = mean_n[ w(t) e^{-u_phi(t)} mean_d (F_theta - F^- - g)^2 + u_phi(t) ]`` with the prior weight
   ``w(t) = 1 / (sigma_d tan t)`` and the adaptive weight (logvar) head u_phi (sCM Eq. 8; EDM2-style: a linear layer
   on fixed Fourier features of t, zero-initialised).

Teachers are converted to TrigFlow exactly (:class:`TrigFlowNetwork`): equal SNR gives
``sigma_P(s) / alpha_P(s) = sigma_d tan t`` and ``x_P = (alpha_P(s) / cos t) x_t``; the native output converts to
(x0, eps) and ``F = cos t eps - sin t x0 / sigma_d``. On VP: ``alpha = cos t / sqrt(cos^2 t + sigma_d^2 sin^2 t)``;
on rectified flow: ``s = sigma_d sin t / (cos t + sigma_d sin t)``, ``x_P = x_t / (cos t + sigma_d sin t)`` (SANA-
Sprint's training-free flow->TrigFlow transform at sigma_d = 1). The student is the same wrapper around a trainable
copy of the teacher backbone ("teacher" parameterization, it starts equal to the teacher; the backbone's timestep
is then continuous, e.g. a fractional DDPM index interpolated in log-SNR) or, for fresh toy students, a backbone
that outputs F directly from ``(x_t / sigma_d, time_scale * t)`` ("trigflow"). Either way the consistency function
equals the wrapped network's x0 prediction, which is what lets stock schedulers sample the exported student.

Samplers (sCM Sec. 2): x ~ N(0, sigma_d^2 I) at t_max; 1 step ``x0 = f(x, t_max)``; 2 steps re-noise to t_mid
(1.1 in the sCM paper, 1.3 in SANA-Sprint) and apply f again; N steps on ``linspace(t_max, 0, N + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..diffusion.parameterization import to_x0_eps
from ..diffusion.processes import (EDM, CosineVP, DiscreteVP, NoiseProcess, PathCoefficients, RectifiedFlow, TrigFlow,
                                   diffusers_prediction_type)
from ..models.backbones import call_backbone, detect_family, unwrap
from ..models.conditioning import Conditioning
from ..models.jvp_attention import enable_jvp_attention
from ..models.student import copy_backbone, freeze
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe

__all__ = ["SCMOptions", "SCMRecipe", "TrigFlowNetwork", "AdaptiveWeightHead", "trigflow_coordinates",
           "trigflow_time_of", "scm_sampling_times", "scm_tangent"]


@dataclass
class SCMOptions:
    """Options of the ``scm`` recipe (``recipe.*`` keys in a run config)."""

    sigma_data: float = 0.5
    """TrigFlow sigma_d (sCM: 0.5). Use 1.0 for students exported to SanaSprintPipeline (its RF input convention)."""
    p_mean: float = -1.0
    """Mean of tau in t = arctan(e^tau / sigma_d) (sCM CIFAR-10: -1.0; SANA-Sprint: 0.2)."""
    p_std: float = 1.4
    """Std of tau (sCM CIFAR-10: 1.4; SANA-Sprint: 1.6)."""
    guidance_scale: float = 1.0
    """Teacher CFG scale w (Imagen convention, applied to F) that the student distils; 1 = no guidance."""
    tangent_warmup: int = 10000
    """Updates over which r ramps 0 -> 1 (sCM: 10k; SANA-Sprint: 4000); 0 = no warmup."""
    tangent_norm_c: float = 0.1
    """c of the tangent normalisation g / (||g|| + c); set < 0 to disable."""
    adaptive_weight: bool = True
    """Learn the logvar head u_phi(t); False = fixed weight w(t) only."""
    logvar_features: int = 128
    """Fourier features of the logvar head."""
    parameterization: str = "auto"
    """"teacher": student = trainable copy of the teacher backbone behind the exact TrigFlow conversion (starts equal
    to the teacher); "trigflow": a backbone that outputs F from (x_t/sigma_d, time_scale*t) (fresh toy students);
    "auto": "teacher" when the teacher can seed the student, else "trigflow"."""
    time_scale: float = 1.0
    """c_noise(t) = time_scale * t for "trigflow" students (sCM: identity; large scales blow up dF/dt)."""
    student_prediction: str = "teacher"
    """Output kind of a "teacher"-parameterized student: "teacher" (the teacher's own) or "eps" / "x0" / "v". On a
    linear-beta VP teacher an eps student's x0 = (x - sigma eps) / alpha is ill-conditioned near the top
    (alpha(999) = 0.0064 multiplies eps errors by 157, and F's tangent carries d(1/alpha)/dt); a v student's
    x0 = alpha x - sigma v is bounded everywhere, like TrigFlow's own F (a v-type target, sCM Sec. 2). The student
    still starts from the teacher's weights with its output read as the new kind, so ``reparam_steps`` of denoising
    fine-tuning in that kind come first; the export's scheduler gets the matching ``prediction_type``."""
    reparam_steps: int = 0
    """Updates of plain denoising score matching on the data in ``student_prediction`` form (loss
    ``||out - target(x0, eps)||^2`` at a uniformly drawn teacher timestep) before sCD starts; the tangent warmup
    counts from the end of them. Discrete VP teachers only."""
    t_max: float | None = None
    """Sampling start time; default: the teacher's noisiest time in TrigFlow (pi/2 for rectified flow)."""
    t_mid: float = 1.1
    """Intermediate time of the 2-step sampler (sCM paper: 1.1; SANA-Sprint pipeline: 1.3)."""
    sample_steps: int = 2
    """Default number of sampling steps."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""


# ------------------------------------------------------------------------------------------------ TrigFlow maps


def _teacher_kind(process: NoiseProcess) -> str:
    if isinstance(process, (DiscreteVP, CosineVP)):
        return "vp"
    if isinstance(process, RectifiedFlow):
        return "rf"
    if isinstance(process, EDM):
        return "edm"
    if isinstance(process, TrigFlow):
        return "trigflow"
    raise ValueError(f"sCM cannot convert a {type(process).__name__} teacher to TrigFlow (supported: discrete or cosine "
                     f"VP, rectified flow, EDM, TrigFlow)")


def trigflow_time_of(process: NoiseProcess, t_native: Tensor, sigma_data: float) -> Tensor:
    """The TrigFlow time with the same SNR as native time ``t_native``: ``arctan(sigma / (sigma_d alpha))`` (float64)."""
    if isinstance(process, TrigFlow):
        return torch.atan(process.sigma(t_native) / (sigma_data * process.alpha(t_native)))
    return torch.atan2(process.sigma(t_native), sigma_data * process.alpha(t_native))


def _vp_fractional_index(process: DiscreteVP, log_snr: Tensor) -> Tensor:
    """Continuous DDPM index with half log-SNR ``log_snr``: linear interpolation of the table (clamped to it)."""
    table = process.eta(torch.arange(process.num_train_timesteps)).to(dtype=log_snr.dtype, device=log_snr.device)
    rising = -table
    x = (-log_snr).clamp(rising[0], rising[-1])
    hi = torch.searchsorted(rising.detach(), x.detach()).clamp(1, len(rising) - 1)
    lo = hi - 1
    frac = (x - rising[lo]) / (rising[hi] - rising[lo])
    return lo.to(x.dtype) + frac


def trigflow_coordinates(process: NoiseProcess, t: Tensor, sigma_data: float):
    """For TrigFlow times ``t`` (any float dtype, differentiable): ``(scale, coefficients, model_timestep)`` of the
    native process at equal SNR, with ``x_native = scale * x_t`` and ``coefficients`` its (alpha, sigma[, d/ds]).

    The time and scale conversions are smooth in t, so JVPs in t pass through them.
    """
    kind = _teacher_kind(process)
    cos, sin = torch.cos(t), torch.sin(t)
    sd = sigma_data
    if kind == "vp":
        norm = torch.sqrt(cos * cos + (sd * sin) ** 2)
        alpha, sigma = cos / norm, sd * sin / norm
        log_snr = torch.log(cos) - torch.log(sd * sin)
        if isinstance(process, DiscreteVP):
            ts = _vp_fractional_index(process, log_snr)
        else:
            u = (torch.atan2(sigma, alpha) - process.b) / process.a
            ts = 1000.0 * u
        return 1.0 / norm, PathCoefficients(alpha, sigma), ts
    if kind == "rf":
        den = cos + sd * sin
        s = sd * sin / den
        one = torch.ones_like(s)
        return 1.0 / den, PathCoefficients(1.0 - s, s, -one, one), process.num_train_timesteps * s
    if kind == "edm":
        sigma = sd * sin / cos
        return 1.0 / cos, PathCoefficients(torch.ones_like(sigma), sigma), 0.25 * torch.log(sigma)
    # TrigFlow teacher with its own sigma_d': same SNR at t' = arctan(sigma_d tan t / sigma_d')
    sd2 = process.sigma_data
    t2 = torch.atan2(sd * sin, sd2 * cos)
    alpha = torch.cos(t2)
    return alpha / cos, PathCoefficients(alpha, sd2 * torch.sin(t2), -torch.sin(t2), sd2 * torch.cos(t2)), t2


def _bc(v: Tensor, like: Tensor) -> Tensor:
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


class TrigFlowNetwork(nn.Module):
    """``F(x_t / sigma_d, t)`` of a backbone, in TrigFlow (see the module docstring).

    ``mode="teacher"``: ``backbone`` predicts ``prediction`` on ``process``; its input and output are converted
    exactly. ``mode="trigflow"``: ``backbone`` outputs F itself from ``(x_t / sigma_d, time_scale * t)``.
    Conversions run in ``promote(x.dtype, float32)``; the backbone's timestep stays in that precision (fp32 time
    embedding input, never the model's half dtype).
    """

    def __init__(self, backbone: nn.Module, process: NoiseProcess, prediction: str, sigma_data: float,
                 mode: str = "teacher", time_scale: float = 1.0, family: str | None = None):
        super().__init__()
        if mode not in ("teacher", "trigflow"):
            raise ValueError(f"TrigFlowNetwork mode must be 'teacher' or 'trigflow', got {mode!r}")
        if family == "analytic" or detect_family(backbone) == "analytic":
            raise ValueError("the analytic toy teacher is not differentiable in a way sCM students can use; "
                             "use its make_student() backbone")
        self.backbone, self.process, self.prediction = backbone, process, prediction
        self.sigma_data, self.mode, self.time_scale = float(sigma_data), mode, float(time_scale)
        self.family = family or detect_family(backbone)
        if mode == "teacher":
            _teacher_kind(process)

    def _dtype(self) -> torch.dtype:
        for p in self.backbone.parameters():
            return p.dtype
        return torch.float32

    def forward(self, x_in: Tensor, t: Tensor, cond: Conditioning | None = None, guidance=None) -> Tensor:
        cond = cond or Conditioning()
        ct = torch.promote_types(x_in.dtype, torch.float32)
        x_in = x_in.to(ct)
        t = torch.as_tensor(t, device=x_in.device).to(ct).expand(x_in.shape[0])
        dtype = self._dtype()
        cond = cond.to(dtype=dtype)
        if self.mode == "trigflow":
            out = call_backbone(self.family, self.backbone, x_in.to(dtype), self.time_scale * t, cond, guidance)
            return out.to(ct)
        # clamp away from the two ends where a native conversion would divide by zero (alpha or sigma = 0);
        # f(x, 0) = cos(0) x - sin(0) sigma_d F = x holds exactly all the same.
        tc = t.clamp(1e-6, math.pi / 2 - 1e-6)
        scale, c, ts = trigflow_coordinates(self.process, tc, self.sigma_data)
        x_t = self.sigma_data * x_in
        x_nat = _bc(scale, x_t) * x_t
        out = call_backbone(self.family, self.backbone, x_nat.to(dtype), ts, cond, guidance).to(ct)
        coeffs = PathCoefficients(*(None if v is None else _bc(v, x_t) for v in (c.alpha, c.sigma, c.d_alpha, c.d_sigma)))
        x0, eps = to_x0_eps(out, self.prediction, x_nat, coeffs, getattr(self.process, "sigma_data", None))
        cos, sin = _bc(torch.cos(tc), x_t), _bc(torch.sin(tc), x_t)
        return cos * eps - sin * x0 / self.sigma_data


def consistency_function(F_out: Tensor, x_t: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """``f(x_t, t) = cos t x_t - sin t sigma_d F`` (sCM Eq. 6)."""
    return _bc(torch.cos(t), x_t) * x_t - _bc(torch.sin(t), x_t) * sigma_data * F_out


class AdaptiveWeightHead(nn.Module):
    """The adaptive-weight (logvar) head ``u_phi(t)``: a zero-initialised linear layer on fixed Fourier features of
    ``log(sigma_d tan t) / 4`` (EDM2's logvar head on its noise embedding; sCM Eq. 8 learns it jointly)."""

    def __init__(self, features: int = 128, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("freqs", 2 * math.pi * torch.randn(features, generator=g))
        self.register_buffer("phases", 2 * math.pi * torch.rand(features, generator=g))
        self.linear = nn.Linear(features, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: Tensor, sigma_data: float) -> Tensor:
        c_noise = 0.25 * torch.log(sigma_data * torch.tan(t.float().clamp(1e-4, math.pi / 2 - 1e-4)))
        feats = math.sqrt(2.0) * torch.cos(c_noise[:, None] * self.freqs[None] + self.phases[None])
        return self.linear(feats).squeeze(1)


def scm_sampling_times(steps: int, t_max: float, t_mid: float | None) -> list[float]:
    """The times at which the N-step sampler evaluates f: [t_max] (1 step), [t_max, t_mid] (2 steps), else
    ``linspace(t_max, 0, N + 1)[:-1]``."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps == 1:
        return [t_max]
    if steps == 2 and t_mid is not None:
        if not 0 < t_mid < t_max:
            raise ValueError(f"t_mid={t_mid} must lie in (0, t_max={t_max})")
        return [t_max, t_mid]
    return torch.linspace(t_max, 0, steps + 1, dtype=torch.float64)[:-1].tolist()


def scm_tangent(F_minus: Tensor, jvp_out: Tensor, dxdt: Tensor, x_t: Tensor, t: Tensor, sigma_data: float, r: float,
                norm_c: float) -> tuple[Tensor, Tensor]:
    """(normalised g, raw per-sample ||g||): ``g = -cos^2 t (sigma_d F^- - dx/dt) - r (cos t sin t x_t + sigma_d J)``,
    ``g / (||g|| + c)`` (spec B.6; no normalisation when ``norm_c < 0``)."""
    cos, sin = _bc(torch.cos(t), x_t), _bc(torch.sin(t), x_t)
    g = -cos * cos * (sigma_data * F_minus - dxdt) - r * (cos * sin * x_t + sigma_data * jvp_out)
    norm = g.flatten(1).norm(dim=1)
    if norm_c >= 0:
        g = g / _bc(norm + norm_c, g)
    return g, norm


# ------------------------------------------------------------------------------------------------ recipe


@register_recipe("scm")
class SCMRecipe(Recipe):
    name = "scm"
    options_class = SCMOptions

    def __init__(self, teacher: TeacherBundle, options: SCMOptions, device: torch.device | str = "cpu"):
        o = options
        if o.sigma_data <= 0:
            raise ValueError(f"recipe.sigma_data must be > 0, got {o.sigma_data}")
        if o.parameterization not in ("auto", "teacher", "trigflow"):
            raise ValueError(f"recipe.parameterization must be 'auto', 'teacher' or 'trigflow', got {o.parameterization!r}")
        self.options, self.teacher, self.device = o, teacher, torch.device(device)
        self.process = teacher.denoiser.process
        _teacher_kind(self.process)
        self.discrete = isinstance(self.process, DiscreteVP)
        freeze(teacher.denoiser.backbone)
        teacher.denoiser.to(self.device)
        seed_from_teacher = teacher.make_student is None
        mode = o.parameterization
        if mode == "auto":
            mode = "teacher" if seed_from_teacher else "trigflow"
        seed = teacher.denoiser.backbone if seed_from_teacher else teacher.make_student()
        if mode == "trigflow" and hasattr(seed, "time_scale"):
            seed.time_scale = 1.0  # the TrigFlowNetwork applies recipe.time_scale itself
        if o.student_prediction not in ("teacher", "eps", "x0", "v"):
            raise ValueError(f"recipe.student_prediction must be 'teacher', 'eps', 'x0' or 'v', got "
                             f"{o.student_prediction!r}")
        if o.reparam_steps < 0:
            raise ValueError(f"recipe.reparam_steps must be >= 0, got {o.reparam_steps}")
        if o.student_prediction != "teacher" and (mode != "teacher" or not self.discrete):
            raise ValueError("recipe.student_prediction applies to 'teacher'-parameterized students of discrete VP "
                             "(DDPM-style) teachers; leave it at 'teacher' here")
        if o.reparam_steps and o.student_prediction in ("teacher", teacher.student_prediction):
            raise ValueError(f"recipe.reparam_steps={o.reparam_steps} fine-tunes the student into a new output kind; "
                             f"set recipe.student_prediction (e.g. 'v') to one other than the teacher's "
                             f"{teacher.student_prediction!r}, or set reparam_steps to 0")
        if mode != "teacher":
            prediction = "trigflow"
        else:
            prediction = teacher.student_prediction if o.student_prediction == "teacher" else o.student_prediction
        backbone = copy_backbone(seed).to(self.device)
        self.jvp_replaced = enable_jvp_attention(backbone)  # JVP-capable attention, chosen automatically
        self.mode = mode
        self.student = TrigFlowNetwork(backbone, self.process, prediction, o.sigma_data, mode, o.time_scale)
        self.logvar = AdaptiveWeightHead(o.logvar_features).to(self.device) if o.adaptive_weight else None
        if self.discrete:
            idx = torch.arange(self.process.num_train_timesteps)
            self.grid_t = trigflow_time_of(self.process, idx, o.sigma_data)  # float64, increasing in the index
        self.t_max = o.t_max if o.t_max is not None else self._teacher_t_max()
        self._sample_conditions = o.sample_conditions

    def _teacher_t_max(self) -> float:
        p = self.process
        if self.discrete:
            return float(self.grid_t[-1])
        if isinstance(p, RectifiedFlow):
            return math.pi / 2
        return float(trigflow_time_of(p, torch.tensor(p.t_max, dtype=torch.float64), self.options.sigma_data))

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        mods = {"student": self.student.backbone}
        if self.logvar is not None:
            mods["logvar"] = self.logvar
        return mods

    def optimizer_params(self):
        params = [p for p in self.student.backbone.parameters() if p.requires_grad]
        if self.logvar is not None:
            params = [{"params": params}, {"params": list(self.logvar.parameters())}]
        return {"student": params}

    def ema_modules(self):
        return ["student"]

    def set_prepared(self, name, module):
        if name == "student":
            self.student.backbone = module
        else:
            self.logvar = module

    def draw_times(self, n: int, generator: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """sCM's log-normal proposal ``t = arctan(e^tau / sigma_d)``; on a discrete teacher snapped to the nearest
        teacher timestep in log-SNR. Returns (t float64, teacher index or None)."""
        o = self.options
        tau = o.p_mean + o.p_std * torch.randn(n, generator=generator, dtype=torch.float64)
        t = torch.atan(torch.exp(tau) / o.sigma_data)
        if not self.discrete:
            lo = 1e-4
            return t.clamp(lo, self.t_max), None
        log_tan = torch.log(torch.tan(self.grid_t))
        idx = (log_tan[None, :] - torch.log(torch.tan(t))[:, None]).abs().argmin(dim=1)
        return self.grid_t[idx], idx

    def teacher_velocity(self, x_t: Tensor, t: Tensor, idx: Tensor | None, cond, uncond) -> Tensor:
        """``dx_t/dt = sigma_d F_T^w(x_t / sigma_d, t)``: the teacher's guided PF-ODE velocity in TrigFlow."""
        o = self.options
        den = self.teacher.denoiser
        tt = t.to(torch.float64)
        if self.discrete:
            c = self.process.coefficients(idx)
            scale, ts = c.alpha / torch.cos(tt), idx.to(x_t.device)
        else:
            scale, _, _ = trigflow_coordinates(self.process, tt, o.sigma_data)
            ts = self._native_time(tt)
        x_nat = _bc(scale.to(x_t), x_t) * x_t
        kw = {} if o.guidance_scale == 1.0 else {"cfg_scale": o.guidance_scale, "uncond": uncond,
                                                  "convention": "imagen"}
        pred = den.predict(x_nat, ts, cond, want=("x0", "eps"), **kw)
        cos, sin = _bc(torch.cos(tt).to(x_t), x_t), _bc(torch.sin(tt).to(x_t), x_t)
        return o.sigma_data * (cos * pred["eps"] - sin * pred["x0"] / o.sigma_data)

    def _native_time(self, t: Tensor) -> Tensor:
        """Native process time at TrigFlow time t (continuous teachers)."""
        p, sd = self.process, self.options.sigma_data
        if isinstance(p, RectifiedFlow):
            return sd * torch.sin(t) / (torch.cos(t) + sd * torch.sin(t))
        if isinstance(p, EDM):
            return sd * torch.tan(t)
        if isinstance(p, CosineVP):
            return (torch.atan(sd * torch.tan(t)) - p.b) / p.a
        return torch.atan(sd * torch.tan(t) / p.sigma_data)  # TrigFlow teacher

    def warmup_ratio(self, step: int) -> float:
        w = self.options.tangent_warmup
        step = step - self.options.reparam_steps
        return 1.0 if w <= 0 else min(1.0, max(step, 0) / w)

    def reparam_loss(self, x0: Tensor, cond, generator: torch.Generator) -> Tensor:
        """Denoising score matching in the student's output kind (the ``reparam_steps`` stage): at a uniformly drawn
        teacher index i, ``x_i = alpha_i x0 + sigma_i eps`` and the backbone's output regresses the kind's target
        (v: ``alpha_i eps - sigma_i x0``, Salimans & Ho 2022 eq. 9-10)."""
        from ..diffusion.parameterization import from_x0_eps

        n = x0.shape[0]
        idx = torch.randint(0, self.process.num_train_timesteps, (n,), generator=generator).to(x0.device)
        eps = torch.randn(x0.shape, generator=generator).to(x0.device)
        c = self.process.coefficients(idx, like=x0)
        x_nat = c.alpha * x0 + c.sigma * eps
        net = self.student
        out = call_backbone(net.family, net.backbone, x_nat.to(net._dtype()), idx, cond.to(dtype=net._dtype()))
        target = from_x0_eps(x0, eps, net.prediction, c)
        return ((out.float() - target) ** 2).mean()

    def training_step(self, batch, step, generator):
        o, dev = self.options, self.device
        x0 = self.teacher.codec.encode(batch["images"].to(dev)).float()
        cond, uncond = self.teacher.encode_conditions(batch["conditions"], dev)
        n = x0.shape[0]
        if step < o.reparam_steps:
            loss = self.reparam_loss(x0, cond, generator)
            return StepOutput(losses={"student": loss}, logs={"loss_reparam": loss.detach()})
        t64, idx = self.draw_times(n, generator)
        z = o.sigma_data * torch.randn(x0.shape, generator=generator).to(dev)
        t = t64.float().to(dev)
        x_t = _bc(torch.cos(t), x0) * x0 + _bc(torch.sin(t), x0) * z
        with torch.no_grad():
            dxdt = self.teacher_velocity(x_t, t64.to(dev), idx, cond, uncond)
            r = self.warmup_ratio(step)
            cs = torch.cos(t) * torch.sin(t)
            v_x, v_t = _bc(cs, x_t) * dxdt / o.sigma_data, cs
            net = self.student
            F_minus, J = torch.func.jvp(lambda xi, tt: net(xi, tt, cond), (x_t / o.sigma_data, t), (v_x, v_t))
            g, g_norm = scm_tangent(F_minus, J, dxdt, x_t, t, o.sigma_data, r, o.tangent_norm_c)
        F_theta = self.student(x_t / o.sigma_data, t, cond)
        prior = 1.0 / (o.sigma_data * torch.tan(t))
        per_sample = ((F_theta - F_minus - g) ** 2).flatten(1).mean(dim=1)
        if self.logvar is not None:
            u = self.logvar(t, o.sigma_data)
            loss = (prior * torch.exp(-u) * per_sample + u).mean()
        else:
            u = torch.zeros_like(t)
            loss = (prior * per_sample).mean()
        return StepOutput(losses={"student": loss},
                          logs={"loss": loss.detach(), "g_norm": g_norm.mean(), "r": r, "logvar": u.detach().mean()})

    def state_dict_for_checkpoint(self):
        out = {"student": unwrap(self.student.backbone).state_dict()}
        if self.logvar is not None:
            out["logvar"] = unwrap(self.logvar).state_dict()
        return out

    def load_state_dict_from_checkpoint(self, state):
        unwrap(self.student.backbone).load_state_dict(state["student"])
        if self.logvar is not None and "logvar" in state:
            unwrap(self.logvar).load_state_dict(state["logvar"])

    # ------------------------------------------------------------------ sampling and export
    def consistency(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        """``f_theta(x_t, t)``."""
        F_out = self.student(x_t / self.options.sigma_data, t, cond)
        return consistency_function(F_out, x_t.to(F_out.dtype), torch.as_tensor(t).to(F_out), self.options.sigma_data)

    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None,
               t_max: float | None = None, t_mid: float | None = None):
        """sCM samples: x ~ N(0, sigma_d^2 I) at t_max (the first draw from ``generator``), then f at each sampler
        time with fresh noise re-injected between steps."""
        o = self.options
        if guidance_scale is not None and float(guidance_scale) != float(o.guidance_scale):
            raise ValueError(f"this sCM student distilled the teacher at guidance_scale={o.guidance_scale} and has no "
                             f"guidance input; sample it with that scale (got {guidance_scale})")
        steps = steps or o.sample_steps
        times = scm_sampling_times(steps, t_max or self.t_max, o.t_mid if t_mid is None else t_mid)
        x = o.sigma_data * torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        x0 = x
        for i, ti in enumerate(times):
            t = torch.full((num,), float(ti), device=self.device)
            x0 = self.consistency(x, t, cond)
            if i + 1 < len(times):
                z = o.sigma_data * torch.randn(x0.shape, generator=generator).to(self.device)
                x = math.cos(times[i + 1]) * x0 + math.sin(times[i + 1]) * z
        return self.teacher.codec.decode(x0)

    def _vp_index(self, t: float) -> int:
        """Nearest teacher timestep (log-SNR) of TrigFlow time t."""
        diff = (torch.log(torch.tan(self.grid_t)) - math.log(math.tan(t))).abs()
        return int(diff.argmin())

    def export(self, out_dir):
        """Stock-Diffusers export. The consistency function f equals the wrapped backbone's x0 prediction, so:

        * VP teachers ("teacher" parameterization): the teacher's pipeline with ``LCMScheduler`` and explicit
          ``timesteps`` = the teacher indices nearest to the sCM sampler times. LCMScheduler's update is
          ``x0 = c_skip x + c_out x0_hat`` (c_skip(t >= 1) < 1e-5 with timestep_scaling 10) and re-noising with fresh
          noise at the next timestep -- the sCM sampler up to that c_skip and t rounded to an integer index. The
          student has no guidance embedding, so the folder keeps the teacher's pipeline class and is sampled with
          ``guidance_scale=1`` (no CFG pass; the student learned the guided teacher).
        * Rectified-flow teachers: the teacher's pipeline with ``FlowMatchLCMScheduler`` (x0 = x - s u, re-noise
          with fresh noise): the sCM sampler at the RF times of the sCM times.
        * "trigflow" students and toy teachers have no stock pipeline (only ``SanaSprintPipeline`` uses
          ``SCMScheduler``, and it needs a guidance-embedded Sana transformer in RF parameterization at sigma_d = 1).
        """
        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, export_full_student, fit_step_count_schedule, pipeline_takes_timesteps

        o = self.options
        teacher_ref = teacher_reference(self.teacher.pipeline) if self.teacher.pipeline is not None else None
        if self.mode != "teacher":
            raise NotImplementedError("only 'teacher'-parameterized sCM students export to stock Diffusers; a 'trigflow' "
                                      "student outputs F directly, which no stock pipeline except SanaSprintPipeline "
                                      "(guidance-embedded Sana, sigma_d = 1) samples")
        times = scm_sampling_times(o.sample_steps, self.t_max, o.t_mid)
        w = 1.0
        backbone = unwrap(self.student.backbone)
        if self.discrete:
            from diffusers import LCMScheduler

            cfg = {k: v for k, v in self.teacher.scheduler_config.items() if not k.startswith("_")}
            cfg.pop("clip_sample_range", None)
            cfg.update(prediction_type=diffusers_prediction_type(self.student.prediction), timestep_spacing="leading")
            sched = LCMScheduler.from_config(cfg)
            idx = [self._vp_index(t) for t in times]
            notes = f"sCM sampler times {times} (TrigFlow, sigma_d={o.sigma_data}) mapped to teacher timesteps {idx}."
            by_steps = not pipeline_takes_timesteps(self.teacher.pipeline)
            if by_steps:
                # DiTPipeline / DDPMPipeline take no `timesteps`: sample on the step-count grid nearest to the sCM
                # times (the consistency function is trained on all t, so this moves the sampler, not the model).
                sched, fitted = fit_step_count_schedule(sched, idx, exact=False)
                if fitted != idx:
                    notes += (f" {type(self.teacher.pipeline).__name__} takes no `timesteps`, so the saved scheduler "
                              f"(original_inference_steps={sched.config.original_inference_steps}) steps on the "
                              f"nearest grid set_timesteps({len(idx)}) reaches: {fitted}.")
                idx = fitted
                times = [float(self.grid_t[i]) for i in idx]
            spec = SamplingSpec(recipe="scm", num_inference_steps=len(idx), guidance_scale=w, scheduler="LCMScheduler",
                                timesteps=idx, timesteps_from_steps=by_steps, notes=notes,
                                extra={"trigflow_times": times, "sigma_data": o.sigma_data, "teacher": teacher_ref})
        elif isinstance(self.process, RectifiedFlow):
            from diffusers import FlowMatchLCMScheduler

            cfg = {k: v for k, v in self.teacher.scheduler_config.items() if not k.startswith("_")}
            sched = FlowMatchLCMScheduler.from_config(cfg)
            sigmas = [float(self._native_time(torch.tensor(t, dtype=torch.float64))) for t in times]
            spec = SamplingSpec(recipe="scm", num_inference_steps=len(sigmas), guidance_scale=w,
                                scheduler="FlowMatchLCMScheduler", notes=f"sCM sampler times {times} (TrigFlow) are "
                                f"rectified-flow sigmas {sigmas}; pass sigmas={sigmas}.",
                                extra={"sigmas": sigmas, "trigflow_times": times, "sigma_data": o.sigma_data,
                                       "teacher": teacher_ref})
        else:
            raise NotImplementedError(f"no stock-Diffusers export for sCM students of a {self.process.kind} teacher")
        return export_full_student(self.teacher, backbone, sched, out_dir, spec)
