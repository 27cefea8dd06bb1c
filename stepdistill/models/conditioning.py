"""``Conditioning``: everything a backbone needs besides (x_t, t), as one batch-aware container.

Fields mirror the Diffusers forward arguments: text embeddings (``encoder_hidden_states`` + mask), SD3/Flux
``pooled_projections``, SDXL ``added_cond_kwargs`` ({"text_embeds", "time_ids"}), and ``class_labels`` for
class-conditional models (the unconditional label is the model's null class). ``cat`` and ``repeat`` let the
Denoiser batch the conditional and unconditional halves of CFG into a single forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = ["Conditioning"]


def _map(value: Any, fn) -> Any:
    if value is None:
        return None
    if torch.is_tensor(value):
        return fn(value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    raise TypeError(f"unsupported conditioning value of type {type(value).__name__}")


def _cat2(a: Any, b: Any) -> Any:
    if a is None and b is None:
        return None
    if (a is None) != (b is None):
        raise ValueError("cannot concatenate conditionings where only one side has a field set")
    if torch.is_tensor(a):
        return torch.cat([a, b], dim=0)
    return {k: _cat2(a[k], b[k]) for k in a}


@dataclass
class Conditioning:
    encoder_hidden_states: Tensor | None = None
    encoder_attention_mask: Tensor | None = None
    pooled_projections: Tensor | None = None
    added_cond_kwargs: dict[str, Tensor] | None = None
    class_labels: Tensor | None = None
    extra: dict[str, Tensor] = field(default_factory=dict)

    def _apply(self, fn) -> "Conditioning":
        return Conditioning(**{f.name: _map(getattr(self, f.name), fn) for f in fields(self)})

    def to(self, device=None, dtype=None) -> "Conditioning":
        def move(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype if (dtype is not None and t.is_floating_point()) else None)

        return self._apply(move)

    def index(self, idx) -> "Conditioning":
        return self._apply(lambda t: t[idx])

    def repeat_interleave(self, n: int) -> "Conditioning":
        return self._apply(lambda t: t.repeat_interleave(n, dim=0))

    def cat(self, other: "Conditioning") -> "Conditioning":
        return Conditioning(**{f.name: _cat2(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def detach(self) -> "Conditioning":
        return self._apply(lambda t: t.detach())

    @property
    def batch_size(self) -> int | None:
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                return v.shape[0]
            if isinstance(v, dict):
                for t in v.values():
                    return t.shape[0]
        return None

    def replace(self, **kw) -> "Conditioning":
        return replace(self, **kw)

    def flat_state(self, prefix: str = "cond") -> dict[str, Tensor]:
        """The tensors as one flat ``{name: tensor}`` dict (``PREFIX__field`` or ``PREFIX__field__key``), for
        checkpoints (safetensors holds flat tensor dicts); :meth:`from_flat_state` inverts it."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if torch.is_tensor(v):
                out[f"{prefix}__{f.name}"] = v
            elif isinstance(v, dict):
                out.update({f"{prefix}__{f.name}__{k}": t for k, t in v.items()})
        return out

    @classmethod
    def from_flat_state(cls, flat: dict[str, Tensor], prefix: str = "cond") -> "Conditioning":
        """Inverse of :meth:`flat_state`; keys without the prefix are ignored."""
        kw: dict = {}
        for key, v in flat.items():
            parts = key.split("__")
            if parts[0] != prefix:
                continue
            if len(parts) == 2:
                kw[parts[1]] = v
            else:
                kw.setdefault(parts[1], {})[parts[2]] = v
        return cls(**kw)
