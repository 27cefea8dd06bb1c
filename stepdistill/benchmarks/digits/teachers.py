"""The three digits teachers: their architectures, schedules and the epsilon-prediction training loop.

Every teacher is an ordinary Diffusers pipeline folder (DESIGN.md, Benchmarks):

* ``sd``   -- ``StableDiffusionPipeline``: a frozen, randomly initialised ``CLIPTextModel`` (hidden 64, 2 layers)
  with the offline CLIP tokenizer (first 2,048 BPE merges), a ``UNet2DConditionModel`` over the 4 x 8 x 8 latents of
  the digits VAE, and a ``DDIMScheduler`` on Stable Diffusion's own schedule (``scaled_linear`` betas 0.00085..0.012,
  1,000 steps, ``steps_offset=1``), epsilon prediction. SD's schedule is chosen on purpose: LCM and the other
  text-to-image recipes were designed against it (skipping-step solvers on the 1,000-step SD grid), so they run on
  this teacher exactly as they would on SD 1.5. The prompt is dropped to ``""`` with probability 0.1 (CFG, Ho &
  Salimans 2022), which is the unconditional prompt ``StableDiffusionPipeline`` itself encodes.
  The text encoder is *not trained*: its 41 distinct outputs (40 prompts + ``""``) are fixed random features that the
  UNet's cross-attention learns to read. That is honest for a benchmark whose prompts come from a closed set; it
  does not make the encoder a language model.
* ``dit``  -- ``DiTPipeline``: a ``DiTTransformer2DModel`` (patch 1 on the 4 x 8 x 8 latents, 64 tokens;
  patch 2, 16 tokens of 4 x 4 pixels each, drew blotchy digits: domain FID 656 at 25 steps) with
  ``num_embeds_ada_norm=1000`` so that label 1000 is the null class that stock ``DiTPipeline`` hard-codes
  (``class_null = 1000``); only labels 0..9 and 1000 are ever used. Label dropout is DiT's own: its
  ``LabelEmbedding`` replaces a label by 1000 with probability ``class_dropout_prob=0.1`` in training mode.
  ADM/DiT's ``linear`` schedule (0.0001..0.02, 1,000 steps), ``DDIMScheduler``, epsilon prediction, no learned sigma.
* ``unet`` -- a pixel-space ``UNet2DModel`` on 1 x 16 x 16 with ``num_class_embeds=11``: labels 0..9 and the null
  class 10 (the *last* embedding row, the convention ``teacher_io.ConditionEncoder.null_class`` reads), dropped to
  10 with probability 0.1; ``DDPMScheduler`` on the ``linear`` schedule in a ``DDPMPipeline``-shaped folder. Stock
  ``DDPMPipeline.__call__`` cannot pass class labels; sample with :func:`sampling.sample_with_scheduler` or
  stepdistill's own sampler (``runner.resolve_teacher('digits:unet')``).

Training (all three, Ho et al. 2020 eq. 14, the "simple" loss)::

    t ~ U{0..999},  eps ~ N(0, I),  x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps,  L = ||eps_theta(x_t, t, c) - eps||^2

with ``x_0`` the image in [-1, 1] (unet) or ``scaling_factor * z``, ``z ~ q(z|x)`` a fresh VAE posterior sample
(sd, dit). AdamW, linear warm-up then cosine decay, gradient clipping at 1, and an EMA of the weights (decay
``ema_decay``) which is what is saved. Every random draw of step ``k`` comes from ``data.step_generator(seed, k)``
(DiT's internal label dropout from the global generator, seeded once), so a build is reproducible for a fixed
thread count.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .data import EMPTY_PROMPT, IMAGE_SIZE, NUM_CLASSES, PROMPT_TEMPLATES, DigitsSplit, prompt_for, sample_batch
from .vae import LATENT_CHANNELS, LATENT_SIZE, encode_latent_stats

__all__ = [
    "DIT_NULL_CLASS",
    "SD_SCHEDULE",
    "LINEAR_SCHEDULE",
    "UNET_NULL_CLASS",
    "TrainSettings",
    "all_prompts",
    "build_dit_transformer",
    "build_sd_text_encoder",
    "build_sd_unet",
    "build_unet",
    "make_scheduler",
    "train_eps_model",
    "sd_batch_fn",
    "dit_batch_fn",
    "unet_batch_fn",
]

# Stable Diffusion 1.x's schedule (its scheduler_config.json).
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
               "steps_offset": 1, "timestep_spacing": "leading", "clip_sample": False, "set_alpha_to_one": False,
               "prediction_type": "epsilon"}
# ADM / DiT's linear schedule.
LINEAR_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                   "clip_sample": False, "prediction_type": "epsilon"}

DIT_NULL_CLASS = 1000  # hard-coded by diffusers.DiTPipeline
UNET_NULL_CLASS = NUM_CLASSES  # last row of UNet2DModel's class embedding (num_class_embeds = 11)
TEXT_HIDDEN = 64
CLIP_NUM_MERGES = 2048
COND_DROP = 0.1


def make_scheduler(kind: str):
    """``"sd"`` -> DDIMScheduler(SD schedule); ``"dit"`` -> DDIMScheduler(linear); ``"unet"`` -> DDPMScheduler(linear)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if kind == "sd":
        return DDIMScheduler(**SD_SCHEDULE)
    if kind == "dit":
        return DDIMScheduler(**LINEAR_SCHEDULE, set_alpha_to_one=False)
    if kind == "unet":
        return DDPMScheduler(**LINEAR_SCHEDULE, variance_type="fixed_small")
    raise ValueError(f"unknown digits teacher kind {kind!r}; expected 'sd', 'dit' or 'unet'")


