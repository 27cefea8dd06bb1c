"""MLCM: multistep latent consistency distillation (Xie et al. 2024, "MLCM: Multistep Consistency Distillation of
Latent Diffusion Model"; TLCM, its data-free follow-up), built on multistep consistency distillation (MCD, Heek et
al. 2024). Spec B.4.

The time axis ``[0, T-1]`` is cut into M segments by the boundaries ``b_i = (T/M) i - 1`` (i = 1..M) and 0; for
T = 1000, M = 8 that is {999, 874, 749, 624, 499, 374, 249, 124, 0} (the TLCM inference boundaries). Consistency is
only asked *within* a segment: the student's multistep consistency function maps a state ``z_t`` to the segment's
lower boundary ``s`` (the point where the sampler's hop out of that segment lands):

    f_s(z_t, t) = DDIM(z_t, x0_theta(z_t, t); t -> s) = (sigma_s/sigma_t) z_t + (alpha_s - alpha_t sigma_s/sigma_t) x0_theta

(spec A.4 DDIM written with x0), which is the identity at ``t = s`` whatever x0_theta is. ``x0_theta`` is LCM's
boundary-condition parameterization ``c_skip(t) z + c_out(t) x0_net`` (spec B.3), so the exported student samples
with the stock ``LCMScheduler``. One training step (spec B.4 "Objective"):

1. a teacher-trajectory state ``z_t`` with t on the fine grid G = LCM's skipping-step grid {19, 39, ..., 999}
   united with every stage's boundaries (and 0), so a teacher step never crosses a boundary;
2. ``t' =`` the next point of G below t (``t' >= s`` by construction); the teacher's CFG DDIM step
   ``z_t'`` (LCM convention ``(1 + omega) y_c - omega y_u``). With trajectory states (the default) ``z_t'`` *is*
   the next state of the stored teacher trajectory, so it costs no extra teacher call;
3. target boundary point: ``z_s = z_t'`` if ``t' = s`` (the target is then the teacher state itself, no student
   evaluation), else ``z_s = DDIM(z_t', sg x0_theta-(z_t', t'); t' -> s)`` with theta- the target EMA;
4. loss ``d(f_s(z_t, t), z_s)`` in z-space (default; well conditioned when s is close to t) or in x-space
   ``d(x0_theta, invDDIM(z_s, z_t; t -> s))``. With M = 1 (s = 0) this is LCM's loss.

Training states come from the teacher's own sampling trajectories (data-free, MLCM Sec. "trajectory" / TLCM):
a bank of ``bank_size`` trajectories, each run by the guided teacher (DDIM over G, omega drawn per trajectory)
from pure noise, refreshed every ``bank_refresh_every`` updates; only the batch's conditions (prompts / labels)
are used. ``state_source: forward`` instead forward-noises real data, as LCM does (an ablation).

Progressive training (MLCM's inter-segment consistency): ``segment_schedule`` (default 8 -> 4 -> 2 -> 1) with
``stage_steps`` updates in every stage but the last; the last stage (M = 1, TLCM's single-segment LCD stage) runs
to the end. Every stage's boundaries are a subset of the first stage's, so one student samples with 1, 2, 4 or 8
of the first stage's boundaries: the exported ``LCMScheduler`` has ``original_inference_steps = M_0``, which makes
its default timesteps exactly those boundaries (1: [999], 2: [999, 499], 4: [999, 749, 499, 249], 8: all); each step
predicts x0 and re-noises to the next boundary (spec B.4 "Sampling", LCM-style). ``recipe.sampler: ddim`` samples the
recipe with the MCD-native alternative instead: the deterministic hop ``f_s`` (DDIM with the student's x0 and the
implied eps) between the same boundaries, which keeps the states on the teacher-trajectory distribution the student
was trained on (the export still writes the LCMScheduler; TCDScheduler with eta = 0 at the same timesteps is the
stock scheduler closest to it, not wired up here).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..diffusion.solvers import ddim_step, ddim_step_from_x0, inverse_ddim_x0
from ..models.conditioning import Conditioning
from .base import StepOutput, register_recipe
from .lcm import LCMOptions, LCMRecipe, lcm_solver_grid
from .losses import distance

__all__ = ["MLCMOptions", "MLCMRecipe", "TrajectoryBank", "segment_boundaries", "segment_lower_boundary",
           "mlcm_fine_grid", "stage_index", "multistep_consistency"]


@dataclass
class MLCMOptions(LCMOptions):
    """Options of the ``mlcm`` recipe: every ``lcm`` option (student, guidance embedding, target EMA, loss, LoRA)
    plus the segments, the progressive schedule and the trajectory bank."""

    segment_schedule: list[int] = field(default_factory=lambda: [8, 4, 2, 1])
    """Segments M of each progressive stage, decreasing, each dividing the previous one (nested boundaries)."""
    stage_steps: list[int] = field(default_factory=lambda: [1000, 1000, 1000])
    """Updates spent in each stage except the last (which runs until train.max_steps); len = len(schedule) - 1."""
    loss_space: str = "z"
    """"z": d(f_s(z_t), z_s) at the boundary; "x": d(x0_theta, invDDIM(z_s, z_t)) (ill-conditioned near s)."""
    state_source: str = "trajectory"
    """"trajectory": states of the guided teacher's own DDIM trajectories (data-free); "forward": noised data."""
    bank_size: int = 0
    """Trajectories in the bank (0: one micro-batch's worth, i.e. data.batch_size)."""
    bank_refresh_every: int = 1
    """Rebuild the bank (new noise, omega and conditions from the current batch) every this many updates."""
    sampler: str = "lcm"
    """Multistep sampler between the segment boundaries: "lcm" = predict x0 and re-noise with fresh noise to the next
    boundary (the stock ``LCMScheduler``, what the export runs); "ddim" = MCD-native deterministic hop
    ``DDIM(z_b, x0_theta(z_b); b -> b')`` with the implied eps (exactly the student map f_s the loss trains, so the
    states stay on the teacher-trajectory distribution the student was trained on)."""


