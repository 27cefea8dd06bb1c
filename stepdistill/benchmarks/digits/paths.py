"""Where the committed digits assets live, and the one lookup every loader goes through."""

from __future__ import annotations

from pathlib import Path

__all__ = ["ASSETS_DIR", "TEACHER_NAMES", "asset_path", "load_digits_teacher"]

ASSETS_DIR = Path(__file__).resolve().parent / "assets"

# name -> (folder under assets/, what it is)
TEACHER_NAMES = {
    "sd": "prompt-conditioned StableDiffusionPipeline (tiny AutoencoderKL + frozen CLIP text encoder + UNet2DConditionModel)",
    "dit": "class-conditional DiTPipeline (DiTTransformer2DModel on the same VAE latents)",
    "unet": "class-conditional pixel-space UNet2DModel (DDPMPipeline-shaped folder; sample with sampling.sample_with_scheduler or resolve_teacher)",
}


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
