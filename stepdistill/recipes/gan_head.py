"""DMD2's GAN classifier: bottleneck features of a (fake-score) network, captured by a forward hook, and a small
head that maps them to one logit per sample (spec B.8, "GAN").

* :class:`BottleneckFeatures` runs a backbone "in classify mode": a forward hook on its bottleneck module (the
  UNet's ``mid_block`` output; the toy ``ToyMLP``'s penultimate activation) records the features and stops the
  forward there (the layers after the bottleneck are not computed), which is what the official code's
  ``classify_forward`` does. The captured tensor keeps its autograd graph, so a loss on the logit reaches both the
  network below the bottleneck and the input sample.
* :func:`make_gan_head`: for 4-D features, blocks of ``conv(4x4, stride 2, pad 1) + GroupNorm + SiLU`` that halve
  the spatial size until it is 1x1, then a 1x1 conv to one channel (the official SD/SDXL heads reduce 8x8 / 32x32 to
  1x1 the same way); for 2-D features (toy MLP) ``Linear + SiLU + Linear``.
* Losses (non-saturating, softplus form): generator ``softplus(-logit(fake))``, discriminator
  ``softplus(logit(fake.detach())) + softplus(-logit(real))``.

The features are taken from the *fake* score by default (the official choice; spec B.8 pitfall and Part D.9); the
teacher's features are the configurable alternative (``gan_features: teacher``).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor, nn

from ..models.backbones import unwrap

__all__ = ["BottleneckFeatures", "bottleneck_module", "make_gan_head", "gan_generator_loss",
           "gan_discriminator_loss"]


class _FeaturesReady(Exception):
    """Raised by the hook to stop the forward once the bottleneck features exist."""


def bottleneck_module(backbone: nn.Module) -> nn.Module:
    """The module whose output is the bottleneck: ``mid_block`` (Diffusers UNets) or the penultimate layer (ToyMLP)."""
    base = unwrap(backbone)
    name = type(base).__name__
    if name in ("UNet2DConditionModel", "UNet2DModel"):
        if getattr(base, "mid_block", None) is None:
            raise ValueError(f"this {name} has no mid_block; the DMD2 GAN head needs one (set recipe.gan_weight_gen=0 "
                             f"and recipe.gan_weight_disc=0 to train without the GAN)")
        return base.mid_block
    if name == "ToyMLP":
        return base.net[-2]  # the last activation before the output Linear
    raise ValueError(f"the DMD2 GAN head supports UNet and ToyMLP backbones, not {name}; set recipe.gan_weight_gen=0 "
                     f"and recipe.gan_weight_disc=0 (no GAN) for this backbone")


class BottleneckFeatures:
    """Call ``fn()`` (a forward of ``backbone``) and return the bottleneck output it produced, stopping there."""

    def __init__(self, backbone: nn.Module):
        self.module = bottleneck_module(backbone)

    def __call__(self, fn) -> Tensor:
        store: dict[str, Tensor] = {}

        def hook(_module, _args, output):
            store["features"] = output[0] if isinstance(output, tuple) else output
            raise _FeaturesReady

        handle = self.module.register_forward_hook(hook)
        try:
            fn()
        except _FeaturesReady:
            pass
        finally:
            handle.remove()
        if "features" not in store:
            raise RuntimeError("the backbone forward never reached its bottleneck module")
        return store["features"]


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2, 1):
        if channels % g == 0:
            return g
    return 1


def make_gan_head(features: Tensor, hidden: int | None = None) -> nn.Module:
    """A head for features shaped like ``features`` (``(N, C, H, W)`` or ``(N, D)``) returning ``(N,)`` logits."""
    if features.ndim == 2:
        d = features.shape[1]
        h = hidden or d
        return _Flat(nn.Sequential(nn.Linear(d, h), nn.SiLU(), nn.Linear(h, 1)))
    if features.ndim != 4:
        raise ValueError(f"GAN head features must be (N, C, H, W) or (N, D), got shape {tuple(features.shape)}")
    c, size = features.shape[1], max(features.shape[2], features.shape[3])
    h = hidden or c
    layers: list[nn.Module] = []
    ch = c
    for _ in range(max(0, math.ceil(math.log2(size)))):
        layers += [nn.Conv2d(ch, h, 4, stride=2, padding=1), nn.GroupNorm(_groups(h), h), nn.SiLU()]
        ch = h
    layers.append(nn.Conv2d(ch, 1, 1))
    return _Flat(nn.Sequential(*layers))


class _Flat(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        out = self.net(x.float())
        if out.ndim == 4:  # any spatial remainder is averaged (1x1 for the sizes the blocks were built for)
            out = out.mean(dim=(2, 3))
        return out.reshape(out.shape[0])


def gan_generator_loss(logit_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``mean softplus(-D(G(z)))``."""
    return F.softplus(-logit_fake.float()).mean()


def gan_discriminator_loss(logit_fake: Tensor, logit_real: Tensor) -> Tensor:
    """``mean softplus(D(fake)) + mean softplus(-D(real))`` (fake logits from detached generator samples)."""
    return F.softplus(logit_fake.float()).mean() + F.softplus(-logit_real.float()).mean()
