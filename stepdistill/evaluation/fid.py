"""FID and KID with the standard Inception network, from local weights only.

FID (Heusel et al. 2017, eq. 6) between Gaussians fitted to 2048-d Inception pool features of generated (g) and
reference (r) images::

    FID = ||mu_g - mu_r||^2 + Tr(S_g + S_r - 2 (S_g S_r)^(1/2))

KID (Binkowski et al. 2018, eq. 4): the unbiased MMD^2 estimate with the cubic polynomial kernel
``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets (mean and standard deviation reported).

Feature extractor: the TF-2015-12-05 Inception-v3 port that torch-fidelity ships
(``FeatureExtractorInceptionV3``, via torchmetrics' ``NoTrainInceptionV3``), fed uint8 RGB images. Its weights are
torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` (the same file pytorch-fid distributes as
``pt_inception-2015-12-05-6726825d.pth``; the suffix is the prefix of its SHA-256). They are never downloaded here:
:func:`find_inception_weights` looks at an explicit path, ``$STEPDISTILL_INCEPTION_WEIGHTS``, the torch hub
checkpoint folder and the Hugging Face cache, and otherwise raises :class:`InceptionWeightsNotFound` naming the file
and where to put it. The SHA-256 of the file actually used is recorded in every result, with
``official_weights = sha256.startswith("6726825d")``.

Images are converted to uint8 as soon as they arrive (round-to-nearest from float, as a PNG writer would) and kept
as uint8; resizing to 299x299 is torch-fidelity's TF1-compatible bilinear (``antialias=False``) by default, so the
numbers match torch-fidelity's FID on the same images. Feature sums and covariances are float64 (the extractor
output is cast to float64 before torchmetrics accumulates it).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
import torch.nn as nn

__all__ = [
    "INCEPTION_FILENAMES",
    "InceptionFeatureExtractor",
    "InceptionWeightsNotFound",
    "OFFICIAL_SHA256_PREFIX",
    "compute_fid_kid",
    "find_inception_weights",
    "inception_features",
    "load_inception",
    "to_uint8_rgb",
]

INCEPTION_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth", "pt_inception-2015-12-05-6726825d.pth")
OFFICIAL_SHA256_PREFIX = "6726825d"
ENV_VAR = "STEPDISTILL_INCEPTION_WEIGHTS"


class InceptionWeightsNotFound(FileNotFoundError):
    """The Inception weights file is not available locally (it is never downloaded)."""


def _torch_hub_checkpoints() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def _hf_cache_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    hf_home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    dirs.append(hf_home / "hub")
    return dirs


def _candidates(path: str | os.PathLike | None) -> list[Path]:
    out: list[Path] = []
    for p in (path, os.environ.get(ENV_VAR)):
        if p:
            p = Path(p).expanduser()
            out += [p / n for n in INCEPTION_FILENAMES] if p.is_dir() else [p]
    hub = _torch_hub_checkpoints()
    out += [hub / n for n in INCEPTION_FILENAMES]
    for cache in _hf_cache_dirs():
        if cache.is_dir():
            for n in INCEPTION_FILENAMES:
                out += sorted(cache.glob(f"models--*/snapshots/*/**/{n}"))
    return out


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The local Inception weights file: ``path`` (a file, or a folder holding one of :data:`INCEPTION_FILENAMES`),
    else ``$STEPDISTILL_INCEPTION_WEIGHTS``, else ``<torch hub dir>/checkpoints/``, else the Hugging Face cache."""
    if path is not None and not Path(path).expanduser().exists():
        raise InceptionWeightsNotFound(
            f"Inception weights not found at {path}. Put torch-fidelity's {INCEPTION_FILENAMES[0]} there "
            f"(or pass the folder that holds it)."
        )
    for c in _candidates(path):
        if c.is_file():
            return c
    raise InceptionWeightsNotFound(
        f"FID/KID need the Inception weights file {INCEPTION_FILENAMES[0]} (torch-fidelity's TF-2015-12-05 "
        f"Inception-v3; pytorch-fid names the same file {INCEPTION_FILENAMES[1]}) and never download it. "
        f"Copy it to {_torch_hub_checkpoints() / INCEPTION_FILENAMES[0]}, or set {ENV_VAR}=/path/to/the/file, "
        f"or pass its path (--inception-weights / weights_path=). It is published at "
        f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILENAMES[0]}"
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class InceptionFeatureExtractor(nn.Module):
    """uint8 ``(B, 3, H, W)`` -> float64 ``(B, features)`` Inception features (torch-fidelity's network).

    ``features`` = 2048 (pool3, the standard FID/KID features) or 64 / 192 / 768 (earlier blocks, as torch-fidelity
    and torchmetrics offer them for small sample sets; results are not comparable across feature sizes).
    """

    def __init__(self, weights_path: Path, antialias: bool = False, features: int = 2048) -> None:
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        state = torch.load(weights_path, map_location="cpu", weights_only=True)  # refuse pickled code
        if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
            raise ValueError(f"{weights_path} is not an Inception-v3 state dict of the torch-fidelity layout "
                             f"(expected keys like 'Mixed_7c.branch_pool.conv.weight')")
        if features not in (64, 192, 768, 2048):
            raise ValueError(f"Inception features must be one of 64, 192, 768, 2048, got {features}")
        self.num_features = int(features)
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(features)],
                                      feature_extractor_weights_path=str(weights_path), antialias=antialias)
        self.weights_path = Path(weights_path)
        self.antialias = antialias

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        return self.net(images).double()

    def describe(self) -> dict:
        sha = _sha256(self.weights_path)
        feats = "pool3 2048-d" if self.num_features == 2048 else f"{self.num_features}-d (not standard FID)"
        resize = "bilinear, antialiased" if self.antialias else "bilinear, TF1-compatible (torch-fidelity)"
        return {"network": "InceptionV3 (TF 2015-12-05 port, torch-fidelity FeatureExtractorInceptionV3)",
                "features": feats, "weights": str(self.weights_path), "weights_sha256": sha,
                "official_weights": sha.startswith(OFFICIAL_SHA256_PREFIX), "resize_to_299": resize}


