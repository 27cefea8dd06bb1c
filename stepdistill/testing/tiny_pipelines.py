"""Tiny, randomly initialised Diffusers pipelines of every backbone family, built offline.

Tests and examples need real ``DiffusionPipeline`` folders (``model_index.json``, safetensors
weights, scheduler and tokenizer configs) that load with stock Diffusers and sample in
milliseconds. :func:`build_tiny_pipeline` writes one for each family below; every component has the
real class and wiring of the full-size checkpoint, only the widths and depths are tiny:

==================  ==============================  =========================================  =======
family              pipeline class                  backbone + text encoders                   image
==================  ==============================  =========================================  =======
``sd``              StableDiffusionPipeline         UNet2DConditionModel, CLIPTextModel        32 px
``sdxl``            StableDiffusionXLPipeline       UNet2DConditionModel ("text_time"),        32 px
                                                    CLIPTextModel + CLIPTextModelWithProjection
``dit``             DiTPipeline                     DiTTransformer2DModel (1000 classes,       32 px
                                                    learned sigma), no text encoder
``pixart``          PixArtSigmaPipeline             PixArtTransformer2DModel, T5EncoderModel   32 px
``pixart_alpha``    PixArtAlphaPipeline             PixArtTransformer2DModel, T5EncoderModel   32 px
``sd3``             StableDiffusion3Pipeline        SD3Transformer2DModel, 2x CLIPTextModel-   32 px
                                                    WithProjection + T5EncoderModel
``sana``            SanaPipeline                    SanaTransformer2DModel, Gemma2Model,       32 px
                                                    AutoencoderDC
``flux``            FluxPipeline                    FluxTransformer2DModel (guidance embeds),  32 px
                                                    CLIPTextModel + T5EncoderModel
==================  ==============================  =========================================  =======

All latents are 8x8 and every VAE downsamples 4x, so the native image is 32x32. Tokenizers come from
:mod:`stepdistill.testing.offline_tokenizers` (CLIP BPE truncated to its first 2,048 merges, T5
Unigram, Gemma byte-fallback BPE). Calls that differ from ``pipe(prompt, num_inference_steps=2)``:

* ``dit``: ``pipe(class_labels=[3], num_inference_steps=2)`` (class-conditional, no prompt).
* ``pixart``, ``pixart_alpha``, ``sana``: pass ``use_resolution_binning=False``; their aspect-ratio
  bins only exist for the full-size sample sizes (256 px and up).
* ``flux``: pass ``height=32, width=32``; FluxPipeline's default size is hard-coded to 128 latents.

Every component is seeded from ``(seed, component name)``, so a build is deterministic and the
backbone inside a pipeline equals ``build_tiny_backbone(family, seed=seed)``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stepdistill.testing import offline_tokenizers

__all__ = [
    "FAMILIES",
    "TinyFamily",
    "tiny_family",
    "TINY_IMAGE_SIZE",
    "TINY_LATENT_SIZE",
    "tiny_backbone_config",
    "build_tiny_backbone",
    "build_tiny_pipeline",
    "tiny_pipeline_dir",
    "tiny_call_kwargs",
]

TINY_LATENT_SIZE = 8
TINY_IMAGE_SIZE = 32  # = TINY_LATENT_SIZE * 4: every tiny VAE has three resolution levels
CLIP_NUM_MERGES = 2048  # tiny pipelines keep CLIP's first 2,048 merges: vocabulary 2,562 tokens

# Stable Diffusion's discrete schedule: "scaled_linear" betas from 0.00085 to 0.012 over 1000 steps.
_SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}
# DiT / PixArt's discrete schedule (ADM's linear betas).
_LINEAR_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
}
_VP_SCHEDULERS = {  # name -> (class name, extra config)
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": False}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False, "variance_type": "fixed_small"}),
    "euler": ("EulerDiscreteScheduler", {"interpolation_type": "linear"}),
    "dpmsolver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}
_PREDICTION_TYPES = ("epsilon", "v_prediction")


# --------------------------------------------------------------------------------------------------
# backbone configs
# --------------------------------------------------------------------------------------------------


def _unet_sd() -> dict[str, Any]:
    return {
        "sample_size": TINY_LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "cross_attention_dim": 32,  # = CLIP hidden size
        "attention_head_dim": 2,  # UNet2DConditionModel reads this as the number of heads
        "time_cond_proj_dim": None,
    }


def _unet_sdxl() -> dict[str, Any]:
    return {
        "sample_size": TINY_LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (16, 32),
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "transformer_layers_per_block": (1, 2),
        "cross_attention_dim": 64,  # = hidden(text_encoder) + hidden(text_encoder_2) = 32 + 32
        "attention_head_dim": (2, 4),
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        # 6 micro-conditions (original size, crop, target size) x 8 + pooled text_encoder_2 projection (32)
        "projection_class_embeddings_input_dim": 6 * 8 + 32,
        "time_cond_proj_dim": None,
    }


def _dit() -> dict[str, Any]:
    return {
        "sample_size": TINY_LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 8,  # learned sigma: [eps, variance interpolation]
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "patch_size": 2,
        "num_embeds_ada_norm": 1000,  # DiTPipeline hard-codes class 1000 as the CFG null label
    }


def _pixart() -> dict[str, Any]:
    return {
        "sample_size": TINY_LATENT_SIZE,
        "in_channels": 4,
        "out_channels": 8,  # learned sigma
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "patch_size": 2,
        "cross_attention_dim": 16,  # = inner dim (2 x 8)
        "caption_channels": 32,  # = T5 d_model
        "norm_type": "ada_norm_single",
        "num_embeds_ada_norm": 1000,
        "use_additional_conditions": False,
    }


def _sd3() -> dict[str, Any]:
    return {
        "sample_size": TINY_LATENT_SIZE,
        "patch_size": 2,
        "in_channels": 16,
        "out_channels": 16,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "caption_projection_dim": 16,  # = inner dim
        "joint_attention_dim": 64,  # = T5 d_model >= CLIP-L + CLIP-G hidden (32 + 32)
        "pooled_projection_dim": 64,  # = projection_dim(text_encoder) + projection_dim(text_encoder_2)
        "pos_embed_max_size": 16,
    }


def _sana() -> dict[str, Any]:
    return {
        "sample_size": TINY_LATENT_SIZE,
        "patch_size": 1,
        "in_channels": 8,
        "out_channels": 8,
        "num_attention_heads": 2,
        "attention_head_dim": 8,
        "num_layers": 2,
        "num_cross_attention_heads": 2,
        "cross_attention_head_dim": 8,
        "cross_attention_dim": 16,  # = inner dim
        "caption_channels": 32,  # = Gemma hidden size
        "mlp_ratio": 2.5,
    }


def _flux() -> dict[str, Any]:
    return {
        "patch_size": 1,
        "in_channels": 64,  # 16 latent channels packed 2x2
        "num_layers": 1,
        "num_single_layers": 1,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "joint_attention_dim": 32,  # = T5 d_model
        "pooled_projection_dim": 32,  # = CLIP hidden size (pooled output)
        "guidance_embeds": True,  # FLUX.1-dev style guidance-distilled teacher
        "axes_dims_rope": (4, 6, 6),  # sums to attention_head_dim
    }


# --------------------------------------------------------------------------------------------------
# shared component builders
# --------------------------------------------------------------------------------------------------


def _seeded(seed: int, name: str) -> None:
    """Seed torch's global generator from (seed, component name): stable across runs and Python versions."""
    torch.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def _autoencoder_kl(latent_channels: int, **overrides: Any):
    from diffusers import AutoencoderKL

    config = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "block_out_channels": (8, 16, 16),  # three levels: 4x downsampling
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "latent_channels": latent_channels,
        "sample_size": TINY_IMAGE_SIZE,
    }
    config.update(overrides)
    return AutoencoderKL(**config)


