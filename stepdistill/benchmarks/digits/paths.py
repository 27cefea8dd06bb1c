"""Where the committed digits assets live, and the one lookup every loader goes through."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "TEACHER_GUIDANCE", "TEACHER_NAMES", "asset_path", "load_digits_teacher", "teacher_guidance"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# name -> (folder under assets/, what it is)
TEACHER_NAMES = {
    "sd": "prompt-conditioned StableDiffusionPipeline (tiny AutoencoderKL + frozen CLIP text encoder + UNet2DConditionModel)",
    "dit": "class-conditional DiTPipeline (DiTTransformer2DModel on the same VAE latents)",
    "unet": "class-conditional pixel-space UNet2DModel (DDPMPipeline-shaped folder; sample with sampling.sample_with_scheduler or resolve_teacher)",
}

# name -> the teacher's benchmark classifier-free guidance scale (Imagen w). The class-conditional teachers draw
# nearly one digit per class at w = 3 (25-step DDIM, 500 samples, domain FID / class accuracy: DiT 670 / 1.00 at
# w = 3 vs 136 / 0.99 at w = 1.5; pixel UNet 349 / 0.994 at w = 3, 162 / 0.978 at w = 2, 73 / 0.968 at w = 1.5),
# so they are benchmarked at w = 1.5. The SD teacher keeps w = 3 (its distillation results are at w = 3).
TEACHER_GUIDANCE = {"sd": 3.0, "dit": 1.5, "unet": 1.5}


def teacher_guidance(ref: str | None, default: float = 3.0) -> float:
    """The benchmark guidance scale of a teacher reference: ``TEACHER_GUIDANCE`` for ``digits:NAME``, else
    ``default``."""
    if ref and str(ref).startswith("digits:"):
        return TEACHER_GUIDANCE.get(str(ref).split(":", 1)[1], default)
    return default


def asset_path(name: str, what: str | None = None) -> Path:
    """``assets/<name>``, or a clear error naming the build command (``--what <what>``, default ``name``)."""
    path = ASSETS_DIR / name
    if not path.exists():
        raise FileNotFoundError(
            f"digits asset {name!r} is missing at {path}; build it with "
            f"`python scripts/build_digits_assets.py --what {what or name}`"
        )
    return path


def load_digits_teacher(name: str) -> Path:
    """The committed teacher folder for ``name`` in ``TEACHER_NAMES`` ("sd", "dit", "unet").

    The folder loads with ``diffusers.DiffusionPipeline.from_pretrained(path)``.
    """
    if name not in TEACHER_NAMES:
        raise ValueError(f"unknown digits teacher {name!r}; choose one of {sorted(TEACHER_NAMES)}")
    path = asset_path(f"teacher_{name}", what=name)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path} has no model_index.json; rebuild with --what {name}")
    return path
