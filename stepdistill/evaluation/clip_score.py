"""CLIP score (Hessel et al. 2021, "CLIPScore", eq. 1 with w = 100) with open_clip, from local weights only.

    CLIPScore(I, c) = 100 * max(cos(E_I(I), E_T(c)), 0)

averaged over (image, prompt) pairs -- the scale torchmetrics' ``CLIPScore`` uses (so 0..100; published SD numbers
with ViT-L/14 are around 30). Every result states the backbone, the weights file and the scale, because CLIP scores
are only comparable for the same backbone and weights.

Prompts are tokenized by the backbone's own open_clip tokenizer at its context length (77 for CLIP): prompts longer
than that are truncated to ``[SOT] + first 75 tokens + [EOT]`` -- the EOT token must stay last, since CLIP pools the
text features at the EOT position (argmax of token ids). The number of truncated prompts is reported.

Images go through the backbone's own evaluation transform (resize, centre crop, mean/std normalisation) after
conversion to uint8 RGB (:func:`stepdistill.evaluation.fid.to_uint8_rgb`), i.e. exactly what open_clip does to a
saved PNG.

Weights (never downloaded): ``weights`` is a checkpoint file (``.safetensors``/``.bin``/``.pt``/``.pth``, loaded
into the named built-in ``backbone`` architecture, e.g. ``ViT-B-32``) or a folder with ``open_clip_config.json`` plus
weights (open_clip's ``local-dir:`` layout; ``backbone`` is then read from the folder).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .fid import to_uint8_rgb

__all__ = ["CLIPScorer", "clip_score", "load_clip"]

SCALE = "100 * max(cos(image, text), 0)"


@dataclass
class CLIPScorer:
    model: torch.nn.Module
    preprocess: object
    tokenizer: object
    backbone: str
    weights: str

    @property
    def context_length(self) -> int:
        return int(getattr(self.tokenizer, "context_length", None) or getattr(self.model, "context_length", 77))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, int]:
        """Token ids ``(B, context_length)`` and how many prompts were truncated to fit."""
        ctx = self.context_length
        truncated = 0
        encode = getattr(self.tokenizer, "encode", None)
        if callable(encode):
            truncated = sum(len(encode(p)) + 2 > ctx for p in prompts)
        return self.tokenizer(list(prompts), context_length=ctx), int(truncated)


def load_clip(weights: str | os.PathLike, backbone: str | None = None,
              device: str | torch.device = "cpu") -> CLIPScorer:
    """An open_clip model in eval mode from a local checkpoint file or ``local-dir`` folder (see module doc)."""
    import open_clip

    path = Path(weights).expanduser()
    if not path.exists():
        raise FileNotFoundError(
            f"CLIP weights not found at {path}; pass a local open_clip checkpoint file with its backbone name (e.g. "
            f"ViT-B-32) or a folder holding open_clip_config.json and open_clip_model.safetensors. "
            f"Nothing is downloaded."
        )
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise FileNotFoundError(f"{path} has no open_clip_config.json; pass the checkpoint file itself together "
                                    f"with its backbone name instead")
        name = f"local-dir:{path}"
        model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
        tokenizer = open_clip.get_tokenizer(name)
        backbone = backbone or path.name
    else:
        if not backbone:
            raise ValueError("a CLIP checkpoint file needs its architecture name (backbone), e.g. 'ViT-B-32'")
        if backbone not in open_clip.list_models():
            raise ValueError(f"unknown open_clip backbone {backbone!r}; see open_clip.list_models()")
        model, _, preprocess = open_clip.create_model_and_transforms(backbone, pretrained=str(path), device=device)
        tokenizer = open_clip.get_tokenizer(backbone)
    model.eval().requires_grad_(False)
    return CLIPScorer(model, preprocess, tokenizer, backbone, str(path))


@torch.no_grad()
def clip_score(images, prompts: list[str], scorer: CLIPScorer, *, value_range: tuple[float, float] = (0.0, 1.0),
               batch_size: int = 32) -> dict:
    """Mean CLIP score of ``images[i]`` against ``prompts[i]``; returns the score and how it was computed."""
    from PIL import Image

    imgs = to_uint8_rgb(images, value_range)
    prompts = list(prompts)
    if len(prompts) != imgs.shape[0]:
        raise ValueError(f"got {imgs.shape[0]} images but {len(prompts)} prompts")
    if not prompts:
        raise ValueError("clip_score needs at least one (image, prompt) pair")
    device = next(scorer.model.parameters()).device
    scores, n_trunc = [], 0
    for i in range(0, len(prompts), batch_size):
        chunk = imgs[i:i + batch_size]
        pil = [Image.fromarray(im.permute(1, 2, 0).numpy()) for im in chunk]
        pixel = torch.stack([scorer.preprocess(p) for p in pil]).to(device)
        tokens, t = scorer.tokenize(prompts[i:i + batch_size])
        n_trunc += t
        img_f = F.normalize(scorer.model.encode_image(pixel).double(), dim=-1)
        txt_f = F.normalize(scorer.model.encode_text(tokens.to(device)).double(), dim=-1)
        scores.append(100.0 * (img_f * txt_f).sum(-1).clamp_min(0.0))
    s = torch.cat(scores)
    return {"clip_score": float(s.mean()), "clip_score_std": float(s.std(unbiased=False)), "num_pairs": int(s.numel()),
            "scale": SCALE, "backbone": scorer.backbone, "weights": scorer.weights,
            "context_length": scorer.context_length, "truncated_prompts": n_trunc}
