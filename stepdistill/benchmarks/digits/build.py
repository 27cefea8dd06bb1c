"""Assemble, train and save a digits teacher folder, and measure it (used by scripts/build_digits_assets.py).

:func:`build_teacher_folder` writes a complete Diffusers pipeline folder (``save_pretrained``, safetensors only);
:func:`evaluate_teacher` reloads it through stepdistill's own loader (``teacher_io.load_pipeline`` +
``TeacherBundle``, the path ``runner.resolve_teacher('digits:NAME')`` takes) and reports, for each step count,
the domain FID against the 360 held-out test digits and the class accuracy of the CFG samples, plus a check of the
stock pipeline's own ``__call__``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import torch

from . import teachers as T
from .data import load_split
from .paths import asset_path

__all__ = ["build_teacher_folder", "evaluate_teacher"]


def _load_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(asset_path("vae")).eval().requires_grad_(False)


def build_teacher_folder(name: str, folder: str | Path, *, steps: int, batch_size: int, seed: int = 0,
                         progress: bool = True) -> dict:
    """Train teacher ``name`` ("sd", "dit" or "unet") and save its pipeline to ``folder``; return build info."""
    from diffusers import DDPMPipeline, DiTPipeline, StableDiffusionPipeline

    folder = Path(folder)
    train = load_split("train")
    settings = T.TrainSettings(steps=steps, batch_size=batch_size, seed=seed)
    scheduler = T.make_scheduler(name)
    sched_cfg = dict(scheduler.config)
    if name == "sd":
        vae = _load_vae()
        tokenizer, text_encoder = T.build_sd_text_encoder(seed)
        unet = T.build_sd_unet(seed)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       image_encoder=None, requires_safety_checker=False)
        with torch.no_grad():
            table, _ = pipe.encode_prompt(T.all_prompts(), "cpu", 1, False)
        make = T.sd_batch_fn(train, vae, table, batch_size, seed)
        pipe.register_modules(unet=T.train_eps_model(unet, make, sched_cfg, settings, progress))
        backbone = pipe.unet
    elif name == "dit":
        vae = _load_vae()
        transformer = T.build_dit_transformer(seed)
        make = T.dit_batch_fn(train, vae, batch_size, seed)
        ema = T.train_eps_model(transformer, make, sched_cfg, settings, progress)
        from .data import DIGIT_WORDS

        pipe = DiTPipeline(transformer=ema, vae=vae, scheduler=scheduler,
                           id2label={i: f"{i}, {w}" for i, w in enumerate(DIGIT_WORDS)})
        backbone = ema
    elif name == "unet":
        unet = T.build_unet(seed)
        make = T.unet_batch_fn(train, batch_size, seed)
        backbone = T.train_eps_model(unet, make, sched_cfg, settings, progress)
        pipe = DDPMPipeline(unet=backbone, scheduler=scheduler)
    else:
        raise ValueError(f"unknown digits teacher {name!r}; expected 'sd', 'dit' or 'unet'")
    if folder.exists():
        shutil.rmtree(folder)
    pipe.save_pretrained(folder, safe_serialization=True)
    return {"teacher": name, "pipeline": type(pipe).__name__, "scheduler": type(scheduler).__name__,
            "scheduler_config": {k: v for k, v in sched_cfg.items() if not k.startswith("_")},
            "backbone_params": sum(p.numel() for p in backbone.parameters()), "seed": seed, "loss_log": settings.log}


def _stock_check(folder: Path, n: int, steps: int, cfg_scale: float) -> dict:
    """Sample ``n`` images with the stock pipeline's ``__call__`` (unet: the DDPMPipeline loop plus labels)."""
    from diffusers import DiffusionPipeline

    from .domain_fid import class_accuracy
    from .sampling import sample_with_scheduler

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    labels = torch.arange(n) % 10
    g = torch.Generator().manual_seed(1)
    kind = type(pipe).__name__
    if kind == "StableDiffusionPipeline":
        prompts = [f"a handwritten digit {int(y)}" for y in labels]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=cfg_scale, generator=g, output_type="pt").images
        rng = (0.0, 1.0)
    elif kind == "DiTPipeline":
        images = pipe(class_labels=labels.tolist(), num_inference_steps=steps, guidance_scale=cfg_scale, generator=g,
                      output_type="np").images
        images, rng = torch.from_numpy(images).permute(0, 3, 1, 2), (0.0, 1.0)
    else:
        images, rng = sample_with_scheduler(pipe, labels, num_inference_steps=steps, guidance_scale=cfg_scale), (-1.0, 1.0)
    return {"call": f"{kind}.__call__" if kind != "DDPMPipeline" else "sampling.sample_with_scheduler",
            "scheduler": type(pipe.scheduler).__name__, "num_inference_steps": steps, "guidance_scale": cfg_scale,
            "n": n, "shape": list(images.shape), "class_accuracy": class_accuracy(images, labels, value_range=rng)}


