"""Per-run speed settings of the networks a recipe runs, applied by the training loop before ``accelerate.prepare``.

:func:`prepare_networks` takes the recipe's trainable modules and its frozen ones (``Recipe.frozen_modules()``, the
teacher backbone by default; a frozen network that is also trained, e.g. a LoRA-carrying teacher, counts as trained)
and applies, in this order:

1. ``train.gradient_checkpointing`` to trained Diffusers backbones (frozen networks keep no activations anyway);
2. ``train.channels_last`` to UNet backbones ('auto': on CUDA only; channels_last convolutions are slower on CPU);
3. ``model.attention_backend`` / ``model.fuse_qkv`` to every network with attention layers
   (:func:`stepdistill.models.attention_backends.set_attention_backend`); a network whose recipe installed the
   JVP-capable attention (sCM's student) keeps it, and a backend without forward-mode AD is refused for it.

It returns a :class:`NetworkSetup` per network; :func:`write_attention_report` writes them to
``<run dir>/attention_backends.json`` and :func:`summary_lines` gives what the loop logs. ``train.compile`` is applied
after ``accelerate.prepare`` by :func:`maybe_compile` (networks differentiated with ``torch.func.jvp`` are not
compiled).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import RunConfig
from ..models.attention_backends import AttentionReport, set_attention_backend
from ..models.backbones import unwrap

__all__ = ["ATTENTION_REPORT_FILE", "NetworkSetup", "autocast_warning", "maybe_compile", "prepare_networks",
           "summary_lines", "warnings_of", "write_attention_report"]

ATTENTION_REPORT_FILE = "attention_backends.json"
_UNETS = ("UNet2DModel", "UNet2DConditionModel")


@dataclass
class NetworkSetup:
    """What was applied to one network: its attention report and the memory/speed switches."""

    name: str
    trainable: bool
    attention: AttentionReport
    channels_last: bool = False
    gradient_checkpointing: bool = False
    compiled: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def uses_jvp(self) -> bool:
        return "jvp" in self.attention.summary()

    def to_dict(self) -> dict[str, Any]:
        return {"trainable": self.trainable, "channels_last": self.channels_last,
                "gradient_checkpointing": self.gradient_checkpointing, "compiled": self.compiled,
                "notes": list(self.notes), "attention": self.attention.to_dict()}


def _networks(recipe, trainable: dict[str, nn.Module]) -> list[tuple[str, nn.Module, bool]]:
    """(name, bare module, trainable) for every distinct network; a frozen one that is also trained is left out."""
    out, seen = [], set()
    for name, module in trainable.items():
        bare = unwrap(module)
        seen.add(id(bare))
        out.append((name, bare, True))
    frozen = recipe.frozen_modules() if hasattr(recipe, "frozen_modules") else {}
    for name, module in frozen.items():
        bare = unwrap(module)
        if id(bare) in seen or not isinstance(bare, nn.Module):
            continue
        seen.add(id(bare))
        out.append((name, bare, False))
    return out


def _wants_channels_last(setting, module: nn.Module, device: torch.device) -> bool:
    if type(module).__name__ not in _UNETS:
        return False
    return device.type == "cuda" if setting == "auto" else bool(setting)


def prepare_networks(cfg: RunConfig, recipe, trainable: dict[str, nn.Module], device: torch.device) -> list[NetworkSetup]:
    """Apply ``model.*`` and ``train.{gradient_checkpointing, channels_last}`` to the recipe's networks (in place)."""
    device = torch.device(device)
    setups = []
    for name, module, is_trained in _networks(recipe, trainable):
        notes: list[str] = []
        ckpt = False
        if is_trained and cfg.train.gradient_checkpointing:
            if getattr(module, "_supports_gradient_checkpointing", False):
                if not getattr(module, "is_gradient_checkpointing", False):
                    module.enable_gradient_checkpointing()
                ckpt = True
            else:
                notes.append(f"train.gradient_checkpointing: {type(module).__name__} does not support it; not applied")
        else:
            ckpt = bool(getattr(module, "is_gradient_checkpointing", False))  # e.g. recipe.gradient_checkpointing
        channels_last = _wants_channels_last(cfg.train.channels_last, module, device)
        if channels_last:
            module.to(memory_format=torch.channels_last)
        elif cfg.train.channels_last is True and type(module).__name__ not in _UNETS:
            notes.append(f"train.channels_last: only applied to UNets, not {type(module).__name__}")
        report = set_attention_backend(module, cfg.model.attention_backend, fuse_qkv=cfg.model.fuse_qkv)
        setups.append(NetworkSetup(name, is_trained, report, channels_last, ckpt, notes=notes))
    return setups


def maybe_compile(setup: NetworkSetup | None, module: nn.Module, *, backend: str = "inductor") -> nn.Module:
    """``torch.compile(module)`` unless the network is differentiated with ``torch.func.jvp`` (recorded in notes)."""
    if setup is not None and setup.uses_jvp:
        setup.notes.append("train.compile: not compiled (its recipe differentiates it with torch.func.jvp through the "
                           "JVP attention path, which torch.compile does not trace)")
        return module
    compiled = torch.compile(module, backend=backend)
    if setup is not None:
        setup.compiled = True
    return compiled


def summary_lines(setups: list[NetworkSetup]) -> list[str]:
    """One line per network (what the run logs at start), then one per warning or note."""
    lines = []
    for s in setups:
        extra = [k for k, on in (("channels_last", s.channels_last), ("gradient checkpointing",
                                                                     s.gradient_checkpointing),
                                 ("compiled", s.compiled)) if on]
        lines.append(f"{s.name}: {s.attention.summary_line()}" + (f" [{', '.join(extra)}]" if extra else ""))
        lines.extend(f"{s.name}: note: {n}" for n in s.attention.notes)
    return lines


def warnings_of(setups: list[NetworkSetup]) -> list[str]:
    return [f"{s.name}: {w}" for s in setups for w in (*s.attention.warnings, *s.notes)]


def write_attention_report(setups: list[NetworkSetup], run_dir: str | Path) -> Path:
    """``<run_dir>/attention_backends.json``: per network, what every attention layer really runs."""
    path = Path(run_dir) / ATTENTION_REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({s.name: s.to_dict() for s in setups}, indent=2) + "\n")
    return path


def autocast_warning(mixed_precision: str, device: torch.device) -> str | None:
    """A warning when autocast would run on a CPU (bf16/fp16 autocast there is several times slower than fp32)."""
    if mixed_precision != "no" and torch.device(device).type == "cpu":
        return (f"train.mixed_precision={mixed_precision} on a CPU autocasts matmuls and convolutions to "
                f"{mixed_precision}, which is several times slower there than float32; use train.mixed_precision=no "
                f"on CPU (mixed precision pays off on GPUs)")
    return None
