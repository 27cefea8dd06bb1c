"""Load a teacher from a local Diffusers pipeline folder and turn its parts into what recipes need.

* ``load_pipeline(path)``: a local folder (with ``model_index.json``) or a repo id already in the local Hugging Face
  cache; never touches the network. A missing folder or component is reported by name with how to fix it.
* ``denoiser_from_pipeline(pipe)``: the pipeline's UNet/transformer as a ``Denoiser`` on the scheduler's process.
* ``ConditionEncoder``: prompts (or class labels) -> (cond, uncond) ``Conditioning`` via the pipeline's own
  ``encode_prompt`` (so the unconditional input is exactly what the stock pipeline uses for CFG, spec A.3).
* ``LatentCodec``: VAE encode/decode with the pipeline's scaling (identity for pixel-space teachers).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from ..diffusion.processes import process_from_scheduler_config
from .conditioning import Conditioning
from .denoiser import Denoiser

__all__ = ["TeacherLoadError", "load_pipeline", "denoiser_from_pipeline", "ConditionEncoder", "LatentCodec",
           "pipeline_backbone_name"]


class TeacherLoadError(RuntimeError):
    """A teacher folder is missing, incomplete or unreadable."""


def _resolve_local(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.exists():
        return p
    if isinstance(path, str) and path.count("/") == 1 and not path.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(path, local_files_only=True))
        except Exception as exc:  # noqa: BLE001 - any cache miss becomes one clear message
            raise TeacherLoadError(
                f"teacher {path!r} is not a local folder and is not in the local Hugging Face cache ({exc.__class__.__name__}). "
                f"No network access is used at run time: download it once with `huggingface-cli download {path} "
                f"--local-dir PATH` on a machine with internet and set teacher.path=PATH"
            ) from None
    raise TeacherLoadError(
        f"teacher folder {str(p)!r} does not exist; set teacher.path to a local Diffusers pipeline folder "
        f"(one containing model_index.json)"
    )


def check_pipeline_folder(folder: Path) -> dict:
    """Validate ``model_index.json`` and that every listed component folder exists; return the index."""
    index_file = folder / "model_index.json"
    if not index_file.exists():
        raise TeacherLoadError(
            f"{folder} has no model_index.json, so it is not a Diffusers pipeline folder; point teacher.path at the "
            f"folder that contains model_index.json (save one with pipe.save_pretrained(PATH))"
        )
    try:
        index = json.loads(index_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TeacherLoadError(f"{index_file} is not valid JSON ({exc}); re-save the pipeline") from None
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or spec[0] is None:
            continue
        if not (folder / name).is_dir():
            raise TeacherLoadError(
                f"teacher folder {folder} lists component {name!r} ({spec[1]}) in model_index.json but the folder "
                f"{folder / name} is missing; copy the complete pipeline (all component folders)"
            )
        _check_component_files(folder, name, str(spec[0]), str(spec[1]) if len(spec) > 1 else "")
    return index


_NO_WEIGHTS = ("Scheduler", "Tokenizer", "FeatureExtractor", "ImageProcessor", "Processor")
_PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def _check_component_files(folder: Path, name: str, library: str, class_name: str) -> None:
    """The files a component needs: ``scheduler_config.json`` for schedulers; ``config.json`` plus complete
    safetensors weights for models (pickled weights are refused). Tokenizers/processors are left to their loaders."""
    comp = folder / name
    if class_name.endswith("Scheduler") or "Scheduler" in class_name:
        if not (comp / "scheduler_config.json").is_file():
            raise TeacherLoadError(f"teacher component {name!r} ({class_name}) is incomplete: expected the file "
                                   f"{comp / 'scheduler_config.json'}, which is missing; copy it from the original "
                                   f"pipeline")
        return
    if any(word in class_name for word in _NO_WEIGHTS):
        return
    if not (comp / "config.json").is_file():
        raise TeacherLoadError(f"teacher component {name!r} ({class_name}) is incomplete: expected the file "
                               f"{comp / 'config.json'}, which is missing; copy the complete component folder")
    files = [p for p in comp.iterdir() if p.is_file()]
    weights = [p for p in files if p.name.endswith(".safetensors")]
    if not weights and not any(p.name.endswith(".safetensors.index.json") for p in files):
        pickles = [p.name for p in files if p.suffix in _PICKLE_WEIGHTS]
        if pickles:
            raise TeacherLoadError(
                f"refusing to load teacher component {name!r}: its weights {', '.join(pickles)} are Python pickles, "
                f"and unpickling a file can run arbitrary code; stepdistill only loads safetensors. If you trust "
                f"the file, convert the pipeline once: DiffusionPipeline.from_pretrained(PATH)"
                f".save_pretrained(NEW_PATH, safe_serialization=True)")
        expected = "diffusion_pytorch_model.safetensors" if library == "diffusers" else "model.safetensors"
        raise TeacherLoadError(f"teacher component {name!r} ({class_name}) has no weights: expected the file "
                               f"{comp / expected} (or sharded *.safetensors with an index), which is missing; copy "
                               f"the complete component folder")
    from ..training.checkpoint import safetensors_problem

    for path in weights:
        problem = safetensors_problem(path)
        if problem is not None:
            raise TeacherLoadError(f"teacher weights {path} are unreadable: {problem}. Re-download or re-save the "
                                   f"pipeline (the file is truncated or corrupt)")


def load_pipeline(path: str | os.PathLike, torch_dtype: torch.dtype | None = None, **kwargs):
    """``DiffusionPipeline.from_pretrained`` on a local folder (local_files_only), with clear errors."""
    from diffusers import DiffusionPipeline

    folder = _resolve_local(path)
    check_pipeline_folder(folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True, torch_dtype=torch_dtype, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise TeacherLoadError(f"could not load the Diffusers pipeline in {folder}: {exc}") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_backbone_name(pipe) -> str:
    for name in ("unet", "transformer"):
        if getattr(pipe, name, None) is not None:
            return name
    raise TeacherLoadError(f"{type(pipe).__name__} has neither a unet nor a transformer component")


def denoiser_from_pipeline(pipe, backbone=None) -> Denoiser:
    """The pipeline's denoising network as a ``Denoiser`` on the process its scheduler defines."""
    config = dict(pipe.scheduler.config)
    config["_class_name"] = type(pipe.scheduler).__name__
    try:
        process, prediction = process_from_scheduler_config(config)
    except ValueError as exc:
        where = Path(getattr(pipe, "name_or_path", "") or ".") / "scheduler" / "scheduler_config.json"
        raise TeacherLoadError(f"the teacher's scheduler config ({where}) is not usable: {exc}") from None
    return Denoiser(backbone if backbone is not None else getattr(pipe, pipeline_backbone_name(pipe)), process, prediction)


