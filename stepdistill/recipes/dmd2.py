"""DMD2 (Yin et al. 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis"), spec B.8.

Networks: the generator G (a float32 copy of the teacher; a fresh ToyMLP for the analytic toy teacher), the frozen
real score (the teacher, Imagen CFG ``w_real``, conditional and unconditional halves in one batched forward), the
trainable fake score (a full copy, or LoRA on the teacher's own backbone: one backbone in memory), and a GAN head on
the fake score's bottleneck features (``gan_head``).

One training step (``step`` = updates done so far):

1. Generator input. One step: pure noise labelled with the conditioning timestep ``timesteps[0]`` (999; 399 for the
   1-step SDXL model). Several steps (``timesteps = [999, 749, 499, 249]``): *backward simulation*: draw
   ``k in {0..K-1}`` (one per update, the same on every rank), run G for k steps from pure noise without grad,
   re-noising each x0 estimate to the next grid time with fresh noise, and train on the state at ``timesteps[k]``.
   ``x0_gen = X0(G(x_k, timesteps[k]))``. ``simulation: unrolled`` (not in the paper; an option for small-data
   students whose early-step outputs are far from the data): every update runs the whole grid and trains on the
   *final* output only, back-propagating through the rollout (re-noising is ``alpha x0 + sigma eps``, differentiable
   in x0). The fake score and the GAN head then model the sampler's output distribution itself, not the mixture
   over the K step outputs that the random-step rule trains them on.
2. Generator update, on every ``update_ratio``-th step (two time-scale rule; the fake score is updated every step):
   ``t ~ U{0.02 T .. 0.98 T}``, ``x_t = alpha_t x0_gen + sigma_t eps``, ``x0_real = X0(teacher, CFG w_real)``,
   ``x0_fake = X0(fake)`` (never guided), ``grad = nan_to_num((x0_fake - x0_real) / mean_CHW |x0_gen - x0_real|)``
   (float64), ``L_DM = 1/2 mean((x0_gen - sg(x0_gen - grad))^2)`` (B.8 steps 1-4), plus
   ``lambda_G softplus(-D(x0_gen))`` (GAN, real-data mode).
3. Fake-score ("guidance") update, every step: ``eps``-MSE of the fake score on the *detached* x0_gen at
   ``t ~ U{0..T-1}``, plus ``lambda_D [softplus(D(x0_gen)) + softplus(-D(x_real))]``; D = head(bottleneck of the fake
   score at a noised input, ``t_gan ~ U{0..T-1}``, "diffusion GAN").

Both losses come from the same x0_gen in one ``training_step``; the loop back-propagates each into its own
optimizer's parameters only, so gradient accumulation and checkpoints stay exact (``training/loop.py``). The
generator's optimizer simply does not appear in the losses of fake-only steps (a function of ``step`` alone).

Sampling (and export): the re-noising ("consistency") sampler of spec A.4 on the training grid, which is what the
stock ``LCMScheduler`` does with ``timesteps=[...]`` (its c_skip at t >= 249 is < 1e-7), with no CFG.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..diffusion.processes import diffusers_prediction_type
from ..models.backbones import unwrap
from ..models.denoiser import Denoiser
from ..models.student import UNET_LORA_TARGETS
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe
from .gan_head import BottleneckFeatures, gan_discriminator_loss, gan_generator_loss, make_gan_head
from .ode_regression import ODERegression, ODERegressionOptions
from .score_distill import annealed_range, build_generator_and_fake_score, discrete_vp_process, dm_gradient, \
    draw_timesteps, fake_denoising_loss, guided_predict, sample_stats, surrogate_loss

__all__ = ["DMD2Options", "DMD2Recipe", "renoise_rollout"]


@dataclass
class DMD2Options(ODERegressionOptions):
    """Options of the ``dmd2`` recipe (``recipe.*`` keys). Defaults: the official SDXL-style setting with the GAN."""

    w_real: float = 8.0
    """Imagen CFG scale of the real score (SDXL 8, SD1.5 1.75; 1 = unguided). The fake score is never guided."""
    timesteps: list[int] = field(default_factory=lambda: [999])
    """Generator timestep grid: [999] (1 step; [399] for 1-step SDXL) or e.g. [999, 749, 499, 249] (4 steps)."""
    simulation: str = "random_step"
    """Multi-step generator input: "random_step" (DMD2's backward simulation: train on the output of a random grid
    step, rollout without grad) or "unrolled" (train on the final output, gradients through the whole rollout)."""
    update_ratio: int = 5
    """Fake-score updates per generator update (two time-scale rule: 5 SDXL/ImageNet, 10 SD1.5)."""
    dm_t_min: float = 0.02
    """DM loss timesteps t ~ U{floor(dm_t_min T) .. floor(dm_t_max T)}."""
    dm_t_max: float = 0.98
    """Upper end of the DM loss timestep range (fraction of T)."""
    dm_t_max_late: float | None = None
    """t annealing (ProlificDreamer-style, spec B.7): from update ``dm_t_anneal_step`` on, the upper end of the DM
    range is ``dm_t_max_late`` instead of ``dm_t_max`` (None = no annealing). With a guided real score the high-t
    terms pull the generator off the guided-ODE distribution (toy2d), while early on they spread it over all modes."""
    dm_t_anneal_step: int = 0
    """Update index at which ``dm_t_max_late`` takes over."""
    fake_score: str = "full"
    """"full": a trainable copy of the teacher; "lora": LoRA on the teacher (one backbone in memory)."""
    fake_lora_rank: int = 64
    """LoRA rank of the fake score (fake_score=lora)."""
    fake_lora_alpha: float = 64.0
    """LoRA alpha of the fake score."""
    fake_lora_targets: list[str] = field(default_factory=lambda: list(UNET_LORA_TARGETS))
    """Module-name suffixes that receive the fake score's LoRA adapters."""
    data_mode: str = "real"
    """"real": batches carry real images (GAN on them); "prompts": data-free, batches carry conditions only."""
    gan_weight_gen: float = 5e-3
    """lambda_G of the generator's GAN term (0 = no GAN; SDXL 5e-3, SD1.5 stage 2 1e-3)."""
    gan_weight_disc: float = 1e-2
    """lambda_D of the discriminator's GAN term (0 = no GAN)."""
    gan_features: str = "fake"
    """Bottleneck features for the GAN head: "fake" (official) or "teacher" (an ablation some frameworks used)."""
    fake_loss_weighting: str = "eps"
    """Fake-score denoising loss weighting: "eps" (official SD/SDXL), "v" (1/alpha^2: balanced, for toy teachers
    whose alpha_T is tiny), "alpha2"."""
    fake_lr: float | None = None
    """Learning rate of the fake score (and GAN head); None = train.lr (SwiftBrush: 1e-3 vs the student's 1e-6)."""
    fake_warmup_steps: int = 0
    """Steps at the start that update only the fake score (lets a freshly initialised toy fake score catch up)."""
    student_init_path: str | None = None
    """Initialise the generator from this local Diffusers folder instead of the teacher."""
    gradient_checkpointing: bool = False
    """Enable gradient checkpointing on the generator and a full fake score (Diffusers backbones)."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""

    def validate(self) -> None:
        self.validate_regression()
        if not self.timesteps or any(int(t) != t or t < 0 for t in self.timesteps) \
                or any(a <= b for a, b in zip(self.timesteps, self.timesteps[1:])):
            raise ValueError(f"recipe.timesteps must be a non-empty, strictly decreasing list of integer timesteps, "
                             f"got {self.timesteps}")
        if self.simulation not in ("random_step", "unrolled"):
            raise ValueError(f"recipe.simulation must be 'random_step' or 'unrolled', got {self.simulation!r}")
        if self.update_ratio < 1:
            raise ValueError(f"recipe.update_ratio must be >= 1, got {self.update_ratio}")
        if not 0 <= self.dm_t_min <= self.dm_t_max <= 1:
            raise ValueError(f"need 0 <= recipe.dm_t_min <= recipe.dm_t_max <= 1, got {self.dm_t_min}, {self.dm_t_max}")
        if self.dm_t_max_late is not None and not self.dm_t_min <= self.dm_t_max_late <= 1:
            raise ValueError(f"need recipe.dm_t_min <= recipe.dm_t_max_late <= 1, got {self.dm_t_min}, "
                             f"{self.dm_t_max_late}")
        if self.dm_t_anneal_step < 0:
            raise ValueError(f"recipe.dm_t_anneal_step must be >= 0, got {self.dm_t_anneal_step}")
        if self.data_mode not in ("real", "prompts"):
            raise ValueError(f"recipe.data_mode must be 'real' or 'prompts', got {self.data_mode!r}")
        if self.gan_features not in ("fake", "teacher"):
            raise ValueError(f"recipe.gan_features must be 'fake' or 'teacher', got {self.gan_features!r}")
        if self.data_mode == "prompts" and (self.gan_weight_gen or self.gan_weight_disc):
            raise ValueError("recipe.data_mode=prompts has no real images for the GAN: set recipe.gan_weight_gen=0 "
                             "and recipe.gan_weight_disc=0, or use data_mode=real with an image dataset")

    @property
    def gan(self) -> bool:
        return bool(self.gan_weight_gen or self.gan_weight_disc)


def renoise_rollout(student: Denoiser, x: Tensor, timesteps, cond, generator: torch.Generator) -> Tensor:
    """From ``x``, the state at ``timesteps[0]``, run the student at each time but the last and re-noise its x0
    estimate to the next grid time with fresh noise (spec A.4 "re-noising step"); return the state at
    ``timesteps[-1]`` (``x`` itself for a one-element list)."""
    process = student.process
    ts = [int(t) for t in timesteps]
    n = x.shape[0]
    for t, nxt in zip(ts[:-1], ts[1:]):
        x0 = student.predict(x, torch.full((n,), t, device=x.device), cond, want="x0")["x0"]
        x = process.add_noise(x0, torch.randn(x.shape, generator=generator).to(x.device),
                              torch.full((n,), nxt, device=x.device))
    return x


@register_recipe("dmd2")
class DMD2Recipe(Recipe):
    name = "dmd2"
    options_class = DMD2Options

    def __init__(self, teacher: TeacherBundle, options: DMD2Options, device: torch.device | str = "cpu"):
        options.validate()
        process = discrete_vp_process(teacher, "DMD2")
        if max(options.timesteps) >= process.num_train_timesteps:
            raise ValueError(f"recipe.timesteps {options.timesteps} exceed the teacher's {process.num_train_timesteps} "
                             f"training timesteps")
        self.options, self.teacher, self.device, self.process = options, teacher, torch.device(device), process
        self.student, self.fake = build_generator_and_fake_score(teacher, options, self.device)
        if options.gradient_checkpointing:
            for net in (self.student.backbone, self.fake.denoiser.backbone if options.fake_score == "full" else None):
                if net is not None and hasattr(unwrap(net), "enable_gradient_checkpointing"):
                    unwrap(net).enable_gradient_checkpointing()
        teacher.denoiser.to(self.device)
        self.grid = [int(t) for t in options.timesteps]
        self.stock_schedule()  # a grid the teacher's pipeline cannot sample fails here, not after training
        T = process.num_train_timesteps
        self.dm_range = (int(options.dm_t_min * T), min(int(options.dm_t_max * T), T - 1))
        self.dm_t_high_late = None if options.dm_t_max_late is None else min(int(options.dm_t_max_late * T), T - 1)
        self.head = None
        if options.gan:
            self.features = BottleneckFeatures(self._feature_net().backbone)
            with torch.no_grad():
                probe = self._probe_features()
            self.head = make_gan_head(probe).to(self.device)
        self.regression = ODERegression(options, teacher, process, options.w_real, self.grid[0],
                                        self.fake.teacher_context) if options.regression else None
        self._sample_conditions = options.sample_conditions

    # ------------------------------------------------------------------ networks
    def _feature_net(self) -> Denoiser:
        return self.fake.denoiser if self.options.gan_features == "fake" else self.teacher.denoiser

    def _probe_condition(self):
        pipe = self.teacher.pipeline
        if pipe is not None and getattr(pipe, "tokenizer", None) is not None:
            return [""]
        return torch.tensor([0])

    def _probe_features(self) -> Tensor:
        cond, _ = self.teacher.encode_conditions(self._probe_condition(), self.device)
        x = torch.zeros((1, *self.teacher.sample_shape), device=self.device)
        return self._features(x, torch.tensor([self.process.num_train_timesteps - 1], device=self.device), cond)

    def _features(self, x_t: Tensor, t: Tensor, cond) -> Tensor:
        net = self._feature_net()
        ctx = self.fake.teacher_context() if self.options.gan_features == "teacher" else _null()
        with ctx:  # the bare module: the forward stops at the bottleneck (see gan_head)
            bare = Denoiser(unwrap(net.backbone), net.process, net.prediction, family=net.family)
            return self.features(lambda: bare.native(x_t, t, cond))

    def _logit(self, x0: Tensor, cond, generator: torch.Generator) -> Tensor:
        """D(x0, c): the head on the bottleneck features at a noised input, t_gan ~ U{0..T-1} (diffusion GAN)."""
        n = x0.shape[0]
        t = draw_timesteps(n, 0, self.process.num_train_timesteps - 1, generator).to(self.device)
        x_t = self.process.add_noise(x0, torch.randn(x0.shape, generator=generator).to(self.device), t)
        return self.head(self._features(x_t, t, cond))

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        mods = {"student": self.student.backbone, "fake_score": self.fake.denoiser.backbone}
        if self.head is not None:
            mods["gan_head"] = self.head
        return mods

    def optimizer_params(self):
        critic = self.fake.trainable_parameters() + ([] if self.head is None else list(self.head.parameters()))
        critic = [{"params": critic, "lr": self.options.fake_lr}] if self.options.fake_lr is not None else critic
        return {"student": [p for p in self.student.backbone.parameters() if p.requires_grad], "fake_score": critic}

    def set_prepared(self, name, module):
        if name == "student":
            self.student.backbone = module
        elif name == "fake_score":
            self.fake.denoiser.backbone = module
        else:
            self.head = module

    def generator_updates(self, step: int) -> bool:
        """Whether update ``step`` trains the generator (a function of ``step`` alone, as the loop requires)."""
        o = self.options
        if step < o.regression_warmup_steps:
            return True
        step -= o.regression_warmup_steps
        return step >= o.fake_warmup_steps and (step - o.fake_warmup_steps) % o.update_ratio == 0

    def _simulation_index(self, step: int) -> int:
        """k in {0..K-1} for backward simulation: seeded by the update index, so it is shared by every rank."""
        if len(self.grid) == 1:
            return 0
        if self.options.simulation == "unrolled":
            return len(self.grid) - 1
        return int(torch.randint(len(self.grid), (1,), generator=torch.Generator().manual_seed(7919 * step + 13)))

    def generator_input(self, n: int, cond, step: int, generator: torch.Generator,
                        keep_graph: bool = False) -> tuple[Tensor, Tensor]:
        """(x, t): pure noise at grid[0], or the backward-simulated state at grid[k] (no grad; with
        ``simulation: unrolled`` k is the last step and, when ``keep_graph``, the rollout keeps its graph)."""
        k = self._simulation_index(step)
        x = torch.randn((n, *self.teacher.sample_shape), generator=generator).to(self.device)
        if k:
            with torch.set_grad_enabled(keep_graph and self.options.simulation == "unrolled"):
                x = renoise_rollout(self.student, x, self.grid[:k + 1], cond, generator)
        return x, torch.full((n,), self.grid[k], device=self.device)

    def _one_step_x0(self, noise: Tensor, cond) -> Tensor:
        """G's x0 for pure noise at the grid's first time (what the ODE-pair regression trains)."""
        t = torch.full((noise.shape[0],), self.grid[0], device=self.device)
        return self.student.predict(noise, t, cond, want="x0")["x0"]

    def dm_t_range(self, step: int | None = None) -> tuple[int, int]:
        """The DM loss timestep range at update ``step`` (``dm_t_max_late`` from ``dm_t_anneal_step`` on)."""
        return annealed_range(*self.dm_range, self.dm_t_high_late, self.options.dm_t_anneal_step, step)

    def dm_loss(self, x0_gen: Tensor, cond, uncond, generator: torch.Generator,
                step: int | None = None) -> tuple[Tensor, dict]:
        """L_DM of spec B.8 (steps 1-4) and its diagnostics."""
        n = x0_gen.shape[0]
        t = draw_timesteps(n, *self.dm_t_range(step), generator).to(self.device)
        noise = torch.randn(x0_gen.shape, generator=generator).to(self.device)
        with torch.no_grad():
            x_t = self.process.add_noise(x0_gen.detach(), noise, t)
            with self.fake.teacher_context():
                x0_real = guided_predict(self.teacher.denoiser, x_t, t, cond, uncond, self.options.w_real, "x0")["x0"]
            x0_fake = self.fake.denoiser.predict(x_t, t, cond, want="x0")["x0"]
            grad = dm_gradient(x0_gen, x0_real, x0_fake)
        loss = surrogate_loss(x0_gen, grad)
        return loss, {"dm/grad_abs_mean": grad.abs().mean().float(),
                      "dm/real_fake_gap": (x0_real - x0_fake).abs().mean()}

    def training_step(self, batch, step, generator):
        o, dev = self.options, self.device
        self.remember_conditions(batch)
        conditions = batch["conditions"]
        cond, uncond = self.teacher.encode_conditions(conditions, dev)
        n = cond.batch_size or len(conditions)
        update_gen = self.generator_updates(step)
        regressing = self.regression is not None and self.regression.warming_up(step)
        if self.regression is not None:
            self.regression.fill(cond, uncond, generator, dev)
        trains_generator = update_gen and not regressing  # the DM (+ GAN) loss reaches G in this update
        x, t_in = self.generator_input(n, cond, step, generator, keep_graph=trains_generator)
        with torch.set_grad_enabled(trains_generator):
            x0_gen = self.student.predict(x, t_in, cond, want="x0")["x0"]
        logs = dict(sample_stats(x0_gen))
        losses = {}
        loss_reg = None if self.regression is None else \
            self.regression.student_term(step, update_gen, self._one_step_x0, n, generator, dev, logs)
        if regressing:
            losses["student"] = loss_reg
        elif update_gen:
            loss_g, dm_logs = self.dm_loss(x0_gen, cond, uncond, generator, step)
            logs.update(dm_logs)
            logs["loss_dm"] = loss_g.detach()
            if self.head is not None and o.gan_weight_gen:
                gen_gan = gan_generator_loss(self._logit(x0_gen, cond, generator))
                logs["loss_gan_gen"] = gen_gan.detach()
                loss_g = loss_g + o.gan_weight_gen * gen_gan
            if loss_reg is not None:
                loss_g = loss_g + o.regression_weight * loss_reg
            losses["student"] = loss_g
        x0_d = x0_gen.detach()
        t_f = draw_timesteps(n, 0, self.process.num_train_timesteps - 1, generator).to(dev)
        noise = torch.randn(x0_d.shape, generator=generator).to(dev)
        loss_f = fake_denoising_loss(self.fake.denoiser, x0_d, cond, t_f, noise, o.fake_loss_weighting)
        logs["loss_fake_denoise"] = loss_f.detach()
        if self.head is not None and o.gan_weight_disc:
            if "images" not in batch:
                raise ValueError("DMD2 with the GAN (data_mode=real) needs real images in each batch (batch['images']); "
                                 "use an image dataset or set recipe.data_mode=prompts with the GAN weights at 0")
            real = self.teacher.codec.encode(batch["images"].to(dev))
            logit_fake, logit_real = self._logit(x0_d, cond, generator), self._logit(real, cond, generator)
            disc = gan_discriminator_loss(logit_fake, logit_real)
            logs.update({"loss_gan_disc": disc.detach(), "gan/logit_real": logit_real.detach().mean(),
                         "gan/logit_fake": logit_fake.detach().mean()})
            loss_f = loss_f + o.gan_weight_disc * disc
        losses["fake_score"] = loss_f
        return StepOutput(losses=losses, logs=logs)

    def state_dict_for_checkpoint(self):
        state = {"student": unwrap(self.student.backbone).state_dict(), "fake_score": self.fake.state_dict()}
        if self.head is not None:
            state["gan_head"] = unwrap(self.head).state_dict()
        if self.regression is not None and self.regression.pool.count:
            state["ode_pairs"] = self.regression.pool.state_dict()
        return state

    def load_state_dict_from_checkpoint(self, state):
        unwrap(self.student.backbone).load_state_dict(state["student"])
        self.fake.load_state_dict(state["fake_score"])
        if self.head is not None:
            unwrap(self.head).load_state_dict(state["gan_head"])
        if self.regression is not None and "ode_pairs" in state:
            self.regression.pool.load_state_dict(state["ode_pairs"])

    # ------------------------------------------------------------------ sampling and export
    def sampling_timesteps(self, steps: int | None = None) -> list[int]:
        """The training grid (its first entry for 1 step); other step counts use evenly spaced times from grid[0]
        (a re-noising sampler the student was not trained on: report it as such)."""
        if steps is None or steps == len(self.grid):
            return list(self.grid)
        if steps == 1:
            return [self.grid[0]]
        return [int(v) for v in torch.linspace(self.grid[0], 0, steps + 1)[:-1].round().tolist()]

    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None,
               timesteps: list[int] | None = None):
        """Student samples: ``randn`` from ``generator`` first, then the re-noising sampler on ``timesteps``.
        The guidance ``w_real`` is distilled in; asking for another ``guidance_scale`` is an error."""
        if guidance_scale is not None and float(guidance_scale) != float(self.options.w_real):
            raise ValueError(f"this DMD2 student was distilled at w_real={self.options.w_real}; it cannot sample at "
                             f"guidance_scale={guidance_scale} (retrain with recipe.w_real={guidance_scale})")
        ts = list(timesteps) if timesteps else self.sampling_timesteps(steps)
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        x = torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        x = renoise_rollout(self.student, x, ts, cond, generator)
        x0 = self.student.predict(x, torch.full((num,), ts[-1], device=self.device), cond, want="x0")["x0"]
        return self.teacher.codec.decode(x0)

    def scheduler(self):
        return renoising_scheduler(self.teacher, self.student.prediction)

    def stock_schedule(self):
        """(scheduler, by_steps) of the export: see :func:`grid_scheduler`."""
        return grid_scheduler(self.teacher, self.student.prediction, self.grid)

    def export(self, out_dir):
        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, export_full_student

        sched, by_steps = self.stock_schedule()
        how = f"Pass timesteps={self.grid} (the grid the generator was trained on)"
        if by_steps:
            how = (f"Pass num_inference_steps={len(self.grid)}: the saved LCMScheduler "
                   f"(original_inference_steps={sched.config.original_inference_steps}) steps on the trained grid "
                   f"{self.grid}")
        spec = SamplingSpec(recipe="dmd2", num_inference_steps=len(self.grid), guidance_scale=1.0,
                            scheduler="LCMScheduler", timesteps=list(self.grid), timesteps_from_steps=by_steps,
                            notes=f"{how}; no CFG (w_real={self.options.w_real} is distilled in).",
                            extra={"teacher": teacher_reference(self.teacher.pipeline)})
        return export_full_student(self.teacher, unwrap(self.student.backbone), sched, out_dir, spec)


def grid_scheduler(teacher: TeacherBundle, prediction: str, grid) -> tuple:
    """(scheduler, by_steps): the :func:`renoising_scheduler` that samples ``grid`` in the teacher's stock pipeline.

    When that pipeline takes no ``timesteps`` argument (``DiTPipeline``, ``DDPMPipeline``) the scheduler is fitted so
    that ``set_timesteps(len(grid))`` yields the grid exactly (``by_steps``; a generator trained only at its grid's
    timesteps must be sampled there); a grid no step count reaches is a ``ValueError`` naming the nearest one."""
    from ..export import fit_step_count_schedule, pipeline_takes_timesteps

    sched = renoising_scheduler(teacher, prediction)
    if teacher.pipeline is None or pipeline_takes_timesteps(teacher.pipeline):
        return sched, False
    try:
        return fit_step_count_schedule(sched, grid, exact=True)[0], True
    except ValueError as exc:
        raise ValueError(f"recipe.timesteps: {exc}") from None


def renoising_scheduler(teacher: TeacherBundle, prediction: str):
    """A stock ``LCMScheduler`` that runs the re-noising sampler: x0 from the model, then ``alpha x0 + sigma eps`` at
    the next custom timestep. ``original_inference_steps = T`` makes every integer timestep a valid custom one."""
    from diffusers import LCMScheduler

    cfg = {k: v for k, v in teacher.scheduler_config.items() if not k.startswith("_")}
    cfg.update(original_inference_steps=int(cfg.get("num_train_timesteps", 1000)),
               prediction_type=diffusers_prediction_type(prediction), timestep_spacing="trailing")
    cfg.pop("clip_sample_range", None)
    cfg["clip_sample"] = False
    return LCMScheduler.from_config(cfg)


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
