"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models").

Spec B.1. One *round* halves the number of deterministic DDIM steps: a student with an N-step grid learns to do in
one step what its teacher does in two. With the grid ``u_i = i / N`` (process times, below) and ``i ~ U{1..N}``:

1. ``z = alpha_u x + sigma_u eps`` (real data, forward-noised), ``u' = u - 0.5/N``, ``u'' = u - 1/N``;
2. two teacher DDIM steps without clipping (A.4): ``z' = alpha_u' x_a + sigma_u' eps_a`` with ``(x_a, eps_a) = T(z, u)``,
   then ``z'' = alpha_u'' x_b + sigma_u'' eps_b`` with ``(x_b, eps_b) = T(z', u')``;
3. the target is the x that one DDIM step from ``z`` must use to land on ``z''`` (inverse DDIM, Salimans & Ho
   Alg. 2): ``x~ = (z'' - (sigma_u''/sigma_u) z) / (alpha_u'' - (sigma_u''/sigma_u) alpha_u)``; for the last student
   step (i = 1, ``u'' = 0``) ``x~ = x_b`` (the paper's special case; it is also what the formula gives there);
4. loss ``max(SNR_u, 1) ||x_theta(z, u) - x~||^2`` ("truncated SNR" weighting, = ``max(x-MSE, eps-MSE)``, A.5).

Time grids. Continuous processes (cosine VP, rectified flow, TrigFlow) use ``t = t_min + u (t_max - t_min)``.
Discrete Diffusers teachers use the "trailing" integer grid ``t(u = k/M) = round(k T / M) - 1`` (half-to-even), which
is exactly ``DDIMScheduler(timestep_spacing="trailing")``'s, and is nested: the N-step student grid is every other
point of its 2N-step teacher grid, for every round. ``u = 0`` is the clean end (alpha = 1, sigma = 0) on every
process, never fed to a network.

Rounds live inside one training run (one ``stepdistill train``): the round is a function of the update counter,
``round = step // steps_per_round`` (capped at the last round). At the first update of round r the student's weights
are snapshotted: the snapshot is round r-1's student (kept, checkpointed as group ``stage{p}`` and sampleable with
``sample(steps=N)``) and, frozen, round r's teacher; the student keeps training from those weights (it is
"initialised from its teacher", Salimans & Ho). Round 0's student is a copy of the teacher (or, for teachers that
cannot be copied, like toy2d's analytic one, the bundle's fresh student). What is *not* reset at a round boundary:
the AdamW moments and the learning-rate schedule belong to the shared training loop and continue across rounds (the
paper resets both per round; spec B.1 marks this [choose]); use ``train.lr_scheduler: constant`` (or cosine over
the whole run) and ``train.ema_decay: 0`` (the paper uses no EMA; an evaluation EMA would mix rounds). Run
``train.max_steps = steps_per_round * num_rounds`` (extra updates keep training the last round).

The student's output kind defaults to the teacher's (so round 0 starts *equal* to the teacher); the paper
recommends x or v over eps (eps is unstable where alpha -> 0): set ``student_prediction: v`` to follow it.
Guidance: ``guidance_scale`` (Imagen w) bakes a fixed CFG into the student (the teacher of round 0 runs batched CFG;
w = 1 is plain PD). Guidance distillation (Meng et al., :mod:`.guidance_distill`) reuses these rounds with a
w-conditioned student instead.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from ..diffusion.processes import DiscreteVP, EDM, NoiseProcess, PathCoefficients, diffusers_prediction_type
from ..diffusion.solvers import ddim_step, inverse_ddim_x0, sample_deterministic
from ..models.backbones import unwrap
from ..models.denoiser import Denoiser
from ..models.student import copy_backbone, freeze
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe

__all__ = ["PDOptions", "ProgressiveRecipe", "pd_grid", "path_coefficients", "two_teacher_ddim_steps", "pd_target",
           "truncated_snr_weight", "round_schedule"]

Predict = Callable[[Tensor, Tensor], "tuple[Tensor, Tensor]"]
"""(x_t, per-sample times) -> (x0_hat, eps_hat)."""