class ConditionEncoder:
    """Prompts or class labels -> (cond, uncond) for one pipeline family, using the pipeline's own encoders."""

    def __init__(self, pipe, resolution: int | None = None):
        self.pipe = pipe
        self.kind = type(pipe).__name__
        self.resolution = resolution

    @property
    def is_class_conditional(self) -> bool:
        return getattr(self.pipe, "text_encoder", None) is None and getattr(self.pipe, "transformer", None) is not None \
            and hasattr(self.pipe.transformer.config, "num_embeds_ada_norm")

    def null_class(self) -> int:
        """The unconditional label: DiT's extra CFG row ``num_embeds_ada_norm`` (1000, what DiTPipeline uses); for a
        class-conditional UNet2DModel the last embedding row ``num_class_embeds - 1`` (the digits convention)."""
        backbone = getattr(self.pipe, pipeline_backbone_name(self.pipe))
        cfg = backbone.config
        if getattr(cfg, "num_embeds_ada_norm", None):
            return int(cfg.num_embeds_ada_norm)
        if getattr(cfg, "num_class_embeds", None):
            return int(cfg.num_class_embeds) - 1
        raise TypeError(f"{type(backbone).__name__} is not class-conditional (no num_embeds_ada_norm / num_class_embeds)")

    @torch.no_grad()
    def encode(self, prompts: Sequence[str] | Tensor, device=None) -> tuple[Conditioning, Conditioning]:
        device = device or self.pipe.device
        if torch.is_tensor(prompts):  # class labels
            labels = prompts.to(device).long()
            return Conditioning(class_labels=labels), Conditioning(class_labels=torch.full_like(labels, self.null_class()))
        prompts = list(prompts)
        if not prompts:
            raise ValueError("no prompts to encode (empty batch)")
        p = self.pipe
        name = self.kind
        if "XL" in name:
            pe, npe, pooled, npooled = p.encode_prompt(prompt=prompts, device=device, num_images_per_prompt=1,
                                                      do_classifier_free_guidance=True)
            size = (self.resolution or p.default_sample_size * p.vae_scale_factor,) * 2
            proj = p.text_encoder_2.config.projection_dim if p.text_encoder_2 is not None else int(pooled.shape[-1])
            ids = p._get_add_time_ids(size, (0, 0), size, dtype=pe.dtype, text_encoder_projection_dim=proj).to(device)
            ids = ids.repeat(len(prompts), 1)
            return (Conditioning(encoder_hidden_states=pe, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}),
                    Conditioning(encoder_hidden_states=npe, added_cond_kwargs={"text_embeds": npooled, "time_ids": ids}))
        if "StableDiffusion3" in name:
            pe, npe, pooled, npooled = p.encode_prompt(prompt=prompts, prompt_2=None, prompt_3=None, device=device,
                                                      do_classifier_free_guidance=True)
            return (Conditioning(encoder_hidden_states=pe, pooled_projections=pooled),
                    Conditioning(encoder_hidden_states=npe, pooled_projections=npooled))
        if "PixArt" in name or "Sana" in name:
            pe, mask, npe, nmask = p.encode_prompt(prompts, do_classifier_free_guidance=True, negative_prompt="", device=device)
            return (Conditioning(encoder_hidden_states=pe, encoder_attention_mask=mask),
                    Conditioning(encoder_hidden_states=npe, encoder_attention_mask=nmask))
        if hasattr(p, "encode_prompt"):
            pe = self._cached_embeddings(prompts + [""], device)  # "": the stock pipeline's CFG negative prompt
            return (Conditioning(encoder_hidden_states=pe[:-1]),
                    Conditioning(encoder_hidden_states=pe[-1:].expand(len(prompts), *pe.shape[1:])))
        raise TypeError(f"{name} has no text encoder; pass class labels (a LongTensor) instead of prompts")


    CACHE_SIZE = 256
    """Prompt embeddings kept per device (SD 1.x/2.x-style pipelines; the text encoder is frozen in every recipe):
    the empty negative prompt and repeated prompts are encoded once instead of at every training step."""

    def _cached_embeddings(self, prompts: list[str], device) -> Tensor:
        """``encode_prompt`` rows for ``prompts`` (no CFG), each prompt encoded once and then served from a bounded
        cache (oldest entries dropped first). Rows are encoded in one batched call for the prompts not cached."""
        cache = self.__dict__.setdefault("_embedding_cache", {})
        device = torch.device(device)
        rows = {q: cache.get((q, device)) for q in dict.fromkeys(prompts)}
        missing = [q for q, row in rows.items() if row is None]
        if missing:
            pe, _ = self.pipe.encode_prompt(missing, device, 1, False)
            for q, row in zip(missing, pe):
                rows[q] = cache[(q, device)] = row
            while len(cache) > self.CACHE_SIZE:
                cache.pop(next(iter(cache)))
        return torch.stack([rows[q] for q in prompts])


