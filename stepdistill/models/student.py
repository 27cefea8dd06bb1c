"""Make a student from a teacher backbone: a full copy, a copy with a guidance embedding, or LoRA adapters.

* ``with_guidance_embedding``: a UNet2DConditionModel gets ``time_cond_proj_dim`` (LCM's w-embedding, spec A.3), the
  new ``time_embedding.cond_proj`` is zero-initialised so the student starts exactly equal to the teacher
  (Diffusers' LCM script leaves it random; users report odd results when it is, LCM issue #45).
* ``add_lora``: peft LoRA ``W + (alpha/r) B A`` with B = 0 at init, so the output equals the base model; with the
  adapters disabled the same module *is* the frozen teacher (spec A.5), which saves a model copy.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import torch
from torch import nn

from .backbones import unwrap

__all__ = ["UNET_LORA_TARGETS", "disable_label_dropout", "copy_backbone", "with_guidance_embedding", "add_lora",
           "adapters_disabled", "lora_state_dict", "freeze"]

UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1",
                     "conv2", "conv_shortcut", "downsamplers.0.conv", "upsamplers.0.conv", "time_emb_proj")
"""Default UNet LoRA targets of LCM-LoRA and DMD2 (spec A.5)."""


def freeze(module: nn.Module) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module


def disable_label_dropout(module: nn.Module) -> int:
    """Turn off the class-label dropout built into Diffusers' ``LabelEmbedding`` (DiT's ``AdaLayerNormZero`` and
    PixArt-style class embeddings drop 10% of the labels to the null class whenever the module is in train mode).

    That dropout is a teacher-*training* device for CFG. In distillation every network call must see the condition
    the recipe gives it: a student, or a LoRA base run as the teacher, that silently swaps labels for the null class
    makes two calls on the same batch disagree (sCM's JVP and its F_theta, LCM's student and teacher target). The
    training loop calls this on every trainable module (LoRA bases included) when it switches them to train mode;
    ``copy_backbone`` calls it for students used outside the loop. Recipes that want CFG dropout do it explicitly
    (``score_distill.drop_conditions``). The null-class row of the table is kept, so explicit unconditional calls still
    work. Returns how many embeddings were changed.
    """
    from diffusers.models.embeddings import LabelEmbedding

    changed = 0
    for m in unwrap(module).modules():
        if isinstance(m, LabelEmbedding) and m.dropout_prob > 0:
            m.dropout_prob = 0.0
            changed += 1
    return changed


def copy_backbone(backbone: nn.Module, dtype: torch.dtype | None = torch.float32) -> nn.Module:
    """A trainable deep copy (float32 master weights by default), in train mode with grads on, with no built-in
    label dropout (``disable_label_dropout``)."""
    student = copy.deepcopy(unwrap(backbone))
    if dtype is not None:
        student.to(dtype)
    student.requires_grad_(True)
    disable_label_dropout(student)
    student.train()
    return student


def with_guidance_embedding(unet: nn.Module, dim: int = 256) -> nn.Module:
    """A copy of a UNet2DConditionModel with ``time_cond_proj_dim=dim``; the new projection is zero-initialised."""
    from diffusers import UNet2DConditionModel

    base = unwrap(unet)
    if not isinstance(base, UNet2DConditionModel):
        raise TypeError(f"a guidance embedding via time_cond_proj_dim needs a UNet2DConditionModel, got {type(base).__name__}")
    if base.config.time_cond_proj_dim is not None:
        return copy_backbone(base)
    config = dict(base.config)
    config["time_cond_proj_dim"] = dim
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(base.state_dict(), strict=False)
    if unexpected or any(not k.startswith("time_embedding.cond_proj") for k in missing):
        raise RuntimeError(f"guidance-embedding student does not match its teacher: missing={missing} unexpected={unexpected}")
    nn.init.zeros_(student.time_embedding.cond_proj.weight)
    student.to(dtype=torch.float32)
    student.train()
    return student


def add_lora(model: nn.Module, rank: int = 64, alpha: float | None = None, targets: Sequence[str] = UNET_LORA_TARGETS,
             adapter_name: str = "default") -> nn.Module:
    """Attach peft LoRA adapters (B zero-init) to ``model`` in place; only adapter weights stay trainable."""
    from peft import LoraConfig

    base = unwrap(model)
    names = {n for n, _ in base.named_modules()}
    present = [t for t in targets if any(n == t or n.endswith("." + t) for n in names)]
    if not present:
        raise ValueError(f"none of the LoRA target modules {list(targets)} exist in {type(base).__name__}")
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, init_lora_weights="gaussian",
                        target_modules=list(present))
    base.requires_grad_(False)
    base.add_adapter(config, adapter_name=adapter_name)
    for n, p in base.named_parameters():
        p.requires_grad_("lora_" in n)
        if "lora_" in n:
            p.data = p.data.float()
    return model


def _tuner_layers(base: nn.Module) -> list:
    """The model's peft tuner layers, found once and cached on the model (a module walk per call is slow)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = base.__dict__.get("_stepdistill_tuner_layers")
    if layers is None:
        layers = [m for m in base.modules() if isinstance(m, BaseTunerLayer)]
        base.__dict__["_stepdistill_tuner_layers"] = layers
    return layers


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the LoRA-equipped ``model`` as its frozen base (the teacher).

    Flips each tuner layer's disable flag directly: Diffusers' ``disable_adapters``/``enable_adapters`` walk every
    module and reset ``requires_grad`` on every adapter weight each time, which cost LCM-LoRA ~20% of a CPU training
    update (``stepdistill bench speed``). A disabled layer never reads its adapter weights, so their ``requires_grad``
    need not change."""
    base = unwrap(model)
    layers = _tuner_layers(base)
    if not layers or not all(hasattr(m, "_disable_adapters") for m in layers):  # unknown peft layout: the slow path
        base.disable_adapters()
        try:
            yield model
        finally:
            base.enable_adapters()
        return
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = True
    try:
        yield model
    finally:
        for m, flag in zip(layers, previous):
            m._disable_adapters = flag


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights in Diffusers' LoRA naming, ready for ``save_lora_weights``."""
    from peft.utils import get_peft_model_state_dict
    from diffusers.utils import convert_state_dict_to_diffusers

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unwrap(model)))
