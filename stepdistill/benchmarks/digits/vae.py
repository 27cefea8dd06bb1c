"""The digits VAE: a tiny Diffusers ``AutoencoderKL`` shared by the latent teachers (SD and DiT).

Layout: 1 x 16 x 16 pixels in [-1, 1] <-> 4 x 8 x 8 latents (two encoder blocks, so the spatial
factor is 2 = 2^(len(block_out_channels) - 1), the factor Diffusers pipelines derive). One input
channel because the digits are grey-level; pipelines then return ``(B, 1, 16, 16)`` tensors and
mode-"L" PIL images.

Loss (Kingma & Welling 2014, the beta-weighted ELBO; SD's VAE adds perceptual and GAN terms that a
toy does not need)::

    L = mean_pixels (x - D(z))^2 + beta * KL(q(z|x) || N(0, I)) / n_pixels,   z ~ q(z|x)

with ``beta = 1e-3`` (:data:`KL_WEIGHT`); the KL term is summed over latent entries and divided by
the number of pixels so beta does not depend on the image size. The small KL keeps the posterior
close to a smooth, roughly Gaussian latent cloud that a diffusion model can learn.

``scaling_factor`` (Rombach et al. 2022, Sec. 4.3 / Appendix G) is set to 1 / std of the posterior
samples over the train split, so that ``scaling_factor * z`` has unit standard deviation, and
written into the saved config (the field every Diffusers latent pipeline reads).
"""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from .data import IMAGE_SIZE, DigitsSplit, sample_batch

__all__ = ["KL_WEIGHT", "LATENT_CHANNELS", "LATENT_SIZE", "build_vae", "encode_latent_stats", "fit_scaling_factor", "train_vae"]

KL_WEIGHT = 1e-3
LATENT_CHANNELS = 4
LATENT_SIZE = IMAGE_SIZE // 2


def build_vae() -> AutoencoderKL:
    """A freshly initialised tiny ``AutoencoderKL`` (about 0.17M parameters)."""
    return AutoencoderKL(
        in_channels=1,
        out_channels=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        act_fn="silu",
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,
        force_upcast=False,
    )


def train_vae(
    train: DigitsSplit,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 2e-3,
    kl_weight: float = KL_WEIGHT,
    seed: int = 2,
    log_every: int = 500,
    progress: bool = False,
) -> tuple[AutoencoderKL, list[dict]]:
    """Train :func:`build_vae` on ``train``; returns the model (eval mode, scaling factor fitted) and a log."""
    torch.manual_seed(seed)
    vae = build_vae().train()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    n_pix = IMAGE_SIZE * IMAGE_SIZE
    log = []
    steps_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc="vae", mininterval=5.0)
    for step in steps_iter:
        batch = sample_batch(train, step, batch_size, seed=seed)
        post = vae.encode(batch.images).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=batch.generator)
        recon = vae.decode(z).sample
        rec = (recon - batch.images).pow(2).mean()
        kl = post.kl().mean() / n_pix
        loss = rec + kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % log_every == 0 or step == 0:
            log.append({"step": step + 1, "mse": float(rec), "kl_per_pixel": float(kl)})
    vae.eval().requires_grad_(False)
    fit_scaling_factor(vae, train)
    return vae, log


@torch.no_grad()
def encode_latent_stats(vae: AutoencoderKL, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior mean and std ``(N, 4, 8, 8)`` of ``images`` (unscaled latents)."""
    means, stds = [], []
    for chunk in images.split(256):
        post = vae.encode(chunk).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def fit_scaling_factor(vae: AutoencoderKL, train: DigitsSplit, seed: int = 0) -> float:
    """Set ``vae.config.scaling_factor = 1 / std(z)`` with ``z ~ q(z|x)`` over the train split."""
    mean, std = encode_latent_stats(vae, train.images)
    g = torch.Generator().manual_seed(seed)
    z = mean + std * torch.randn(mean.shape, generator=g)
    factor = float(1.0 / z.double().std())
    vae.register_to_config(scaling_factor=factor)
    return factor
