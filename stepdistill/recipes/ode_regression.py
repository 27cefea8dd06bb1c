"""Teacher ODE-pair regression for one-step generators (DMD and DMD2's one-step warm-start).

DMD (Yin et al. 2024a, "One-step Diffusion with Distribution Matching Distillation", Sec. 3.3) pairs each noise
``z ~ N(0, I)`` with the teacher's deterministic sample ``y = ODE_teacher(z)`` and adds the regression loss
``L_reg = E d(G(z), y)`` to the distribution-matching loss, ``L = L_KL + lambda_reg L_reg`` (lambda_reg = 0.25 in
the paper): the regression anchors the large-scale structure (which noise goes to which mode), so the mode-seeking
reverse-KL gradient cannot drop modes. DMD2 (spec B.8, "Inputs") drops it except as a warm-start of the one-step
SDXL generator: a regression-only phase on 10k ODE pairs before DMD training.

Here (no paper deviation beyond the distance):

* ``y`` is the guided teacher's DDIM ODE from ``t_start`` (the generator's conditioning timestep) to 0 on a trailing
  grid of ``ode_steps`` steps, with Imagen-convention CFG ``w`` (the guidance the recipe distils), in the teacher's
  sample space (latents for latent models, points for the toy teacher).
* ``d`` is the mean squared error in that space (DMD uses LPIPS on decoded images; a latent or 2-D sample has no
  perceptual metric).
* The pairs form a fixed pool of ``size`` (DMD precomputes its pair set). It is filled from the training conditions
  as batches arrive -- each batch's own conditions with fresh noise -- so its condition mix follows the data, and it
  is saved with checkpoints, so a resumed run regresses on the same pairs. It lives in CPU memory (10k SDXL latent
  pairs with their text embeddings are several GB) and each draw moves its minibatch to the device.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import Tensor

from ..diffusion.solvers import sample_deterministic, trailing_timesteps
from ..models.conditioning import Conditioning
from ..models.denoiser import Denoiser
from .score_distill import guided_predict

__all__ = ["ODEPairPool", "ODERegression", "ODERegressionOptions", "regression_loss", "teacher_ode_samples"]


@torch.no_grad()
def teacher_ode_samples(teacher: Denoiser, noise: Tensor, cond: Conditioning, uncond: Conditioning, w: float,
                        t_start: int, ode_steps: int, num_train_timesteps: int) -> Tensor:
    """``ODE_teacher(noise)``: DDIM from ``t_start`` to 0 on ``ode_steps`` trailing timesteps (the first one is
    ``t_start``), guided with CFG ``w``; one step = one (batched cond + uncond) teacher evaluation."""
    grid = [t for t in trailing_timesteps(num_train_timesteps, ode_steps) if t <= t_start]
    if not grid or grid[0] != t_start:
        grid = [t_start] + grid
    n = noise.shape[0]

    def predict(x: Tensor, t: Tensor):
        out = guided_predict(teacher, x, t.to(x.device).expand(n), cond, uncond, w, ("x0", "eps"))
        return out["x0"].float(), out["eps"].float()

    return sample_deterministic(predict, teacher.process, grid, noise.float(), "ddim")


def regression_loss(x0_gen: Tensor, target: Tensor) -> Tensor:
    """``L_reg = mean((G(z) - y)^2)`` (DMD Sec. 3.3 with MSE as the distance)."""
    return torch.mean((x0_gen.float() - target.detach().float()) ** 2)


@dataclass
class ODEPairPool:
    """A fixed set of (noise, teacher ODE sample, conditioning) triples, filled batch by batch up to ``size``.

    The CPU buffers are allocated for ``size`` pairs on the first :meth:`add` and filled in place (rows
    ``0 .. count-1`` are valid), so filling costs one copy per pair however small the batches are."""

    size: int
    noise: Tensor | None = None
    target: Tensor | None = None
    cond: Conditioning | None = None
    count: int = 0

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def add(self, teacher: Denoiser, cond: Conditioning, uncond: Conditioning, w: float, t_start: int,
            ode_steps: int, num_train_timesteps: int, sample_shape, generator: torch.Generator,
            device="cpu", teacher_context=contextlib.nullcontext) -> int:
        """Append pairs for (the first ``size - count`` of) this batch's conditions, the ODE run on ``device``;
        returns how many were added."""
        n = min(self.size - self.count, cond.batch_size or 0)
        if n <= 0:
            return 0
        idx = torch.arange(n)
        cond_n, uncond_n = cond.index(idx), uncond.index(idx) if uncond is not None else None
        noise = torch.randn((n, *sample_shape), generator=generator).to(device)
        with teacher_context():
            target = teacher_ode_samples(teacher, noise, cond_n, uncond_n, w, t_start, ode_steps, num_train_timesteps)
        if not torch.isfinite(target).all():
            raise FloatingPointError("the teacher's ODE samples for the regression pairs are not finite; check the "
                                     "teacher (recipe.w_real / guidance) or set recipe.regression_pairs=0")
        self._append(noise.cpu(), target.cpu(), cond_n.detach().to("cpu"))
        return n

    def _append(self, noise: Tensor, target: Tensor, cond: Conditioning) -> None:
        """Write CPU rows at ``count``; the first call allocates every buffer for ``size`` rows shaped like these."""
        if self.noise is None:
            self.noise = noise.new_empty((self.size, *noise.shape[1:]))
            self.target = target.new_empty((self.size, *target.shape[1:]))
            self.cond = cond.index(torch.zeros(self.size, dtype=torch.long))
        rows = slice(self.count, self.count + noise.shape[0])
        self.noise[rows], self.target[rows] = noise, target
        new = cond.flat_state()
        for key, buf in self.cond.flat_state().items():  # the buffers themselves, written in place
            buf[rows] = new[key]
        self.count = rows.stop

    def draw(self, n: int, generator: torch.Generator, device="cpu") -> tuple[Tensor, Tensor, Conditioning]:
        """``n`` pairs uniformly (with replacement) from the pool so far, on ``device``."""
        if self.count == 0:
            raise RuntimeError("the ODE-pair pool is empty; add pairs before drawing")
        i = torch.randint(0, self.count, (n,), generator=generator)
        return self.noise[i].to(device), self.target[i].to(device), self.cond.index(i).to(device)

    def state_dict(self) -> dict[str, Tensor]:
        """The filled rows (a partly filled pool resumes filling where it stopped)."""
        if self.count == 0:
            return {}
        rows = slice(0, self.count)
        return {"noise": self.noise[rows], "target": self.target[rows], **self.cond.index(rows).flat_state()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.noise = self.target = self.cond = None
        self.count = 0
        if not state:
            return
        saved = int(state["noise"].shape[0])
        if saved > self.size:
            raise ValueError(f"the checkpoint holds {saved} ODE pairs but recipe.regression_pairs is {self.size}; "
                             f"resume with recipe.regression_pairs >= {saved}")
        self._append(state["noise"].cpu(), state["target"].cpu(), Conditioning.from_flat_state(state).to("cpu"))


@dataclass
class ODERegressionOptions:
    """The regression keys shared by the one-step recipes (``recipe.regression_*``); all off by default."""

    regression_pairs: int = 0
    """Teacher ODE (noise, sample) pairs in the regression pool (DMD2's 1-step SDXL warm-start: 10k); 0 = off."""
    regression_ode_steps: int = 50
    """DDIM steps of the guided teacher ODE that makes each pair's target."""
    regression_warmup_steps: int = 0
    """Generator updates on ``L_reg`` alone before distribution matching starts (DMD2's ODE warm-start). The
    fake-score warm-up and the update schedule count from its end."""
    regression_weight: float = 0.0
    """``lambda_reg`` of ``L_reg`` next to the distribution-matching loss after the warm-up (DMD: 0.25); 0 = none."""

    def validate_regression(self) -> None:
        if self.regression_pairs < 0 or self.regression_warmup_steps < 0 or self.regression_weight < 0:
            raise ValueError("recipe.regression_pairs, recipe.regression_warmup_steps and recipe.regression_weight "
                             "must be >= 0")
        if self.regression_ode_steps < 1:
            raise ValueError(f"recipe.regression_ode_steps must be >= 1, got {self.regression_ode_steps}")
        if (self.regression_warmup_steps or self.regression_weight) and not self.regression_pairs:
            raise ValueError("recipe.regression_warmup_steps / recipe.regression_weight need teacher ODE pairs: set "
                             "recipe.regression_pairs (e.g. 10000)")

    @property
    def regression(self) -> bool:
        return self.regression_pairs > 0


class ODERegression:
    """The pool and loss of one recipe: fills the pool from each batch until full, then gives ``L_reg`` on pairs
    drawn from it. ``generator_at(noise, cond)`` is the generator's x0 for pure noise at its conditioning time."""

    def __init__(self, options: ODERegressionOptions, teacher, process, w: float, t_start: int, teacher_context):
        self.options, self.teacher, self.process = options, teacher, process
        self.w, self.t_start, self.teacher_context = float(w), int(t_start), teacher_context
        self.pool = ODEPairPool(options.regression_pairs)

    def warming_up(self, step: int) -> bool:
        return step < self.options.regression_warmup_steps

    def fill(self, cond: Conditioning, uncond: Conditioning, generator: torch.Generator, device) -> int:
        if self.pool.full:
            return 0
        return self.pool.add(self.teacher.denoiser, cond, uncond, self.w, self.t_start,
                             self.options.regression_ode_steps, self.process.num_train_timesteps,
                             self.teacher.sample_shape, generator, device, self.teacher_context)

    def loss(self, generator_at, n: int, generator: torch.Generator, device) -> Tensor:
        noise, target, cond = self.pool.draw(n, generator, device)
        return regression_loss(generator_at(noise, cond), target)

    def student_term(self, step: int, updating: bool, generator_at, n: int, generator: torch.Generator, device,
                     logs: dict) -> Tensor | None:
        """``L_reg`` for update ``step`` when it is needed (a generator update in the warm-up, or after it with
        ``regression_weight > 0``), logged as ``loss_regression``; None otherwise."""
        if not updating or not (self.warming_up(step) or self.options.regression_weight):
            return None
        loss = self.loss(generator_at, n, generator, device)
        logs["loss_regression"] = loss.detach()
        return loss