# ---------------------------------------------------------------------------------------------- architectures


def build_sd_text_encoder(seed: int = 0):
    """(CLIPTokenizer, CLIPTextModel): the offline CLIP BPE (first 2,048 merges) and a random 2-layer encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from ...testing.offline_tokenizers import clip_tokenizer

    tokenizer = clip_tokenizer(num_merges=CLIP_NUM_MERGES)
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=TEXT_HIDDEN, intermediate_size=2 * TEXT_HIDDEN, projection_dim=TEXT_HIDDEN,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return tokenizer, CLIPTextModel(config).eval().requires_grad_(False)


def build_sd_unet(seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=16, cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=2,  # UNet2DConditionModel reads this as the number of heads
    )


def build_dit_transformer(seed: int = 0):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=16, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=4, sample_size=LATENT_SIZE, patch_size=1, num_embeds_ada_norm=DIT_NULL_CLASS,
        norm_num_groups=32,
    )


def build_unet(seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
        num_class_embeds=NUM_CLASSES + 1,
    )


def all_prompts() -> list[str]:
    """Every training prompt (10 classes x 4 templates) followed by the empty prompt."""
    return [prompt_for(c, k) for c in range(NUM_CLASSES) for k in range(len(PROMPT_TEMPLATES))] + [EMPTY_PROMPT]


# ---------------------------------------------------------------------------------------------- batches


def _drop(labels_or_idx: Tensor, null: int, g: torch.Generator) -> Tensor:
    drop = torch.rand(labels_or_idx.shape[0], generator=g) < COND_DROP
    return torch.where(drop, torch.full_like(labels_or_idx, null), labels_or_idx)


def _latents(stats: tuple[Tensor, Tensor], pos: Tensor, scaling: float, g: torch.Generator) -> Tensor:
    mean, std = stats[0][pos], stats[1][pos]
    return scaling * (mean + std * torch.randn(mean.shape, generator=g))


def sd_batch_fn(train: DigitsSplit, vae, prompt_embeds: Tensor, batch_size: int, seed: int):
    """Batch ``k`` for the SD teacher: (scaled latents, {"encoder_hidden_states"}, generator).

    ``prompt_embeds`` is ``(41, 77, D)``: the frozen encoder's output for :func:`all_prompts` (last row = ``""``).
    """
    stats = encode_latent_stats(vae, train.images)
    scaling = float(vae.config.scaling_factor)
    n_templates = len(PROMPT_TEMPLATES)

    def make(k: int):
        b = sample_batch(train, k, batch_size, seed=seed)
        idx = _drop(b.labels * n_templates + b.templates, prompt_embeds.shape[0] - 1, b.generator)
        x0 = _latents(stats, b.positions, scaling, b.generator)
        return x0, {"encoder_hidden_states": prompt_embeds[idx]}, b.generator

    return make


def dit_batch_fn(train: DigitsSplit, vae, batch_size: int, seed: int):
    """Batch ``k`` for the DiT teacher; labels are dropped to 1000 inside DiT's LabelEmbedding (train mode)."""
    stats = encode_latent_stats(vae, train.images)
    scaling = float(vae.config.scaling_factor)

    def make(k: int):
        b = sample_batch(train, k, batch_size, seed=seed)
        return _latents(stats, b.positions, scaling, b.generator), {"class_labels": b.labels}, b.generator

    return make


def unet_batch_fn(train: DigitsSplit, batch_size: int, seed: int):
    """Batch ``k`` for the pixel UNet: images in [-1, 1] and labels dropped to the null class 10 w.p. 0.1."""

    def make(k: int):
        b = sample_batch(train, k, batch_size, seed=seed)
        return b.images, {"class_labels": _drop(b.labels, UNET_NULL_CLASS, b.generator)}, b.generator

    return make


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainSettings:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 2e-3
    warmup: int = 100
    ema_decay: float = 0.999
    seed: int = 0
    log_every: int = 250
    log: list = field(default_factory=list)


def train_eps_model(
    model: nn.Module,
    make_batch: Callable[[int], tuple[Tensor, dict, torch.Generator]],
    scheduler_config: dict,
    settings: TrainSettings,
    progress: bool = True,
) -> nn.Module:
    """Train ``model`` with the epsilon loss (Ho et al. 2020, eq. 14); return its EMA copy (eval mode)."""
    from diffusers import DDPMScheduler

    acp = DDPMScheduler(**{k: v for k, v in scheduler_config.items() if k not in ("steps_offset", "set_alpha_to_one")
                           and k != "timestep_spacing"}).alphas_cumprod.float()
    T = acp.numel()
    torch.manual_seed(settings.seed)  # DiT's internal label dropout draws from the global generator
    model.train()
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=0.0)

    def lr_at(k: int) -> float:
        if k < settings.warmup:
            return (k + 1) / settings.warmup
        p = (k - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=settings.steps, desc="train", mininterval=5.0)
    start = time.perf_counter()
    running = 0.0
    for k in range(settings.steps):
        x0, cond, g = make_batch(k)
        t = torch.randint(0, T, (x0.shape[0],), generator=g)
        eps = torch.randn(x0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
        pred = model(x_t, t, **cond).sample
        pred = pred[:, : x0.shape[1]]
        loss = F.mse_loss(pred, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(settings.ema_decay, (1 + k) / (10 + k))  # EMA warm-up
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        running += loss.item()
        if (k + 1) % settings.log_every == 0:
            settings.log.append({"step": k + 1, "loss": running / settings.log_every,
                                 "seconds": round(time.perf_counter() - start, 1)})
            if bar is not None:
                bar.set_postfix(loss=f"{running / settings.log_every:.4f}")
            running = 0.0
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.eval()
    return ema