def evaluate_teacher(folder: str | Path, *, n_samples: int = 1000, steps=(1, 2, 50), cfg_scale: float = 3.0,
                     solvers=("ddim", "dpmpp_2m"), stock_samples: int = 200, ancestral: bool = False) -> dict:
    """Domain FID (vs the test split) and class accuracy of ``n_samples`` CFG samples for each solver and step count."""
    from .domain_fid import class_accuracy, domain_fid
    from .sampling import eval_conditions, load_bundle, sample_bundle

    folder = Path(folder)
    bundle = load_bundle(folder)
    labels, conds = eval_conditions(bundle, n_samples)
    rows = []
    for solver in solvers:
        for k in steps:
            if solver == "dpmpp_2m" and k == 1:
                continue  # identical to DDIM at one step
            t0 = time.perf_counter()
            x = sample_bundle(bundle, conds, steps=k, cfg_scale=cfg_scale, solver=solver, seed=0)
            rows.append({"solver": solver, "steps": k, "nfe": 2 * k, "cfg_scale": cfg_scale,
                         "domain_fid": domain_fid(x), "class_accuracy": class_accuracy(x, labels),
                         "seconds": round(time.perf_counter() - t0, 1)})
            print(rows[-1], flush=True)
    out = {"n_samples": n_samples, "reference": "test split (360 real digits)", "sampler": "stepdistill "
           "sample_deterministic on trailing timesteps via TeacherBundle", "results": rows}
    if ancestral:
        out["ancestral_results"] = _ancestral_rows(folder, labels, steps, cfg_scale)
    out["stock_pipeline"] = _stock_check(folder, stock_samples, max(steps), cfg_scale)
    return out


def _ancestral_rows(folder: Path, labels, steps, cfg_scale: float) -> list[dict]:
    """The pixel UNet's own stochastic sampler: the folder's DDPMScheduler (ancestral DDPM, Ho et al. 2020 Alg. 2)
    on a "trailing" grid of ``k`` steps, through :func:`sampling.sample_with_scheduler`."""
    from diffusers import DiffusionPipeline

    from .domain_fid import class_accuracy, domain_fid
    from .sampling import sample_with_scheduler

    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    # trailing spacing so that 1 and 2 steps start from t = 999 like the deterministic rows (leading would start
    # 1 step at t = 0)
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config, timestep_spacing="trailing")
    rows = []
    for k in steps:
        t0 = time.perf_counter()
        x = torch.cat([sample_with_scheduler(pipe, chunk, num_inference_steps=k, guidance_scale=cfg_scale, seed=i)
                       for i, chunk in enumerate(labels.split(500))])
        rows.append({"solver": f"{type(pipe.scheduler).__name__} (ancestral)", "steps": k, "nfe": 2 * k,
                     "cfg_scale": cfg_scale, "domain_fid": domain_fid(x, value_range=(-1.0, 1.0)),
                     "class_accuracy": class_accuracy(x, labels), "seconds": round(time.perf_counter() - t0, 1)})
        print(rows[-1], flush=True)
    return rows
