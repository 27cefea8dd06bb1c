"""Model layer: the Denoiser wrapper, conditioning, backbone adapters, teacher loading, LoRA and guidance embeds."""

from .conditioning import Conditioning
from .denoiser import Denoiser
from .mlp import ToyMLP

__all__ = ["Conditioning", "Denoiser", "ToyMLP"]