def segment_boundaries(num_train_timesteps: int, segments: int) -> Tensor:
    """Descending boundaries ``[T-1, ..., T/M - 1, 0]`` (M + 1 values): ``b_i = (T/M) i - 1`` and 0.

    For T = 1000: M = 8 -> {999, 874, 749, 624, 499, 374, 249, 124, 0} (spec B.4), M = 1 -> {999, 0}."""
    if segments < 1:
        raise ValueError(f"the number of segments must be >= 1, got {segments}")
    inner = lcm_solver_grid(num_train_timesteps, segments)  # (T/M)(i+1) - 1, same formula as LCM's solver grid
    return torch.cat([inner.flip(0), torch.zeros(1, dtype=inner.dtype)])


def segment_lower_boundary(t: Tensor, boundaries: Tensor) -> Tensor:
    """For each t > 0, the largest boundary strictly below t: the end of the hop out of t's segment (a state sitting
    on a boundary b belongs to the segment below b)."""
    t = torch.as_tensor(t)
    if torch.any(t <= 0):
        raise ValueError("segment_lower_boundary needs t > 0 (0 is the last boundary)")
    b = boundaries.to(t.device)
    below = b.unsqueeze(0) < t.unsqueeze(-1)  # (N, M+1)
    return torch.where(below, b.unsqueeze(0), torch.full_like(b, -1).unsqueeze(0)).amax(-1)


def mlcm_fine_grid(num_train_timesteps: int, num_ddim_timesteps: int, segment_schedule: list[int]) -> Tensor:
    """Descending training grid: LCM's skipping-step grid united with every stage's boundaries, ending at 0."""
    pts = set(lcm_solver_grid(num_train_timesteps, num_ddim_timesteps).tolist()) | {0}
    for m in segment_schedule:
        pts |= set(segment_boundaries(num_train_timesteps, m).tolist())
    return torch.tensor(sorted(pts, reverse=True))


def stage_index(step: int, stage_steps: list[int]) -> int:
    """Which progressive stage update ``step`` (0-based) belongs to; the last stage is open-ended."""
    edge = 0
    for i, n in enumerate(stage_steps):
        edge += n
        if step < edge:
            return i
    return len(stage_steps)


def multistep_consistency(z_t: Tensor, x0: Tensor, ct, cs) -> Tensor:
    """``f_s(z_t, t) = DDIM(z_t, x0; t -> s)``: the student's point at its segment's lower boundary (MCD). It is the
    identity when s = t (sigma_s/sigma_t = 1 and alpha_s - alpha_t = 0)."""
    return ddim_step_from_x0(z_t.float(), x0, ct, cs)


