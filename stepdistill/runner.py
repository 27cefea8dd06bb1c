"""Glue from a validated run config to a trained, exported student: resolve the teacher, build the recipe and the
data, hand them to the shared training loop, export.

Teacher names (``teacher.path``) understood besides local folders / cached repo ids:

* ``toy2d:NAME_OR_JSON`` -- the analytic Gaussian-mixture teacher (``stepdistill.benchmarks.toy2d``);
* ``digits:sd`` / ``digits:dit`` / ``digits:unet`` -- the committed digits teachers;
* ``tiny:FAMILY`` -- a tiny random pipeline built offline (tests and smoke runs only; it generates noise).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .config import RunConfig, load_config
from .models.teacher_io import TeacherBundle, load_pipeline
from .recipes.base import Recipe, get_recipe_class

__all__ = ["resolve_teacher", "teacher_dtype", "build_recipe", "run_training", "export_run", "default_device", "CONFIG_FILE"]

CONFIG_FILE = "config.yaml"
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def default_device() -> torch.device:
    from .training.loop import process_state  # CPU-aware: multi-process runs on GPU-less machines use gloo

    return process_state().device


def teacher_dtype(name: str, device: torch.device | str | None = None) -> torch.dtype:
    """The torch dtype of ``teacher.dtype``; 'auto' = bf16 on a CUDA device that supports it, fp32 otherwise (bf16
    matmuls on CPU are several times slower than fp32)."""
    if name != "auto":
        return _DTYPES[name]
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def resolve_teacher(cfg: RunConfig) -> TeacherBundle:
    path = cfg.teacher.path
    if not path:
        raise ValueError("teacher.path is empty; set it to a local Diffusers pipeline folder, 'digits:sd', or 'toy2d:ring8'")
    if path.startswith("toy2d:"):
        from .benchmarks.toy2d.bundle import toy_teacher_bundle

        return toy_teacher_bundle(path.split(":", 1)[1] or "ring8")
    if path.startswith("digits:"):
        from .benchmarks.digits.paths import load_digits_teacher

        path = str(load_digits_teacher(path.split(":", 1)[1]))
    elif path.startswith("tiny:"):
        from .testing.tiny_pipelines import tiny_pipeline_dir

        path = str(tiny_pipeline_dir(path.split(":", 1)[1]))
    pipe = load_pipeline(path, torch_dtype=teacher_dtype(cfg.teacher.dtype), variant=cfg.teacher.variant)
    return TeacherBundle.from_pipeline(pipe.to(default_device()), resolution=cfg.data.resolution)


def build_recipe(cfg: RunConfig, teacher: TeacherBundle | None = None, device=None) -> Recipe:
    cls = get_recipe_class(cfg.recipe.name)
    teacher = teacher if teacher is not None else resolve_teacher(cfg)
    return cls(teacher, cfg.recipe.options, device if device is not None else default_device())


def _data_factory(cfg: RunConfig):
    from .training.data import build_data_factory

    if cfg.data.kind == "toy2d":
        import stepdistill.benchmarks.toy2d.bundle  # noqa: F401  (registers the data kind)
    return build_data_factory(cfg.data)


def run_training(cfg: RunConfig, export: bool = True) -> Path:
    """Train ``cfg`` (resuming per ``run.resume``), then export the student when the teacher is a pipeline."""
    from .training.loop import train

    from .training.data import seed_everything

    data_factory = _data_factory(cfg)  # validates data paths before any model loads
    seed_everything(cfg.run.seed)  # same initial weights on every process and every rerun (rank 0's stream)
    recipe = build_recipe(cfg)
    run_dir = Path(train(cfg, recipe, data_factory))
    if export and getattr(recipe.teacher, "pipeline", None) is not None:
        from accelerate import PartialState

        if PartialState().is_main_process:
            out = Path(cfg.export.output_dir or run_dir / "export")
            _load_final_weights(recipe, run_dir, cfg.export.use_ema)
            recipe.export(out)
    return run_dir


def _load_final_weights(recipe: Recipe, run_dir: Path, use_ema: bool) -> None:
    from .training.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        load_recipe_checkpoint(ckpt, recipe, use_ema=use_ema)


def load_recipe_checkpoint(path: str | Path, recipe: Recipe, use_ema: bool = True) -> None:
    """Load a verified checkpoint's recipe state into ``recipe``; with ``use_ema`` and an ``ema.safetensors``, the
    evaluation-EMA weights then replace the trained modules' trainable parameters (what gets exported)."""
    from .models.backbones import unwrap
    from .training.checkpoint import read_checkpoint

    ckpt = read_checkpoint(path)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.tensors("recipe_state").items():
        group, _, sub = key.partition(".")
        groups.setdefault(group, {})[sub] = value
    recipe.load_state_dict_from_checkpoint(groups)
    if use_ema and ckpt.has("ema.safetensors"):
        modules = recipe.trainable_modules()
        with torch.no_grad():
            for key, value in ckpt.tensors("ema").items():
                name, _, param = key.partition(".")
                target = dict(unwrap(modules[name]).named_parameters())[param]
                target.copy_(value.to(target.dtype))


def export_run(run_dir: str | Path, out_dir: str | Path, checkpoint: str | Path | None = None,
               overrides: list[str] | None = None) -> Path:
    """Rebuild the run's recipe from its saved config, load its newest valid checkpoint, export it.

    ``overrides`` (``key=value``, as for ``train``) change the saved config for this export only: meant for sampling
    options (``recipe.sample_max_timestep``, ``recipe.t_max``, ``recipe.sample_steps``); one that changes the networks
    fails when the checkpoint is loaded."""
    from .training.checkpoint import latest_checkpoint

    run_dir = Path(run_dir)
    cfg_file = run_dir / CONFIG_FILE
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{run_dir} has no {CONFIG_FILE}; pass the run directory a `stepdistill train` created")
    cfg = load_config(cfg_file, list(overrides or []))
    ckpt = Path(checkpoint) if checkpoint else latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint to export; train first (or resume the run)")
    recipe = build_recipe(cfg)
    load_recipe_checkpoint(ckpt, recipe, use_ema=cfg.export.use_ema)
    return Path(recipe.export(out_dir))
