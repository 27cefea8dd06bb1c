"""Sampling the digits teachers, and the two ways to do it.

1. stepdistill's own sampler (:func:`sample_bundle`): a ``TeacherBundle`` (``runner.resolve_teacher('digits:sd')``,
   or :func:`load_bundle`) gives the Denoiser, the condition encoder and the latent codec; the PF-ODE is integrated
   with ``diffusion.solvers.sample_deterministic`` (DDIM or DPM-Solver++(2M)) on the trailing timestep grid, with
   batched classifier-free guidance ``eps_u + w (eps_c - eps_u)`` (Ho & Salimans 2022, "imagen" convention).
   This works for all three teachers, including the class-conditional pixel UNet.
2. the stock pipelines: ``DiffusionPipeline.from_pretrained(path)`` and

   * sd:  ``pipe("a handwritten digit 3", num_inference_steps=50, guidance_scale=3.0, height=16, width=16)``
   * dit: ``pipe(class_labels=[3], num_inference_steps=50, guidance_scale=3.0)``
   * unet: stock ``DDPMPipeline.__call__`` cannot pass class labels, so :func:`sample_with_scheduler` runs the
     same loop as ``DDPMPipeline`` (the folder's own scheduler) with ``class_labels`` and CFG through the null
     class 10.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ...diffusion.solvers import sample_deterministic, trailing_timesteps
from .data import NUM_CLASSES, PROMPT_TEMPLATES, prompt_for

__all__ = ["eval_conditions", "load_bundle", "sample_bundle", "sample_with_scheduler"]


def load_bundle(name_or_folder: str | Path):
    """A ``TeacherBundle`` for ``"sd"``/``"dit"``/``"unet"`` (the committed teachers) or a pipeline folder."""
    from ...models.teacher_io import TeacherBundle, load_pipeline
    from .paths import TEACHER_NAMES, load_digits_teacher

    folder = load_digits_teacher(name_or_folder) if str(name_or_folder) in TEACHER_NAMES else Path(name_or_folder)
    return TeacherBundle.from_pipeline(load_pipeline(folder))


def eval_conditions(bundle, n: int) -> tuple[Tensor, list[str] | Tensor]:
    """Labels ``i % 10`` and the matching conditions: prompts cycling through every template for a text teacher
    (``"a handwritten digit 0"``, ..., ``"the number zero"``, ...), the labels themselves otherwise."""
    labels = torch.arange(n) % NUM_CLASSES
    if getattr(bundle.pipeline, "text_encoder", None) is None:
        return labels, labels
    templates = (torch.arange(n) // NUM_CLASSES) % len(PROMPT_TEMPLATES)
    return labels, [prompt_for(int(y), int(k)) for y, k in zip(labels, templates)]


@torch.no_grad()
def sample_bundle(bundle, conditions: Sequence[str] | Tensor, *, steps: int, cfg_scale: float | None = 3.0,
                  solver: str = "ddim", seed: int = 0, batch_size: int = 500) -> Tensor:
    """Images in [-1, 1], ``(N, C, H, W)``, one per condition, from ``steps`` solver steps (NFE = steps, x2 with CFG).

    ``cfg_scale=None`` (or 1) samples the conditional model without guidance.
    """
    process = bundle.denoiser.process
    timesteps = trailing_timesteps(process.num_train_timesteps, steps)
    g = torch.Generator().manual_seed(seed)
    n = len(conditions)
    noise = torch.randn((n, *bundle.sample_shape), generator=g)
    device = next(bundle.denoiser.backbone.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        chunk = conditions[start:start + batch_size]
        cond, uncond = bundle.encode_conditions(chunk, device)
        guided = cfg_scale is not None and cfg_scale != 1.0

        def predict(x, t, cond=cond, uncond=uncond):
            r = bundle.denoiser.predict(x, t, cond, want=("x0", "eps"), cfg_scale=cfg_scale if guided else None,
                                        uncond=uncond if guided else None)
            return r["x0"], r["eps"]

        x0 = sample_deterministic(predict, process, timesteps, noise[start:start + batch_size].to(device), solver)
        out.append(bundle.codec.decode(x0).clamp(-1, 1).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_with_scheduler(pipe, class_labels: Sequence[int] | Tensor, *, num_inference_steps: int = 50,
                          guidance_scale: float = 3.0, seed: int = 0) -> Tensor:
    """``DDPMPipeline``'s loop with class labels and CFG (null class = ``num_class_embeds - 1``) for the pixel UNet.

    Uses the folder's own scheduler (``pipe.scheduler``, any Diffusers scheduler). Returns images in [-1, 1].
    """
    unet = pipe.unet
    labels = torch.as_tensor(class_labels, dtype=torch.long).reshape(-1).to(unet.device)
    null = torch.full_like(labels, int(unet.config.num_class_embeds) - 1)
    g = torch.Generator().manual_seed(seed)
    shape = (labels.shape[0], unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.randn(shape, generator=g).to(unet.device)
    pipe.scheduler.set_timesteps(num_inference_steps)
    for t in pipe.scheduler.timesteps:
        if guidance_scale != 1.0:
            eps_c, eps_u = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.chunk(2)
            eps = eps_u + guidance_scale * (eps_c - eps_u)
        else:
            eps = unet(x, t, class_labels=labels).sample
        x = pipe.scheduler.step(eps, t, x, generator=g).prev_sample
    return x.clamp(-1, 1)
