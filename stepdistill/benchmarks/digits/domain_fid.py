"""Domain FID and class accuracy: the two quality numbers of the digits benchmark.

Domain FID (Heusel et al. 2017, eq. 6, with the Inception network replaced by the digit
classifier's 64-d penultimate layer)::

    FD = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))

where (mu, S) are the feature mean and unbiased covariance of generated (g) and held-out real
(r, by default the 360-image test split) digits. The statistics are accumulated and the distance
computed by ``torchmetrics.image.fid.FrechetInceptionDistance`` with our extractor passed as
``feature=`` (torchmetrics reads its ``num_features`` attribute); the extractor returns float64
features and torchmetrics keeps float64 sums, so the whole computation is float64.

Class accuracy: the fraction of class-conditional samples the classifier assigns to the class
they were asked for (the analogue of CLIP score).

Inputs are image batches ``(B, C, 16, 16)`` as float tensors in ``value_range`` (default [-1, 1],
the data convention; pass ``(0, 1)`` for Diffusers pipeline outputs with ``output_type="pt"``).
Three-channel images are averaged to grey. Values are clamped to the range, as pipelines do;
values far outside it mean the range was given wrongly and raise an error.

The sample-size bias of FD matters at these sizes: compare numbers only at equal sample counts
(the teacher metrics use 1,000 generated samples against the 360 test digits).
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance

from .classifier import DigitClassifier, load_classifier
from .data import IMAGE_SIZE, load_split

__all__ = [
    "DigitFeatureExtractor",
    "class_accuracy",
    "default_classifier",
    "domain_fid",
    "noise_floor_fid",
    "to_classifier_input",
]


@lru_cache(maxsize=1)
def default_classifier() -> DigitClassifier:
    """The committed classifier (loaded once per process)."""
    return load_classifier()


class DigitFeatureExtractor(nn.Module):
    """``FrechetInceptionDistance(feature=...)`` adapter: images in [-1, 1] -> float64 features."""

    def __init__(self, classifier: DigitClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = int(classifier.num_features)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(images.float()).double()


def to_classifier_input(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """Validate and convert ``(B, C, 16, 16)`` images in ``value_range`` to ``(B, 1, 16, 16)`` in [-1, 1]."""
    if not torch.is_tensor(images) or not images.is_floating_point():
        raise TypeError(
            "images must be a float tensor (B, C, 16, 16); for uint8 images divide by 255 and pass value_range=(0, 1)"
        )
    if images.ndim != 4 or images.shape[1] not in (1, 3) or tuple(images.shape[2:]) != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(
            f"images must have shape (B, 1 or 3, {IMAGE_SIZE}, {IMAGE_SIZE}), got {tuple(images.shape)}"
        )
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (low, high) with high > low, got {value_range}")
    if not torch.isfinite(images).all():
        raise ValueError("images contain NaN or inf values")
    slack = 0.5 * (hi - lo)
    vmin, vmax = float(images.min()), float(images.max())
    if vmin < lo - slack or vmax > hi + slack:
        raise ValueError(
            f"images span [{vmin:.3g}, {vmax:.3g}], far outside value_range={value_range}; pass the range the "
            "images are in: (-1, 1) for data/latent-decoder outputs, (0, 1) for pipeline outputs with output_type='pt'"
        )
    x = images.detach().float().cpu().clamp(lo, hi)
    x = (x - lo) / (hi - lo) * 2.0 - 1.0
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    return x


@torch.no_grad()
def domain_fid(
    generated: torch.Tensor,
    real: torch.Tensor | None = None,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    real_value_range: tuple[float, float] = (-1.0, 1.0),
    classifier: DigitClassifier | None = None,
    batch_size: int = 500,
) -> float:
    """Frechet distance between classifier features of ``generated`` and ``real`` (default: test split)."""
    gen = to_classifier_input(generated, value_range)
    ref = load_split("test").images if real is None else to_classifier_input(real, real_value_range)
    if gen.shape[0] < 2 or ref.shape[0] < 2:
        raise ValueError(f"domain_fid needs at least 2 images per side, got {gen.shape[0]} and {ref.shape[0]}")
    extractor = DigitFeatureExtractor(classifier if classifier is not None else default_classifier())
    metric = FrechetInceptionDistance(feature=extractor, normalize=True, reset_real_features=True)
    for chunk in ref.split(batch_size):
        metric.update(chunk, real=True)
    for chunk in gen.split(batch_size):
        metric.update(chunk, real=False)
    return float(metric.compute())


@torch.no_grad()
def class_accuracy(
    generated: torch.Tensor,
    labels: torch.Tensor,
    *,
    value_range: tuple[float, float] = (-1.0, 1.0),
    classifier: DigitClassifier | None = None,
) -> float:
    """Fraction of ``generated[i]`` classified as ``labels[i]``."""
    x = to_classifier_input(generated, value_range)
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    if labels.shape[0] != x.shape[0]:
        raise ValueError(f"got {x.shape[0]} images but {labels.shape[0]} labels")
    model = classifier if classifier is not None else default_classifier()
    pred = torch.cat([model(chunk).argmax(-1) for chunk in x.split(500)])
    return float((pred == labels).double().mean())


def noise_floor_fid(classifier: DigitClassifier | None = None) -> float:
    """Domain FID between the train split (1,437 real digits) and the test split (360): the floor
    that no generator of the data distribution is expected to beat by much."""
    return domain_fid(load_split("train").images, classifier=classifier)