def load_inception(weights_path: str | os.PathLike | None = None, antialias: bool = False,
                   features: int = 2048) -> InceptionFeatureExtractor:
    """Build the extractor from local weights (see :func:`find_inception_weights`)."""
    path = find_inception_weights(weights_path)
    return InceptionFeatureExtractor(path, antialias=antialias, features=features).eval()


def to_uint8_rgb(images, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Images -> uint8 ``(B, 3, H, W)``.

    Accepts a uint8 tensor/array (``(B, C, H, W)`` or ``(B, H, W, C)`` with C in {1, 3}), a float tensor/array in
    ``value_range`` (rounded to the nearest of 256 levels), or a list of PIL images. Grey images are repeated to RGB.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im.convert("RGB")) for im in images])
    x = torch.as_tensor(np.asarray(images)) if not torch.is_tensor(images) else images.detach().cpu()
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images (B, C, H, W) or (B, H, W, C), got shape {tuple(x.shape)}")
    if x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3):
        x = x.permute(0, 3, 1, 2)
    if x.shape[1] not in (1, 3):
        raise ValueError(f"images must have 1 or 3 channels, got shape {tuple(x.shape)}")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise ValueError(f"images must be uint8 or float, got {x.dtype}")
        lo, hi = value_range
        if not torch.isfinite(x).all():
            raise ValueError("images contain NaN or inf")
        x = ((x.double() - lo) / (hi - lo) * 255.0).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.repeat(1, 3, 1, 1)
    return x.contiguous()


class _Precomputed(nn.Module):
    """Feature "extractor" that passes precomputed float64 features through (so Inception runs once)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features.double()


def _batches(images: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    return images.split(batch_size)


@torch.no_grad()
def inception_features(images, extractor: InceptionFeatureExtractor, batch_size: int = 50,
                       value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """float64 Inception features ``(N, extractor.num_features)`` of images (any form :func:`to_uint8_rgb` takes)."""
    imgs = to_uint8_rgb(images, value_range)
    return torch.cat([extractor(chunk) for chunk in _batches(imgs, batch_size)])


@torch.no_grad()
def compute_fid_kid(
    generated,
    reference,
    *,
    reference_name: str,
    extractor: InceptionFeatureExtractor | None = None,
    weights_path: str | os.PathLike | None = None,
    kid: bool = True,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 50,
    seed: int = 0,
    reference_features: torch.Tensor | None = None,
) -> dict:
    """FID (and KID) of ``generated`` against ``reference`` images (any form :func:`to_uint8_rgb` accepts).

    Returns ``{"fid", "kid_mean", "kid_std", "num_generated", "num_reference", "reference", "kid_subsets",
    "kid_subset_size", "statistics_dtype", "feature_extractor": {...}}``. The KID subset size is capped at the
    smaller sample count (recorded). FID values are only comparable at equal sample counts and the same reference.

    ``reference_features`` (from :func:`inception_features` with the same ``extractor``) skip re-extracting the
    reference when several sample sets are compared against it; ``reference`` is then only counted.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = to_uint8_rgb(generated, value_range)
    n_ref = int(reference_features.shape[0]) if reference_features is not None else None
    ref = to_uint8_rgb(reference, value_range) if reference_features is None else None
    n_ref = n_ref if ref is None else int(ref.shape[0])
    if gen.shape[0] < 2 or n_ref < 2:
        raise ValueError(f"FID needs at least 2 images on each side, got {gen.shape[0]} generated and "
                         f"{n_ref} reference")
    extractor = extractor if extractor is not None else load_inception(weights_path)
    # Inception runs once per image; both metrics then accumulate the same float64 features.
    feats_ref = reference_features.double() if ref is None else inception_features(ref, extractor, batch_size)
    if feats_ref.shape[1] != extractor.num_features:
        raise ValueError(f"reference_features have {feats_ref.shape[1]} dimensions but the extractor gives "
                         f"{extractor.num_features}; compute them with the same extractor")
    feats_gen = inception_features(gen, extractor, batch_size)
    passthrough = _Precomputed(extractor.num_features)
    fid = FrechetInceptionDistance(feature=passthrough, reset_real_features=True)
    fid.update(feats_ref, real=True)
    fid.update(feats_gen, real=False)
    subset = min(kid_subset_size, gen.shape[0], n_ref)
    kidm = None
    if kid:
        import warnings

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            kidm = KernelInceptionDistance(feature=passthrough, subsets=kid_subsets, subset_size=subset)
        kidm.update(feats_ref, real=True)
        kidm.update(feats_gen, real=False)
    out = {"fid": float(fid.compute()), "num_generated": int(gen.shape[0]), "num_reference": n_ref,
           "reference": reference_name, "statistics_dtype": str(fid.real_features_sum.dtype).replace("torch.", "")}
    if kidm is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # KID's random subsets
            mean, std = kidm.compute()
        out.update(kid_mean=float(mean), kid_std=float(std), kid_subsets=kid_subsets, kid_subset_size=subset)
    out["feature_extractor"] = extractor.describe()
    return out