@dataclass
class TrajectoryBank:
    """Teacher trajectories: ``states[i, j]`` is trajectory i at grid point ``grid[j]`` (``states[i, 0]`` the
    starting noise), with its conditioning (one row per trajectory) and omega; ``built_at``: the update it was made."""

    states: Tensor
    omega: Tensor
    cond: Conditioning
    built_at: int

    def state_dict(self) -> dict[str, Tensor]:
        return {"states": self.states, "omega": self.omega, "built_at": torch.tensor(self.built_at),
                **self.cond.flat_state()}

    @classmethod
    def from_state_dict(cls, state: dict[str, Tensor]) -> "TrajectoryBank":
        return cls(state["states"], state["omega"], Conditioning.from_flat_state(state), int(state["built_at"]))


@register_recipe("mlcm")
class MLCMRecipe(LCMRecipe):
    """MLCM on top of the LCM student (same networks, guidance embedding, target EMA, LoRA variant and export)."""

    options_class = MLCMOptions

    def __init__(self, teacher, options: MLCMOptions, device="cpu"):
        sched = list(options.segment_schedule)
        if not sched or any(not isinstance(m, int) or m < 1 for m in sched):
            raise ValueError(f"recipe.segment_schedule must be a non-empty list of positive integers, got {sched!r}")
        for a, b in zip(sched, sched[1:]):
            if not (b < a and a % b == 0):
                raise ValueError(f"recipe.segment_schedule {sched} must decrease with each entry dividing the previous "
                                 f"one (so every stage's boundaries are first-stage boundaries); {b} does not divide {a}")
        if len(options.stage_steps) != len(sched) - 1 or any(int(n) < 1 for n in options.stage_steps):
            raise ValueError(f"recipe.stage_steps must list one positive number of updates per stage except the last "
                             f"({len(sched) - 1} for segment_schedule {sched}), got {options.stage_steps!r}")
        if options.loss_space not in ("z", "x"):
            raise ValueError(f"recipe.loss_space must be 'z' or 'x', got {options.loss_space!r}")
        if options.state_source not in ("trajectory", "forward"):
            raise ValueError(f"recipe.state_source must be 'trajectory' or 'forward', got {options.state_source!r}")
        if options.sampler not in ("lcm", "ddim"):
            raise ValueError(f"recipe.sampler must be 'lcm' or 'ddim', got {options.sampler!r}")
        if options.bank_size < 0 or options.bank_refresh_every < 1:
            raise ValueError(f"recipe.bank_size must be >= 0 and recipe.bank_refresh_every >= 1, got "
                             f"{options.bank_size} and {options.bank_refresh_every}")
        super().__init__(teacher, options, device)
        T = self.process.num_train_timesteps
        for m in sched:
            if T % m:
                raise ValueError(f"recipe.segment_schedule entry {m} must divide the teacher's {T} training timesteps")
        self.fine_grid = mlcm_fine_grid(T, options.num_ddim_timesteps, sched)
        self.bank: TrajectoryBank | None = None

    # ------------------------------------------------------------------ schedule
    def segments_at(self, step: int) -> int:
        """M of the progressive stage that update ``step`` trains."""
        return self.options.segment_schedule[stage_index(step, self.options.stage_steps)]

    def boundaries_at(self, step: int) -> Tensor:
        return segment_boundaries(self.process.num_train_timesteps, self.segments_at(step))

    # ------------------------------------------------------------------ teacher trajectories
    @torch.no_grad()
    def teacher_trajectories(self, noise: Tensor, cond: Conditioning, uncond: Conditioning, omega: Tensor) -> Tensor:
        """Run the guided teacher (CFG in the LCM convention on x0 and eps, DDIM) from ``noise`` at ``fine_grid[0]``
        through every point of ``fine_grid``; returns ``(N, len(grid), ...)`` states (index 0 = the noise)."""
        states = [noise.float()]
        z = noise.float()
        grid = self.fine_grid.to(self.device)
        n = z.shape[0]
        with self._teacher_ctx():
            for t, t_next in zip(grid[:-1], grid[1:]):
                tp = self.teacher.denoiser.predict(z, t.expand(n), cond, want=("x0", "eps"), cfg_scale=omega,
                                                   uncond=uncond, convention="lcm")
                z = ddim_step(tp["x0"], tp["eps"], self.process.coefficients(t_next.expand(n), like=tp["x0"]))
                states.append(z)
        return torch.stack(states, 1)

    def _refresh_bank(self, batch, step: int, generator: torch.Generator) -> TrajectoryBank:
        conds = batch["conditions"]
        size = self.options.bank_size or len(conds)
        idx = torch.arange(size) % len(conds)
        conds = conds[idx] if torch.is_tensor(conds) else [conds[i] for i in idx.tolist()]
        cond, uncond = self.teacher.encode_conditions(conds, self.device)
        noise = torch.randn((size, *self.teacher.sample_shape), generator=generator).to(self.device)
        omega = self._omega(size, generator).to(self.device)
        states = self.teacher_trajectories(noise, cond, uncond, omega)
        return TrajectoryBank(states, omega, cond.detach(), step)

    def _bank_for(self, batch, step: int, generator: torch.Generator) -> TrajectoryBank:
        due = step - step % self.options.bank_refresh_every
        if self.bank is None or self.bank.built_at != due:
            self.bank = self._refresh_bank(batch, due, generator)
        return self.bank

    def _states(self, batch, step: int, generator: torch.Generator):
        """(z_t, t, z_t', t', cond, omega) for one micro-batch: a state on the fine grid and the teacher's next
        state (spec B.4 steps 1-2)."""
        grid = self.fine_grid
        dev = self.device
        if self.options.state_source == "trajectory":
            bank = self._bank_for(batch, step, generator)
            n = len(batch["conditions"])
            i = torch.randint(0, bank.states.shape[0], (n,), generator=generator)
            j = torch.randint(0, len(grid) - 1, (n,), generator=generator)
            i_d, j_d = i.to(dev), j.to(dev)
            return (bank.states[i_d, j_d], grid[j].to(dev), bank.states[i_d, j_d + 1], grid[j + 1].to(dev),
                    bank.cond.index(i_d), bank.omega[i_d])
        x0 = self.teacher.codec.encode(batch["images"].to(dev))
        cond, uncond = self.teacher.encode_conditions(batch["conditions"], dev)
        n = x0.shape[0]
        j = torch.randint(0, len(grid) - 1, (n,), generator=generator)
        t, t_next = grid[j].to(dev), grid[j + 1].to(dev)
        noise = torch.randn(x0.shape, generator=generator).to(dev)
        omega = self._omega(n, generator).to(dev)
        z_t = self.process.add_noise(x0, noise, t)
        with torch.no_grad(), self._teacher_ctx():
            tp = self.teacher.denoiser.predict(z_t, t, cond, want=("x0", "eps"), cfg_scale=omega, uncond=uncond,
                                               convention="lcm")
            z_next = ddim_step(tp["x0"], tp["eps"], self.process.coefficients(t_next, like=tp["x0"]))
        return z_t, t, z_next, t_next, cond, omega

    # ------------------------------------------------------------------ loss
    def boundary_target(self, z_next: Tensor, t_next: Tensor, s: Tensor, cond, emb) -> Tensor:
        """Spec B.4 step 3: the teacher state itself where ``t' = s``, else the target network's DDIM hop t' -> s."""
        target_net = self.target_denoiser if self.target_denoiser is not None else self.student
        at_boundary = t_next == s
        z_s = z_next.float().clone()
        hop = ~at_boundary
        if hop.any():
            sub_emb = None if emb is None else emb[hop]
            x0 = self.consistency(target_net, z_next[hop], t_next[hop], cond.index(hop), sub_emb)
            z_s[hop] = multistep_consistency(z_next[hop], x0, self.process.coefficients(t_next[hop], like=x0),
                                             self.process.coefficients(s[hop], like=x0))
        return z_s

    def training_step(self, batch, step, generator):
        z_t, t, z_next, t_next, cond, omega = self._states(batch, step, generator)
        emb = omega if self.embeds_guidance else None
        s = segment_lower_boundary(t, self.boundaries_at(step).to(t.device))
        x0 = self.consistency(self.student, z_t, t, cond, emb)
        ct, cs = self.process.coefficients(t, like=x0), self.process.coefficients(s, like=x0)
        with torch.no_grad():
            target = self.boundary_target(z_next, t_next, s, cond, emb)
        if self.options.loss_space == "z":
            loss = distance(self.options.loss, multistep_consistency(z_t, x0, ct, cs), target, self.options.huber_c)
        else:
            loss = distance(self.options.loss, x0, inverse_ddim_x0(target, z_t.float(), ct, cs), self.options.huber_c)
        logs = {"loss": loss.detach(), "omega": omega.mean(), "segments": float(self.segments_at(step))}
        return StepOutput(losses={"student": loss}, logs=logs)

    # ------------------------------------------------------------------ checkpoints
    def state_dict_for_checkpoint(self):
        state = super().state_dict_for_checkpoint()
        if self.bank is not None:
            state["bank"] = self.bank.state_dict()
        return state

    def load_state_dict_from_checkpoint(self, state):
        super().load_state_dict_from_checkpoint({k: v for k, v in state.items() if k != "bank"})
        if "bank" in state:
            bank = TrajectoryBank.from_state_dict(state["bank"])
            self.bank = TrajectoryBank(bank.states.to(self.device), bank.omega.to(self.device),
                                       bank.cond.to(self.device), bank.built_at)

    # ------------------------------------------------------------------ sampling and export
    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None,
               sampler: str | None = None):
        """Student samples at the segment boundaries of ``sampling_timesteps(steps)``: ``recipe.sampler`` "lcm" (the
        stock ``LCMScheduler``: re-noise with fresh noise) or "ddim" (deterministic boundary hops with the student's
        x0 and the implied eps: the MCD sampler, one network evaluation per boundary, starting noise drawn first)."""
        sampler = sampler or self.options.sampler
        if sampler == "lcm":
            return super().sample(num, generator, conditions=conditions, steps=steps, guidance_scale=guidance_scale)
        if sampler != "ddim":
            raise ValueError(f"sampler must be 'lcm' or 'ddim', got {sampler!r}")
        defaults = self.sampling_defaults()
        steps = steps or defaults["num_inference_steps"]
        w = defaults["guidance_scale"] if guidance_scale is None else guidance_scale
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        times = self.sampling_timesteps(steps)
        x = torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        omega = torch.full((num,), float(w) - 1.0, device=self.device) if self.embeds_guidance else None
        x0 = x
        for i, t in enumerate(times):
            tt = torch.full((num,), int(t), dtype=torch.long, device=self.device)
            x0 = self.consistency(self.student, x, tt, cond, omega)
            if i + 1 < len(times):
                ss = torch.full((num,), int(times[i + 1]), dtype=torch.long, device=self.device)
                x = multistep_consistency(x, x0, self.process.coefficients(tt, like=x0),
                                          self.process.coefficients(ss, like=x0))
        return self.teacher.codec.decode(x0)

    def scheduler(self):
        """LCM's scheduler with ``original_inference_steps = M_0`` so its default timesteps are the boundaries; with
        ``recipe.sample_max_timestep`` set, LCM's scheduler that starts there (n evenly spaced steps of ``0..t``)."""
        from diffusers import LCMScheduler

        cfg = dict(super().scheduler().config)
        if self.options.sample_max_timestep is None:
            cfg["original_inference_steps"] = int(self.options.segment_schedule[0])
        return LCMScheduler.from_config(cfg)

    def export(self, out_dir):
        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, export_full_student, export_lora_student
        from ..models.backbones import unwrap
        from ..models.student import lora_state_dict

        m0 = int(self.options.segment_schedule[0])
        by_steps = {str(n): self.sampling_timesteps(n) for n in sorted({1, 2, 4, m0}) if n <= m0}
        listing = ", ".join(f"{n} step(s): {ts}" for n, ts in by_steps.items())
        if self.options.sample_max_timestep is None:
            notes = (f"One student for 1-{m0} steps: the scheduler's original_inference_steps = {m0} makes its default "
                     f"timesteps the MLCM segment boundaries, {listing} (or pass them as `timesteps=`).")
        else:
            notes = (f"One student for 1-{m0} steps, sampled from timestep {self.options.sample_max_timestep} "
                     f"(recipe.sample_max_timestep) instead of the top segment boundary: the scheduler's "
                     f"original_inference_steps = {self.scheduler().config.original_inference_steps} gives {listing}.")
        spec = SamplingSpec(recipe="mlcm", variant=self.options.variant, scheduler="LCMScheduler",
                            **self.sampling_defaults(), notes=notes,
                            extra={"teacher": teacher_reference(self.teacher.pipeline),
                                   "segment_boundaries": segment_boundaries(self.process.num_train_timesteps, m0).tolist(),
                                   "timesteps_by_steps": by_steps,
                                   "segment_schedule": list(self.options.segment_schedule)})
        if self.options.variant == "lora":
            return export_lora_student(self.teacher, lora_state_dict(self.student.backbone), self.scheduler(), out_dir, spec)
        return export_full_student(self.teacher, unwrap(self.student.backbone), self.scheduler(), out_dir, spec)