class LatentCodec:
    """Images in [-1, 1] <-> the backbone's input space (VAE latents times ``scaling_factor`` when there is a VAE)."""

    def __init__(self, pipe):
        self.vae = getattr(pipe, "vae", None)
        if self.vae is not None:
            self.scaling = float(getattr(self.vae.config, "scaling_factor", 1.0))
            self.shift = float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    @torch.no_grad()
    def encode(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        if self.vae is None:
            return images
        x = images.to(device=self.vae.device, dtype=self.vae.dtype)
        latent = self.vae.encode(x).latent_dist
        z = latent.sample(generator) if generator is not None else latent.mean
        return ((z - self.shift) * self.scaling).float()

    @torch.no_grad()
    def decode(self, latents: Tensor) -> Tensor:
        if self.vae is None:
            return latents.clamp(-1, 1)
        z = latents / self.scaling + self.shift
        return self.vae.decode(z.to(self.vae.dtype)).sample.float().clamp(-1, 1)


class IdentityCodec:
    """Pixel-space or toy data: the backbone works on the data itself."""

    def encode(self, images: Tensor, generator=None) -> Tensor:
        return images

    def decode(self, latents: Tensor) -> Tensor:
        return latents


class TeacherBundle:
    """What a recipe needs from a teacher: its Denoiser, condition encoder, codec, sample shape and scheduler config.

    Built from a Diffusers pipeline (``from_pipeline``) or directly (toy teachers). ``pipeline`` is kept for export.
    """

    def __init__(self, denoiser: Denoiser, sample_shape: tuple[int, ...], scheduler_config: dict,
                 encoder=None, codec=None, pipeline=None, make_student=None, student_prediction: str | None = None):
        """``make_student`` (optional) builds a fresh student backbone when the teacher's own weights cannot seed
        one (the analytic toy teacher); ``student_prediction`` is then that student's output kind."""
        self.denoiser = denoiser
        self.make_student = make_student
        self.student_prediction = student_prediction or denoiser.prediction
        self.sample_shape = tuple(sample_shape)
        self.scheduler_config = dict(scheduler_config)
        self.encoder = encoder
        self.codec = codec or IdentityCodec()
        self.pipeline = pipeline

    def student_seed(self) -> torch.nn.Module:
        """What a student is copied from: a fresh ``make_student()`` when the teacher's weights cannot seed one (the
        analytic toy teacher), otherwise the teacher's own backbone (not copied here)."""
        return self.make_student() if self.make_student is not None else self.denoiser.backbone

    @classmethod
    def from_pipeline(cls, pipe, resolution: int | None = None) -> "TeacherBundle":
        backbone = getattr(pipe, pipeline_backbone_name(pipe))
        cfg = backbone.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        if resolution is not None and getattr(pipe, "vae_scale_factor", None):
            size = resolution // pipe.vae_scale_factor
        sched = dict(pipe.scheduler.config)
        sched["_class_name"] = type(pipe.scheduler).__name__
        return cls(denoiser_from_pipeline(pipe), (cfg.in_channels, size, size), sched,
                   encoder=ConditionEncoder(pipe, resolution), codec=LatentCodec(pipe), pipeline=pipe)

    def encode_conditions(self, conditions, device) -> tuple[Conditioning, Conditioning]:
        if self.encoder is None:
            labels = conditions.to(device).long()
            return Conditioning(class_labels=labels), Conditioning(class_labels=torch.full_like(labels, -1))
        return self.encoder.encode(conditions, device=device)