def _autoencoder_dc():
    from diffusers import AutoencoderDC

    return AutoencoderDC(
        in_channels=3,
        latent_channels=8,
        attention_head_dim=4,
        encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 16, 16),  # three levels: 4x downsampling
        decoder_block_out_channels=(8, 16, 16),
        encoder_layers_per_block=(1, 1, 1),
        decoder_layers_per_block=(1, 1, 1),
        encoder_qkv_multiscales=((), (), (5,)),
        decoder_qkv_multiscales=((), (), (5,)),
        downsample_block_type="conv",
        upsample_block_type="interpolate",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    )


def _clip_text_model(tokenizer, *, with_projection: bool, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        projection_dim=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        hidden_act=hidden_act,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModelWithProjection(config) if with_projection else CLIPTextModel(config)


def _t5_encoder(tokenizer, d_model: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=8,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=d_model // 8,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",  # T5 v1.1 (the T5-XXL used by PixArt, SD3 and Flux)
        is_encoder_decoder=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _gemma2_encoder(tokenizer):
    from transformers import Gemma2Config, Gemma2Model

    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=2048,
        sliding_window=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return Gemma2Model(config)


def _vp_scheduler(name: str, schedule: Mapping[str, Any], prediction_type: str, **extra: Any):
    import diffusers

    if name not in _VP_SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not available; pick one of {sorted(_VP_SCHEDULERS)}.")
    class_name, defaults = _VP_SCHEDULERS[name]
    cls = getattr(diffusers, class_name)
    config = {**schedule, **defaults, **extra, "prediction_type": prediction_type}
    accepted = set(inspect.signature(cls.__init__).parameters)
    return cls(**{k: v for k, v in config.items() if k in accepted})


# --------------------------------------------------------------------------------------------------
# families
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Options:
    """Build options shared by every family (validated in :func:`build_tiny_pipeline`)."""

    seed: int
    tokenizer_cache: Path | None
    prediction_type: str | None
    scheduler: str | None


@dataclass(frozen=True)
class TinyFamily:
    """What a tiny family is made of and which build options it accepts."""

    pipeline_class: str
    backbone_class: str
    backbone_name: str  # "unet" or "transformer"
    backbone_config: Callable[[], dict[str, Any]]
    components: Callable[[_Options, nn.Module], dict[str, Any]]
    schedulers: tuple[str, ...] = ()  # allowed `scheduler=` values; () = fixed
    default_scheduler: str | None = None
    prediction_types: tuple[str, ...] = ()  # allowed `prediction_type=` values; () = fixed
    call_kwargs: Callable[[], dict[str, Any]] = lambda: {"prompt": "a photo of a cat"}


def _clip_tok(opts: _Options):
    return offline_tokenizers.clip_tokenizer(opts.tokenizer_cache, num_merges=CLIP_NUM_MERGES)


def _sd_components(opts: _Options, unet: nn.Module) -> dict[str, Any]:
    tokenizer = _clip_tok(opts)
    _seeded(opts.seed, "text_encoder")
    text_encoder = _clip_text_model(tokenizer, with_projection=False)
    _seeded(opts.seed, "vae")
    vae = _autoencoder_kl(4, scaling_factor=0.18215)
    scheduler = _vp_scheduler(opts.scheduler or "ddim", _SD_SCHEDULE, opts.prediction_type or "epsilon")
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "unet": unet,
        "scheduler": scheduler,
        "safety_checker": None,
        "feature_extractor": None,
        "image_encoder": None,
        "requires_safety_checker": False,
    }


def _sdxl_components(opts: _Options, unet: nn.Module) -> dict[str, Any]:
    tokenizer = _clip_tok(opts)
    _seeded(opts.seed, "text_encoder")
    text_encoder = _clip_text_model(tokenizer, with_projection=False)
    _seeded(opts.seed, "text_encoder_2")
    text_encoder_2 = _clip_text_model(tokenizer, with_projection=True, hidden_act="gelu")
    _seeded(opts.seed, "vae")
    vae = _autoencoder_kl(4, scaling_factor=0.13025)
    scheduler = _vp_scheduler(opts.scheduler or "euler", _SD_SCHEDULE, opts.prediction_type or "epsilon")
    return {
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": _clip_tok(opts),
        "unet": unet,
        "scheduler": scheduler,
        "image_encoder": None,
        "feature_extractor": None,
        "force_zeros_for_empty_prompt": True,
        "add_watermarker": False,
    }


def _dit_components(opts: _Options, transformer: nn.Module) -> dict[str, Any]:
    _seeded(opts.seed, "vae")
    vae = _autoencoder_kl(4, scaling_factor=0.18215)
    scheduler = _vp_scheduler(opts.scheduler or "ddim", _LINEAR_SCHEDULE, "epsilon")
    id2label = {str(i): f"class {i}" for i in range(transformer.config.num_embeds_ada_norm)}
    return {"transformer": transformer, "vae": vae, "scheduler": scheduler, "id2label": id2label}


def _pixart_components(opts: _Options, transformer: nn.Module) -> dict[str, Any]:
    tokenizer = offline_tokenizers.t5_tokenizer(opts.tokenizer_cache)
    _seeded(opts.seed, "text_encoder")
    text_encoder = _t5_encoder(tokenizer, d_model=transformer.config.caption_channels)
    _seeded(opts.seed, "vae")
    vae = _autoencoder_kl(4, scaling_factor=0.18215)
    scheduler = _vp_scheduler(opts.scheduler or "dpmsolver", _LINEAR_SCHEDULE, "epsilon")
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def _sd3_components(opts: _Options, transformer: nn.Module) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = _clip_tok(opts)
    t5_tok = offline_tokenizers.t5_tokenizer(opts.tokenizer_cache)
    _seeded(opts.seed, "text_encoder")
    text_encoder = _clip_text_model(tokenizer, with_projection=True)
    _seeded(opts.seed, "text_encoder_2")
    text_encoder_2 = _clip_text_model(tokenizer, with_projection=True, hidden_act="gelu")
    _seeded(opts.seed, "text_encoder_3")
    text_encoder_3 = _t5_encoder(t5_tok, d_model=transformer.config.joint_attention_dim)
    _seeded(opts.seed, "vae")
    vae = _autoencoder_kl(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
                          use_post_quant_conv=False)
    return {
        "transformer": transformer,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": _clip_tok(opts),
        "text_encoder_3": text_encoder_3,
        "tokenizer_3": t5_tok,
        "image_encoder": None,
        "feature_extractor": None,
    }


def _sana_components(opts: _Options, transformer: nn.Module) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler

    tokenizer = offline_tokenizers.gemma_tokenizer(opts.tokenizer_cache)
    _seeded(opts.seed, "text_encoder")
    text_encoder = _gemma2_encoder(tokenizer)
    _seeded(opts.seed, "vae")
    vae = _autoencoder_dc()
    scheduler = DPMSolverMultistepScheduler(  # Sana's flow-matching DPM-Solver++ (flow_shift 3)
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=3.0,
        algorithm_type="dpmsolver++",
        solver_order=2,
    )
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae, "transformer": transformer,
            "scheduler": scheduler}


