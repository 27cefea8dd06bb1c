"""Small MLP backbone for 2-D toys (spec C.2): SiLU MLP on [x, time embedding, class and guidance embeddings]."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["ToyMLP", "sinusoidal_embedding"]


def sinusoidal_embedding(values: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """[cos(v f_k), sin(v f_k)] with f_k = max_period^(-k/(dim/2)); float32 regardless of the input dtype."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=values.device, dtype=torch.float32) / half)
    args = values.float().reshape(-1, 1) * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1)


class ToyMLP(nn.Module):
    """``net(x, timestep, class_labels, guidance)`` -> output of the same shape as x.

    ``timestep`` is the process' model timestep (e.g. 1000 s, or t in [0, pi/2] scaled by ``time_scale``);
    ``class_labels`` use ``num_classes`` as the null (unconditional) label; ``guidance`` (optional) is embedded
    sinusoidally like the LCM guidance embedding, through a zero-initialised projection so that a w-conditioned
    student starts identical to its teacher.
    """

    def __init__(self, dim: int = 2, hidden: int = 256, depth: int = 4, num_classes: int = 0, emb_dim: int = 64,
                 guidance_embed: bool = False, time_scale: float = 1.0):
        super().__init__()
        self.dim, self.emb_dim, self.num_classes, self.time_scale = dim, emb_dim, num_classes, time_scale
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.class_emb = nn.Embedding(num_classes + 1, hidden) if num_classes > 0 else None
        self.guidance_proj = None
        if guidance_embed:
            self.add_guidance_embedding()
        layers: list[nn.Module] = [nn.Linear(dim + hidden, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        layers.append(nn.Linear(hidden, dim))
        self.net = nn.Sequential(*layers)

    def add_guidance_embedding(self) -> None:
        hidden = self.time_mlp[-1].out_features
        self.guidance_proj = nn.Linear(self.emb_dim, hidden)
        nn.init.zeros_(self.guidance_proj.weight)
        nn.init.zeros_(self.guidance_proj.bias)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None = None, guidance: Tensor | None = None) -> Tensor:
        n = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device).float().expand(n) * self.time_scale
        h = self.time_mlp(sinusoidal_embedding(t, self.emb_dim).to(x.dtype))
        if self.class_emb is not None:
            labels = class_labels if class_labels is not None else torch.full((n,), -1, device=x.device)
            labels = torch.where(labels.long() < 0, self.num_classes, labels.long())  # -1 = unconditional
            h = h + self.class_emb(labels)
        if self.guidance_proj is not None and guidance is not None:
            g = torch.as_tensor(guidance, device=x.device).float().expand(n)
            h = h + self.guidance_proj(sinusoidal_embedding(1000.0 * g, self.emb_dim).to(x.dtype))
        return self.net(torch.cat([x, h], dim=1))
