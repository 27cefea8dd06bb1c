"""SwiftBrushV2's clamped CLIP loss (spec B.7, "SwiftBrushV2 additions" 2b) with open_clip weights from a local file.

``L_clip = mean relu(margin - cos(E_img(decode(x0_hat)), E_txt(prompt)))``: a CLIP image-text alignment loss on the
decoded student image that stops pushing once the cosine similarity exceeds ``margin`` (the clamp). The paper does
not publish the margin or its weight schedule (spec D.7): both are options. The decode runs in float32 with grad
through the teacher's VAE (the paper uses a tiny VAE decoder to make this cheap; none is bundled here).

Nothing is downloaded: ``clip_weights_path`` must be a local open_clip checkpoint for ``clip_model``.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClampedClipLoss", "clamped_alignment_loss"]


def clamped_alignment_loss(image_features: Tensor, text_features: Tensor, margin: float) -> Tensor:
    """``mean relu(margin - cos(img, txt))`` over the batch (zero, with zero gradient, once cos >= margin)."""
    cos = F.cosine_similarity(image_features.float(), text_features.float(), dim=-1)
    return F.relu(margin - cos).mean()


class ClampedClipLoss(nn.Module):
    def __init__(self, model: nn.Module, tokenizer, margin: float, image_size: int, mean, std):
        super().__init__()
        self.model, self.tokenizer, self.margin, self.image_size = model, tokenizer, margin, image_size
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.model.requires_grad_(False).eval()

    @classmethod
    def from_options(cls, options, device) -> "ClampedClipLoss":
        path = options.clip_weights_path
        if not path:
            raise FileNotFoundError("recipe.clip_weight > 0 needs recipe.clip_weights_path: a local open_clip "
                                    f"checkpoint for {options.clip_model!r} (nothing is downloaded at run time); "
                                    "or set recipe.clip_weight=0")
        if not Path(path).expanduser().is_file():
            raise FileNotFoundError(f"CLIP weights file {str(path)!r} (recipe.clip_weights_path) does not exist; "
                                    f"download the open_clip checkpoint for {options.clip_model!r} once on a machine "
                                    f"with internet and point recipe.clip_weights_path at it, or set recipe.clip_weight=0")
        import open_clip

        model, _, preprocess = open_clip.create_model_and_transforms(options.clip_model,
                                                                     pretrained=str(Path(path).expanduser()))
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else int(size)
        mean = getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN
        std = getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD
        return cls(model, open_clip.get_tokenizer(options.clip_model), options.clip_margin, size, mean, std).to(device)

    def forward(self, codec, x0: Tensor, prompts) -> Tensor:
        if torch.is_tensor(prompts) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("the CLIP loss needs text prompts (got class labels)")
        vae = getattr(codec, "vae", None)
        if vae is not None:  # differentiable decode (codec.decode runs under no_grad)
            z = x0.float() / codec.scaling + codec.shift
            image = vae.decode(z.to(vae.dtype)).sample.float()
        else:
            image = x0.float()
        image = ((image.clamp(-1, 1) + 1) / 2)
        image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        image = (image - self.mean) / self.std
        img = self.model.encode_image(image)
        txt = self.model.encode_text(self.tokenizer(list(prompts)).to(x0.device))
        return clamped_alignment_loss(img, txt.detach(), self.margin)
