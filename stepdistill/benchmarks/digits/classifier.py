"""A small CNN digit classifier: the judge of the digits benchmark.

It plays two roles (DESIGN.md, Benchmarks):

* its penultimate 64-d activations are the feature space of the domain FID (the analogue of the
  Inception pool features of FID, Heusel et al. 2017);
* its accuracy on class-conditional samples is the analogue of CLIP score.

Architecture (input ``(B, 1, 16, 16)`` in [-1, 1])::

    conv3x3(1->32) ReLU  conv3x3(32->32) ReLU  maxpool2   -> 32 x 8 x 8
    conv3x3(32->64) ReLU maxpool2                         -> 64 x 4 x 4
    flatten  linear(1024->64) ReLU                        -> features (64)
    dropout(0.25, training only)  linear(64->10)          -> logits

Training: cross-entropy, Adam(lr 1e-3), batch 64 drawn with :func:`data.sample_batch` (seed 1),
random translations of up to one pixel (zero-padded with the background value -1) so the judge
does not reject a sample only for being off-centre by one pixel. Weights are stored as
safetensors with a JSON config (no pickles).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .data import IMAGE_SIZE, NUM_CLASSES, DigitsSplit, sample_batch

__all__ = [
    "DigitClassifier",
    "evaluate_accuracy",
    "load_classifier",
    "save_classifier",
    "train_classifier",
]

WEIGHTS_NAME = "classifier.safetensors"
CONFIG_NAME = "classifier.json"


class DigitClassifier(nn.Module):
    """CNN over ``(B, 1, 16, 16)`` images in [-1, 1]; ``features`` gives the 64-d penultimate layer."""

    num_features = 64

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * (IMAGE_SIZE // 4) ** 2, self.num_features),
            nn.ReLU(),
        )
        self.dropout = nn.Dropout(0.25)
        self.head = nn.Linear(self.num_features, NUM_CLASSES)

    @staticmethod
    def check_input(x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != (1, IMAGE_SIZE, IMAGE_SIZE):
            raise ValueError(
                f"DigitClassifier expects images of shape (B, 1, {IMAGE_SIZE}, {IMAGE_SIZE}) in [-1, 1], "
                f"got {tuple(x.shape)}; convert RGB to grey and resize first (see domain_fid.to_classifier_input)"
            )

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate activations ``(B, 64)``."""
        self.check_input(x)
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(B, 10)``."""
        return self.head(self.dropout(self.features(x)))


def _random_shift(x: torch.Tensor, g: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by an integer offset in [-max_shift, max_shift]^2, filling with -1."""
    b = x.shape[0]
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    offs = torch.randint(0, 2 * max_shift + 1, (b, 2), generator=g)
    out = torch.empty_like(x)
    for i in range(b):
        dy, dx = int(offs[i, 0]), int(offs[i, 1])
        out[i] = padded[i, :, dy : dy + IMAGE_SIZE, dx : dx + IMAGE_SIZE]
    return out


def train_classifier(
    train: DigitsSplit, steps: int = 1500, batch_size: int = 64, lr: float = 1e-3, seed: int = 1,
    progress: bool = False,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` from a seeded init; deterministic for a fixed thread count."""
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    steps_iter = range(steps)
    if progress:
        from tqdm.auto import tqdm

        steps_iter = tqdm(steps_iter, desc="classifier", mininterval=5.0)
    for step in steps_iter:
        batch = sample_batch(train, step, batch_size, seed=seed)
        x = _random_shift(batch.images, batch.generator)
        loss = F.cross_entropy(model(x), batch.labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate_accuracy(model: DigitClassifier, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of ``images`` whose argmax class equals ``labels``."""
    model.eval()
    pred = torch.cat([model(chunk).argmax(-1) for chunk in images.split(512)])
    return float((pred == labels.to(pred.device)).double().mean())


def save_classifier(model: DigitClassifier, folder: str | Path, metrics: dict) -> None:
    """Write ``classifier.safetensors`` and ``classifier.json`` (architecture tag + ``metrics``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / WEIGHTS_NAME))
    config = {"architecture": "DigitClassifier-v1", "num_features": model.num_features, **metrics}
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_classifier(folder: str | Path | None = None) -> DigitClassifier:
    """Load the committed classifier (default: ``assets/classifier``) in eval mode, gradients off."""
    from .paths import asset_path

    folder = Path(folder) if folder is not None else asset_path("classifier")
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(
            f"missing {weights}; build it with `python scripts/build_digits_assets.py --what classifier`"
        )
    model = DigitClassifier()
    model.load_state_dict(load_file(str(weights)))
    model.eval().requires_grad_(False)
    return model


def load_classifier_metrics(folder: str | Path | None = None) -> dict:
    """The metrics recorded next to the committed classifier weights."""
    from .paths import asset_path

    folder = Path(folder) if folder is not None else asset_path("classifier")
    return json.loads((folder / CONFIG_NAME).read_text())