def _flux_components(opts: _Options, transformer: nn.Module) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler

    tokenizer = _clip_tok(opts)
    t5_tok = offline_tokenizers.t5_tokenizer(opts.tokenizer_cache)
    _seeded(opts.seed, "text_encoder")
    text_encoder = _clip_text_model(tokenizer, with_projection=False)
    _seeded(opts.seed, "text_encoder_2")
    text_encoder_2 = _t5_encoder(t5_tok, d_model=transformer.config.joint_attention_dim)
    _seeded(opts.seed, "vae")
    vae = _autoencoder_kl(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
                          use_post_quant_conv=False)
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1's resolution-dependent shift
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "scheduler": scheduler,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": t5_tok,
        "transformer": transformer,
        "image_encoder": None,
        "feature_extractor": None,
    }


_PROMPT = {"prompt": "a photo of a cat"}
_SQUARE = {"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE}
# clean_caption needs BeautifulSoup and only matters for scraped captions
_PIXART_CALL = {**_PROMPT, "use_resolution_binning": False, "clean_caption": False}
_VP_NAMES = tuple(sorted(_VP_SCHEDULERS))

_FAMILIES: dict[str, TinyFamily] = {
    "sd": TinyFamily("StableDiffusionPipeline", "UNet2DConditionModel", "unet", _unet_sd, _sd_components,
                  schedulers=_VP_NAMES, prediction_types=_PREDICTION_TYPES),
    "sdxl": TinyFamily("StableDiffusionXLPipeline", "UNet2DConditionModel", "unet", _unet_sdxl, _sdxl_components,
                    schedulers=_VP_NAMES, prediction_types=_PREDICTION_TYPES),
    "dit": TinyFamily("DiTPipeline", "DiTTransformer2DModel", "transformer", _dit, _dit_components,
                   schedulers=_VP_NAMES, call_kwargs=lambda: {"class_labels": [3]}),
    "pixart": TinyFamily("PixArtSigmaPipeline", "PixArtTransformer2DModel", "transformer", _pixart,
                      _pixart_components, schedulers=_VP_NAMES,
                      call_kwargs=lambda: {**_PIXART_CALL}),
    "pixart_alpha": TinyFamily("PixArtAlphaPipeline", "PixArtTransformer2DModel", "transformer", _pixart,
                            _pixart_components, schedulers=_VP_NAMES,
                            call_kwargs=lambda: {**_PIXART_CALL}),
    "sd3": TinyFamily("StableDiffusion3Pipeline", "SD3Transformer2DModel", "transformer", _sd3, _sd3_components),
    "sana": TinyFamily("SanaPipeline", "SanaTransformer2DModel", "transformer", _sana, _sana_components,
                    call_kwargs=lambda: {**_PROMPT, "use_resolution_binning": False, **_SQUARE}),
    "flux": TinyFamily("FluxPipeline", "FluxTransformer2DModel", "transformer", _flux, _flux_components,
                    call_kwargs=lambda: {**_PROMPT, **_SQUARE}),
}
FAMILIES: tuple[str, ...] = tuple(_FAMILIES)


def tiny_family(family: str) -> TinyFamily:
    """The :class:`TinyFamily` record of ``family`` (raises a ValueError naming the valid families)."""
    if family not in _FAMILIES:
        raise ValueError(f"unknown family {family!r}; pick one of {', '.join(FAMILIES)}.")
    return _FAMILIES[family]


def _backbone_cls(spec: TinyFamily) -> type[nn.Module]:
    import diffusers

    return getattr(diffusers, spec.backbone_class)


# --------------------------------------------------------------------------------------------------
# public API
# --------------------------------------------------------------------------------------------------


def tiny_backbone_config(family: str) -> dict[str, Any]:
    """Keyword arguments of the tiny backbone (UNet or transformer) of ``family``; a fresh copy."""
    return dict(tiny_family(family).backbone_config())


def build_tiny_backbone(family: str, *, seed: int = 0, **overrides: Any) -> nn.Module:
    """The bare tiny backbone of ``family`` (e.g. ``UNet2DConditionModel`` for ``"sd"``), randomly initialised.

    ``overrides`` replace entries of :func:`tiny_backbone_config` and may name any argument of the
    backbone class (e.g. ``time_cond_proj_dim=32`` for an LCM-style guidance embedding on ``sd``).
    """
    spec = tiny_family(family)
    cls = _backbone_cls(spec)
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(
            f"{cls.__name__} (family {family!r}) has no argument(s) {unknown}; valid overrides: {sorted(accepted)}."
        )
    config = {**spec.backbone_config(), **overrides}
    with torch.random.fork_rng(devices=[]):
        _seeded(seed, spec.backbone_name)
        return cls(**config)


def build_tiny_pipeline(
    family: str,
    out_dir: str | Path,
    seed: int = 0,
    *,
    prediction_type: str | None = None,
    scheduler: str | None = None,
    tokenizer_cache: str | Path | None = None,
    **backbone_overrides: Any,
) -> Path:
    """Build the tiny ``family`` pipeline and save it to ``out_dir`` with ``save_pretrained`` (safetensors).

    Args:
        family: one of :data:`FAMILIES`.
        out_dir: folder to write (created; existing files with the same names are overwritten).
        seed: every weight is drawn from generators seeded by ``(seed, component name)``.
        prediction_type: ``"epsilon"`` (default) or ``"v_prediction"``; ``sd`` and ``sdxl`` only.
        scheduler: ``"ddim"``, ``"ddpm"``, ``"euler"`` or ``"dpmsolver"`` for the discrete-time families
            (``sd``, ``sdxl``, ``dit``, ``pixart``, ``pixart_alpha``); all use the family's real betas.
        tokenizer_cache: where the offline tokenizers are cached (default: ``default_cache_dir()``).
        backbone_overrides: forwarded to :func:`build_tiny_backbone`, e.g. ``time_cond_proj_dim=32``.
            They must keep the backbone compatible with the other components.

    Returns:
        ``Path(out_dir)``; load it with ``diffusers.DiffusionPipeline.from_pretrained(out_dir)``.
    """
    import diffusers

    spec = tiny_family(family)
    if prediction_type is not None and prediction_type not in spec.prediction_types:
        allowed = f"one of {spec.prediction_types}" if spec.prediction_types else "None (it is fixed)"
        raise ValueError(f"prediction_type={prediction_type!r} is not supported for {family!r}; pass {allowed}.")
    if scheduler is not None and scheduler not in spec.schedulers:
        allowed = f"one of {spec.schedulers}" if spec.schedulers else "None (it is fixed)"
        raise ValueError(f"scheduler={scheduler!r} is not supported for {family!r}; pass {allowed}.")
    opts = _Options(
        seed=seed,
        tokenizer_cache=Path(tokenizer_cache) if tokenizer_cache is not None else None,
        prediction_type=prediction_type,
        scheduler=scheduler,
    )
    with torch.random.fork_rng(devices=[]):
        backbone = build_tiny_backbone(family, seed=seed, **backbone_overrides)
        components = spec.components(opts, backbone)
    pipeline = getattr(diffusers, spec.pipeline_class)(**components)
    out_dir = Path(out_dir)
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def tiny_call_kwargs(family: str) -> dict[str, Any]:
    """Keyword arguments (besides ``num_inference_steps`` etc.) that make ``pipe(**kwargs)`` sample at tiny size.

    E.g. ``{"prompt": ..., "use_resolution_binning": False}`` for PixArt and Sana, ``{"class_labels": [3]}``
    for DiT; the image is :data:`TINY_IMAGE_SIZE` pixels square.
    """
    return tiny_family(family).call_kwargs()


_BUILT: dict[tuple[str, str, str], Path] = {}


def _source_fingerprint() -> str:
    """Hash of the code and library versions a build depends on (part of every cache folder name)."""
    import diffusers
    import tokenizers
    import transformers

    digest = hashlib.sha256()
    for module in (offline_tokenizers, inspect.getmodule(_source_fingerprint)):
        digest.update(Path(module.__file__).read_bytes())
    for version in (torch.__version__, diffusers.__version__, transformers.__version__, tokenizers.__version__):
        digest.update(version.encode())
    return digest.hexdigest()[:12]


def tiny_pipeline_dir(family: str, root: str | Path | None = None, **options: Any) -> Path:
    """Path of a tiny ``family`` pipeline built at most once per process (and reused across processes).

    The folder lives under ``root`` (default ``default_cache_dir()/tiny_pipelines``) in a subfolder
    named by the family, the options (``seed``, ``prediction_type``, backbone overrides, ...) and a
    fingerprint of this code and the library versions, so a stale build is never reused. The build
    goes to a temporary sibling that is renamed into place. Treat the folder as read-only.
    """
    tiny_family(family)
    root = Path(root) if root is not None else offline_tokenizers.default_cache_dir() / "tiny_pipelines"
    options_key = json.dumps(options, sort_keys=True, default=str)
    memo_key = (family, str(root), options_key)
    if memo_key in _BUILT and (_BUILT[memo_key] / "model_index.json").is_file():
        return _BUILT[memo_key]
    suffix = hashlib.sha256(f"{options_key}|{_source_fingerprint()}".encode()).hexdigest()[:12]
    final = root / f"{family}-{suffix}"
    if not (final / "model_index.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{family}-", dir=root))
        try:
            build_tiny_pipeline(family, tmp, **options)
            try:
                os.rename(tmp, final)
            except OSError:
                if not (final / "model_index.json").is_file():
                    raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    _BUILT[memo_key] = final
    return final