@dataclass
class PDOptions:
    """Options of the ``progressive`` recipe (``recipe.*`` keys)."""

    teacher_steps: int = 64
    """DDIM steps of the original teacher; round 0's student has half as many."""
    final_steps: int = 4
    """Student steps after the last round (teacher_steps / final_steps must be a power of 2)."""
    steps_per_round: int = 1000
    """Updates per halving; round = step // steps_per_round. Set train.max_steps = this x the number of rounds."""
    student_prediction: str = "auto"
    """Student output kind: "auto" (the teacher bundle's student kind), "x0", "v", "eps" or "flow"."""
    weighting: str = "snr_trunc"
    """"snr_trunc": max(SNR, 1) ||x - x~||^2 (Salimans & Ho); "x": plain x-space MSE; "snr": eps-space MSE."""
    guidance_scale: float = 1.0
    """Imagen CFG scale of the round-0 teacher baked into the student (1 = no guidance)."""
    keep_round_students: bool = True
    """Keep (and checkpoint) every finished round's student so each is sampleable; False keeps only the teacher."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""


_WEIGHTINGS = ("snr_trunc", "x", "snr")


def round_schedule(teacher_steps: int, final_steps: int) -> list[int]:
    """Student step counts of the rounds: teacher_steps/2, teacher_steps/4, ..., final_steps."""
    if final_steps < 1 or teacher_steps <= final_steps or teacher_steps % final_steps:
        raise ValueError(f"recipe.teacher_steps ({teacher_steps}) must be a multiple of recipe.final_steps "
                         f"({final_steps}) and larger, e.g. teacher_steps=64 final_steps=4")
    ratio = teacher_steps // final_steps
    if ratio & (ratio - 1):
        raise ValueError(f"recipe.teacher_steps / recipe.final_steps = {ratio} must be a power of 2 (each round halves "
                         f"the step count), e.g. teacher_steps=64 final_steps=4")
    out, n = [], teacher_steps
    while n > final_steps:
        n //= 2
        out.append(n)
    return out


# ---------------------------------------------------------------------------------------------------- grid and math


def pd_grid(process: NoiseProcess, num_steps: int) -> Tensor:
    """Times of ``u_k = k / num_steps`` for k = 0..num_steps (float64; index 0 = the clean end, stored as NaN).

    Discrete VP: ``round(k T / M) - 1`` (Diffusers' "trailing" DDIM grid); continuous: ``t_min + u (t_max - t_min)``.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    k = torch.arange(num_steps + 1, dtype=torch.float64)
    if isinstance(process, DiscreteVP):
        T = process.num_train_timesteps
        if num_steps > T:
            raise ValueError(f"{num_steps} steps do not fit the teacher's {T} discrete timesteps")
        t = torch.round(k * T / num_steps) - 1
    elif isinstance(process, EDM):
        raise ValueError("progressive distillation needs a process with a clean end at t_min and pure noise at t_max "
                         "(VP, rectified flow, TrigFlow); EDM/VE teachers are not supported")
    else:
        t = process.t_min + k / num_steps * (process.t_max - process.t_min)
    t[0] = float("nan")
    return t


def path_coefficients(process: NoiseProcess, t: Tensor, like: Tensor) -> PathCoefficients:
    """alpha, sigma at per-sample times ``t`` (NaN = clean: alpha = 1, sigma = 0), shaped and typed like ``like``."""
    t = torch.as_tensor(t, dtype=torch.float64).cpu()
    clean = torch.isnan(t)
    finite = t[~clean]
    fill = finite[0] if finite.numel() else torch.tensor(float(process.t_max), dtype=torch.float64)
    safe = torch.where(clean, fill, t)
    c = process.coefficients(safe)
    alpha = torch.where(clean, torch.ones_like(c.alpha), c.alpha)
    sigma = torch.where(clean, torch.zeros_like(c.sigma), c.sigma)
    shape = (-1,) + (1,) * (like.ndim - 1)
    return PathCoefficients(alpha.reshape(shape).to(like.device, like.dtype), sigma.reshape(shape).to(like.device, like.dtype))


def two_teacher_ddim_steps(predict: Predict, z: Tensor, t: Tensor, t_mid: Tensor, c_mid: PathCoefficients,
                           c_next: PathCoefficients) -> tuple[Tensor, Tensor]:
    """Two teacher DDIM steps ``u -> u' -> u''`` (spec B.1 step 2, unclipped). Returns ``(z'', x_b)``."""
    x_a, eps_a = predict(z, t)
    z_mid = ddim_step(x_a, eps_a, c_mid)
    x_b, eps_b = predict(z_mid, t_mid)
    return ddim_step(x_b, eps_b, c_next), x_b


def pd_target(z: Tensor, z_next: Tensor, x_b: Tensor, c_t: PathCoefficients, c_next: PathCoefficients,
              last: Tensor) -> Tensor:
    """Salimans & Ho's x~: inverse DDIM from ``z`` onto ``z''`` (Alg. 2), and ``x_b`` where ``last`` (u'' = 0)."""
    x_tilde = inverse_ddim_x0(z_next, z, c_t, c_next)
    mask = last.reshape((-1,) + (1,) * (z.ndim - 1)).to(z.device)
    return torch.where(mask, x_b, x_tilde)


def truncated_snr_weight(c: PathCoefficients, kind: str = "snr_trunc") -> Tensor:
    """Per-sample loss weight on the x-space error: max(SNR, 1) (default), 1 ("x") or SNR ("snr" = eps-MSE)."""
    snr = (c.alpha / c.sigma) ** 2
    if kind == "snr_trunc":
        return snr.clamp(min=1.0)
    if kind == "x":
        return torch.ones_like(snr)
    if kind == "snr":
        return snr
    raise ValueError(f"recipe.weighting must be one of {_WEIGHTINGS}, got {kind!r}")


def weighted_x_loss(x_pred: Tensor, x_target: Tensor, weight: Tensor) -> Tensor:
    """``mean_n [ weight_n * mean_d (x_pred - x_target)^2 ]`` in float32."""
    per = ((x_pred.float() - x_target.float()) ** 2).flatten(1).mean(1)
    return (weight.flatten().float() * per).mean()


# ---------------------------------------------------------------------------------------------------- recipe


@dataclass
class Stage:
    """One stage of a run: ``kind`` "pd" (a halving round to ``steps`` student steps) or "match" (guidance stage 1)."""

    kind: str
    steps: int
    """Student steps of a "pd" round; the many-step sampling count of a "match" stage."""
    start: int
    """First update of this stage."""


@register_recipe("progressive")
class ProgressiveRecipe(Recipe):
    """Progressive distillation; every round inside one run (see the module docstring)."""

    name = "progressive"
    options_class = PDOptions
    w_conditioned = False
    """Guidance distillation sets this: the student (and every later teacher) takes omega as an input."""

    def __init__(self, teacher: TeacherBundle, options: PDOptions, device: torch.device | str = "cpu"):
        self.options, self.teacher, self.device = options, teacher, torch.device(device)
        self.process = teacher.denoiser.process
        pd_grid(self.process, 1)  # refuses unsupported processes early
        if options.weighting not in _WEIGHTINGS:
            raise ValueError(f"recipe.weighting must be one of {_WEIGHTINGS}, got {options.weighting!r}")
        if options.steps_per_round < 1:
            raise ValueError(f"recipe.steps_per_round must be >= 1, got {options.steps_per_round}")
        self.stages = self.build_stages()
        freeze(teacher.denoiser.backbone)
        teacher.denoiser.to(self.device)
        pred = teacher.student_prediction if options.student_prediction == "auto" else options.student_prediction
        self.student = Denoiser(self.make_student_backbone().to(self.device), self.process, pred)
        self.stage = 0
        self.round_teacher: Denoiser | None = None
        self.snapshots: dict[int, dict[str, Tensor]] = {}
        self._sample_conditions = list(options.sample_conditions)

    # ------------------------------------------------------------------ construction hooks (guidance_distill)
    def build_stages(self) -> list[Stage]:
        o = self.options
        return [Stage("pd", n, r * o.steps_per_round) for r, n in enumerate(round_schedule(o.teacher_steps, o.final_steps))]

    def make_student_backbone(self) -> nn.Module:
        return copy_backbone(self.teacher.student_seed())

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        return {"student": self.student.backbone}

    def optimizer_params(self):
        return {"student": [p for p in self.student.backbone.parameters() if p.requires_grad]}

    def set_prepared(self, name, module):
        self.student.backbone = module

    def stage_of(self, step: int) -> int:
        p = 0
        while p + 1 < len(self.stages) and step >= self.stages[p + 1].start:
            p += 1
        return p

    @torch.no_grad()
    def _snapshot(self) -> dict[str, Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in unwrap(self.student.backbone).state_dict().items()}

    def _build_round_teacher(self, state: dict[str, Tensor]) -> None:
        net = copy.deepcopy(unwrap(self.student.backbone))
        net.load_state_dict(state)
        self.round_teacher = Denoiser(freeze(net).to(self.device), self.process, self.student.prediction)

    def advance_to(self, p: int) -> None:
        """Enter stage ``p``: each finished stage's student is snapshotted and becomes the next stage's teacher."""
        while self.stage < p:
            state = self._snapshot()
            if self.options.keep_round_students:
                self.snapshots[self.stage] = state
            self._build_round_teacher(state)
            self.stage += 1

    def omega(self, n: int, generator: torch.Generator) -> Tensor | None:
        """Per-sample guidance input of the student (None: the student has no guidance input)."""
        return None

    def teacher_predict(self, cond, uncond, omega: Tensor | None) -> Predict:
        """(x, t) -> guided (x0, eps) of the current stage's teacher, in float32, under no_grad."""
        if self.round_teacher is not None:
            net = self.round_teacher
            return lambda x, t: _pair(net.predict(x, t, cond, want=("x0", "eps"), guidance_input=omega))
        w = float(self.options.guidance_scale)
        if w == 1.0:
            return lambda x, t: _pair(self.teacher.denoiser.predict(x, t, cond, want=("x0", "eps")))
        return lambda x, t: _pair(self.teacher.denoiser.predict(x, t, cond, want=("x0", "eps"), cfg_scale=w,
                                                                uncond=uncond))

    def training_step(self, batch, step, generator):
        self.advance_to(self.stage_of(step))
        self.remember_conditions(batch)
        dev = self.device
        x0 = self.teacher.codec.encode(batch["images"].to(dev))
        cond, uncond = self.teacher.encode_conditions(batch["conditions"], dev)
        n = x0.shape[0]
        N = self.stages[self.stage].steps
        grid = pd_grid(self.process, 2 * N)
        i = torch.randint(1, N + 1, (n,), generator=generator)
        t, t_mid, t_next = grid[2 * i], grid[2 * i - 1], grid[2 * i - 2]
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        omega = self.omega(n, generator)
        omega = None if omega is None else omega.to(dev)
        c_t = path_coefficients(self.process, t, x0.float())
        z = c_t.alpha * x0.float() + c_t.sigma * noise
        t_model = self._model_time(t)
        with torch.no_grad():
            c_mid, c_next = path_coefficients(self.process, t_mid, z), path_coefficients(self.process, t_next, z)
            predict = self.teacher_predict(cond, uncond, omega)
            z_next, x_b = two_teacher_ddim_steps(predict, z, t_model, self._model_time(t_mid), c_mid, c_next)
            target = pd_target(z, z_next, x_b, c_t, c_next, i == 1)
        x_pred = self.student.predict(z, t_model, cond, want="x0", guidance_input=omega)["x0"]
        weight = truncated_snr_weight(c_t, self.options.weighting)
        loss = weighted_x_loss(x_pred, target, weight)
        logs = {"loss": loss.detach(), "round_steps": float(N)}
        if omega is not None:
            logs["omega"] = omega.mean()
        return StepOutput(losses={"student": loss}, logs=logs)

    def _model_time(self, t: Tensor) -> Tensor:
        """Per-sample times in the form the Denoiser expects (integer indices for discrete teachers)."""
        t = t.to(self.device)
        return t.long() if isinstance(self.process, DiscreteVP) else t.float()

    def state_dict_for_checkpoint(self):
        state = {"student": unwrap(self.student.backbone).state_dict(),
                 "meta": {"stage": torch.tensor([self.stage])}}
        for p, snap in self.snapshots.items():
            state[f"stage{p}"] = snap
        if self.round_teacher is not None and (self.stage - 1) not in self.snapshots:
            state[f"stage{self.stage - 1}"] = unwrap(self.round_teacher.backbone).state_dict()
        return state

    def load_state_dict_from_checkpoint(self, state):
        unwrap(self.student.backbone).load_state_dict(state["student"])
        self.stage = int(state["meta"]["stage"].item()) if "meta" in state else 0
        self.snapshots = {int(k[5:]): {kk: vv.cpu() for kk, vv in v.items()} for k, v in state.items()
                          if k.startswith("stage")}
        self.round_teacher = None
        if self.stage > 0:
            if (self.stage - 1) not in self.snapshots:
                raise RuntimeError(f"checkpoint is in stage {self.stage} but lacks stage {self.stage - 1}'s student "
                                   f"(its teacher)")
            self._build_round_teacher(self.snapshots[self.stage - 1])
            if not self.options.keep_round_students:
                self.snapshots = {}

    # ------------------------------------------------------------------ sampling and export
    def current_steps(self) -> int:
        return self.stages[self.stage].steps

    def sampleable_steps(self) -> dict[int, int | None]:
        """Student step count -> kept stage index (None = the current student)."""
        out: dict[int, int | None] = {}
        for p in sorted(self.snapshots):
            out[self.stages[p].steps] = p
        out[self.current_steps()] = None
        return out

    @contextlib.contextmanager
    def weights_for(self, steps: int):
        """Swap the kept student of ``steps`` (if any) into the trained module for the duration of the block."""
        p = self.sampleable_steps().get(steps)
        if p is None:
            yield
            return
        net = unwrap(self.student.backbone)
        saved = self._snapshot()
        net.load_state_dict(self.snapshots[p])
        try:
            yield
        finally:
            net.load_state_dict(saved)

    def student_guidance_input(self, num: int, guidance_scale: float | None) -> Tensor | None:
        w = float(self.options.guidance_scale)
        if guidance_scale is not None and abs(float(guidance_scale) - w) > 1e-6:
            raise ValueError(f"this progressive-distillation student has guidance_scale={w} baked in (recipe."
                             f"guidance_scale) and takes no guidance input; sample it with guidance_scale={w}, or "
                             f"use the guidance_distill recipe for a student that takes w as an input")
        return None

    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None):
        """Deterministic ``steps``-step DDIM with the student of that step count (default: the current round's),
        on the same grid the exported ``DDIMScheduler(timestep_spacing="trailing")`` uses; the last step returns x0.
        The starting noise ``randn((num, *sample_shape))`` is the first draw from ``generator``."""
        noise = torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        steps = int(steps or self.current_steps())
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        omega = self.student_guidance_input(num, guidance_scale)
        grid = pd_grid(self.process, steps)
        ts = [self._model_time(grid[k:k + 1])[0] for k in range(steps, 0, -1)]
        with self.weights_for(steps):
            predict = lambda x, t: _pair(self.student.predict(x, t, cond, want=("x0", "eps"), guidance_input=omega))  # noqa: E731
            x0 = sample_deterministic(predict, self.process, ts, noise, "ddim")
        return self.teacher.codec.decode(x0)

    def sampling_defaults(self) -> dict:
        """What the exported pipeline is called with. The guidance is baked into the weights (``recipe.guidance_scale``
        was the teacher's CFG while distilling), so the stock pipeline must not apply CFG again: ``guidance_scale``
        1.0 (one network call per step). Applying it again over-guides, e.g. digits:sd at 4 steps went from domain FID
        155 to 616 with twice the NFE."""
        return {"num_inference_steps": self.current_steps(), "guidance_scale": 1.0}

    def scheduler(self):
        """The stock ``DDIMScheduler`` whose "trailing" grid and final step to x0 are exactly :meth:`sample`'s."""
        from diffusers import DDIMScheduler

        if not isinstance(self.process, DiscreteVP):
            raise NotImplementedError(f"Diffusers export of progressive students is implemented for discrete VP "
                                      f"(DDPM-style) teachers; this teacher is {self.process.kind}")
        T, n = self.process.num_train_timesteps, self.current_steps()
        if T % n:
            raise ValueError(f"the stock DDIMScheduler steps by T // N = {T // n} timesteps, which matches the "
                             f"distillation grid only when N divides T = {T}; export a round with N in "
                             f"{[d for d in (1, 2, 4, 8, 16, 32) if T % d == 0]}")
        cfg = {k: v for k, v in self.teacher.scheduler_config.items() if not k.startswith("_")}
        cfg.update(timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False, thresholding=False,
                   prediction_type=diffusers_prediction_type(self.student.prediction))
        return DDIMScheduler.from_config(cfg)

    def export(self, out_dir):
        from ..export import SamplingSpec, export_full_student

        from ..evaluation.teacher_ref import teacher_reference

        notes = "Deterministic DDIM (eta = 0) on the trailing grid; one network call per step."
        extra = {"teacher": teacher_reference(self.teacher.pipeline)}
        if type(self).sampling_defaults is ProgressiveRecipe.sampling_defaults:  # guidance baked in (not guidance_distill)
            extra["distilled_guidance_scale"] = float(self.options.guidance_scale)
            if self.options.guidance_scale != 1.0:
                notes += (f" CFG at w = {self.options.guidance_scale:g} is distilled into the weights: call the "
                          f"pipeline with guidance_scale=1.0.")
        spec = SamplingSpec(recipe=self.name, variant="full", scheduler="DDIMScheduler", **self.sampling_defaults(),
                            notes=notes, extra=extra)
        return export_full_student(self.teacher, unwrap(self.student.backbone), self.scheduler(), out_dir, spec)


def _pair(d: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    return d["x0"], d["eps"]


def num_rounds(options: PDOptions) -> int:
    return len(round_schedule(options.teacher_steps, options.final_steps))
