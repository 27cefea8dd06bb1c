"""The digits benchmark data: scikit-learn's 1,797 real handwritten 8x8 digits, ready for diffusion.

Source: ``sklearn.datasets.load_digits`` (the UCI "Optical Recognition of Handwritten Digits" test
set, bundled inside scikit-learn, so nothing is downloaded). Pixel values are integers 0..16.

Preprocessing (fixed, see :func:`preprocess`):

1. ``x = v / 16 * 2 - 1`` maps the 0..16 grey levels to [-1, 1], the range Diffusers pipelines and
   VAEs assume (``VaeImageProcessor`` maps [-1, 1] <-> [0, 1]).
2. Bilinear upsampling (``align_corners=False``) from 8x8 to 16x16. Why 16: a power of two survives
   the 2x downsampling of a UNet (16 -> 8 -> 4) and the patchify of a DiT (patch 2 on 8x8 latents);
   a VAE with downsampling factor 2 turns 16x16 pixels into 8x8 latents, the SD layout at toy size.
   Bilinear interpolation of values in [-1, 1] stays in [-1, 1] (it is a convex combination).

Images are single-channel (``1 x 16 x 16``): digits are grey-level, and every teacher and the
classifier use one channel.

Split: stratified 80/20 train/test with seed 0 (``sklearn.model_selection.train_test_split``),
giving 1,437 train and 360 test images. The test split is held out from every teacher, the VAE
and the classifier; it is the "real" side of the domain FID.

Prompts: each class has :data:`PROMPT_TEMPLATES` (four wordings, digit as numeral or word); a
training sample draws one template uniformly at random. :data:`EMPTY_PROMPT` is the unconditional
prompt used for classifier-free guidance dropout.

Batches: :func:`sample_batch` draws batch ``k`` from a generator seeded by ``(seed, k)`` only
(:func:`step_generator`), so batch ``k`` does not depend on batches ``0..k-1`` and a run resumed at
step ``k`` sees exactly the batches it would have seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "DIGIT_WORDS",
    "EMPTY_PROMPT",
    "IMAGE_SIZE",
    "NUM_CLASSES",
    "PROMPT_TEMPLATES",
    "SPLIT_SEED",
    "DigitsBatch",
    "DigitsSplit",
    "class_prompts",
    "load_split",
    "preprocess",
    "prompt_for",
    "sample_batch",
    "step_generator",
]

NUM_CLASSES = 10
IMAGE_SIZE = 16
SPLIT_SEED = 0
TEST_FRACTION = 0.2
EMPTY_PROMPT = ""

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# ``{digit}`` is the numeral ("3"), ``{word}`` the English word ("three").
PROMPT_TEMPLATES = (
    "a handwritten digit {digit}",
    "the number {word}",
    "a drawing of the digit {word}",
    "handwritten {digit}",
)


def prompt_for(label: int, template: int = 0) -> str:
    """The prompt for class ``label`` written with ``PROMPT_TEMPLATES[template]``."""
    if not 0 <= int(label) < NUM_CLASSES:
        raise ValueError(f"label must be in 0..{NUM_CLASSES - 1}, got {label}")
    if not 0 <= int(template) < len(PROMPT_TEMPLATES):
        raise ValueError(f"template must be in 0..{len(PROMPT_TEMPLATES) - 1}, got {template}")
    return PROMPT_TEMPLATES[int(template)].format(digit=int(label), word=DIGIT_WORDS[int(label)])


def class_prompts(labels: torch.Tensor | list[int], template: int = 0) -> list[str]:
    """One prompt per label, all with the same template (the evaluation prompts)."""
    return [prompt_for(int(y), template) for y in labels]


def preprocess(raw: np.ndarray) -> torch.Tensor:
    """Raw ``(N, 8, 8)`` grey levels 0..16 -> float32 ``(N, 1, 16, 16)`` in [-1, 1] (bilinear)."""
    raw = np.asarray(raw)
    if raw.ndim != 3 or raw.shape[1:] != (8, 8):
        raise ValueError(f"expected raw digits of shape (N, 8, 8), got {raw.shape}")
    x = torch.from_numpy(raw.astype(np.float32)) / 16.0 * 2.0 - 1.0
    x = F.interpolate(x[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return x.clamp_(-1.0, 1.0).contiguous()


@dataclass(frozen=True)
class DigitsSplit:
    """One split: ``images`` float32 ``(N, 1, 16, 16)`` in [-1, 1], ``labels`` int64 ``(N,)``,
    ``indices`` int64 ``(N,)`` positions in ``load_digits()`` (for provenance)."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    indices: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@lru_cache(maxsize=1)
def _splits() -> dict[str, DigitsSplit]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    all_idx = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=TEST_FRACTION, stratify=digits.target, random_state=SPLIT_SEED, shuffle=True
    )
    out = {}
    for name, idx in (("train", np.sort(train_idx)), ("test", np.sort(test_idx))):
        out[name] = DigitsSplit(
            name=name,
            images=preprocess(digits.images[idx]),
            labels=torch.from_numpy(digits.target[idx].astype(np.int64)),
            indices=torch.from_numpy(idx.astype(np.int64)),
        )
    return out


def load_split(name: str) -> DigitsSplit:
    """The fixed ``"train"`` (1,437 images) or ``"test"`` (360 images) split.

    Returned tensors are fresh copies, so callers may modify them.
    """
    splits = _splits()
    if name not in splits:
        raise ValueError(f"split must be one of {sorted(splits)}, got {name!r}")
    s = splits[name]
    return DigitsSplit(s.name, s.images.clone(), s.labels.clone(), s.indices.clone())


def step_generator(seed: int, step: int) -> torch.Generator:
    """A CPU ``torch.Generator`` that depends only on ``(seed, step)``.

    The 64-bit seed comes from ``numpy.random.SeedSequence([seed, step])``, which mixes both
    integers so nearby ``(seed, step)`` pairs give unrelated streams.
    """
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative integers, got seed={seed}, step={step}")
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(2, dtype=np.uint32)
    g = torch.Generator(device="cpu")
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


@dataclass(frozen=True)
class DigitsBatch:
    """A training batch: images ``(B, 1, 16, 16)`` in [-1, 1], labels ``(B,)``, the template index of
    each sample's prompt ``(B,)``, its prompt strings, and the split positions it came from, plus the
    generator (already advanced past these draws) for any further per-step randomness (noise, t)."""

    images: torch.Tensor
    labels: torch.Tensor
    templates: torch.Tensor
    prompts: list[str]
    positions: torch.Tensor
    generator: torch.Generator


def sample_batch(split: DigitsSplit, step: int, batch_size: int, seed: int = 0) -> DigitsBatch:
    """Batch number ``step``: ``batch_size`` distinct samples drawn uniformly without replacement,
    each with a uniformly drawn prompt template, from ``step_generator(seed, step)``."""
    if not 0 < batch_size <= len(split):
        raise ValueError(f"batch_size must be in 1..{len(split)} for split {split.name!r}, got {batch_size}")
    g = step_generator(seed, step)
    pos = torch.randperm(len(split), generator=g)[:batch_size]
    templates = torch.randint(0, len(PROMPT_TEMPLATES), (batch_size,), generator=g)
    labels = split.labels[pos]
    prompts = [prompt_for(int(y), int(k)) for y, k in zip(labels, templates)]
    return DigitsBatch(split.images[pos], labels, templates, prompts, pos, g)
