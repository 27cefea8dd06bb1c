"""The recipe protocol the training loop drives, and the recipe registry.

A recipe owns its networks (student, targets, fake scores, discriminators) and its losses; it knows nothing about
accelerate, logging or files (DESIGN.md layer 3). ``stepdistill.runner.build_recipe`` constructs a registered recipe
as ``cls(teacher_bundle, cfg.recipe.options, device)``. The loop (``stepdistill.training.loop.train``) uses only this:

1. ``trainable_modules()`` -> ``{"student": net, ...}``; the loop ``accelerator.prepare``s each and hands the result
   back with ``set_prepared(name, prepared)``. Train with the prepared module (DDP syncs grads through it); read and
   write weights on the bare one (``unwrap(prepared)``).
2. ``optimizer_params()`` -> ``{optimizer name: params or param-group dicts}``; one AdamW per name, built from
   ``train.*`` (a group dict may set its own ``lr``, ``betas``, ``weight_decay``).
3. ``training_step(batch, step, generator)`` -> :class:`StepOutput`. ``losses`` maps optimizer names to scalar
   losses; the loop back-propagates each into *its own optimizer's parameters only* (``backward(inputs=...)``),
   clips, steps, in dict order. A step may return a subset of the optimizers (DMD2's 5:1 schedule), decided by
   ``step`` alone, so every micro-batch of one update returns the same set. ``generator`` is a CPU
   ``torch.Generator`` seeded from (run.seed, rank, micro-batch index): draw all noise and timesteps from it.
   ``frozen_modules()`` -> ``{"teacher": backbone}`` by default: frozen networks that get the run's attention
   backend too; ``set_frozen(name, module)`` takes a compiled replacement (``train.compile``).
4. ``after_optimizer_step(name, step)`` after each real update of optimizer ``name`` (target EMAs, e.g. LCM's).
5. ``state_dict_for_checkpoint()`` / ``load_state_dict_from_checkpoint(state)``: every piece of trainable state,
   target EMAs included, as ``{group: {key: tensor}}`` (group names must not contain '.').
6. ``sample(num, generator, **kw)`` -> images in [-1, 1] ``(N, C, H, W)`` (or points ``(N, 2)`` for 2-D toys), under
   ``torch.no_grad`` with the evaluation-EMA weights swapped into the modules named by ``ema_modules()``.
"""

from __future__ import annotations

import abc
import difflib
import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..config import register_recipe_options
from ..models.backbones import unwrap

__all__ = ["NoOptions", "RECIPES", "Recipe", "StepOutput", "available_recipes", "get_recipe_class", "register_recipe",
           "unwrap"]


@dataclass
class StepOutput:
    """What one ``training_step`` returns.

    ``losses``: optimizer name -> scalar loss to back-propagate and step, in this order.
    ``logs``: detached scalars (tensors or floats); the loop averages them over ``train.log_every`` updates and
    only calls ``.item()`` at log steps.
    """

    losses: dict[str, torch.Tensor]
    logs: dict[str, Any] = field(default_factory=dict)


@dataclass
class NoOptions:
    """Options of a recipe that declares none (any ``recipe.*`` key other than ``name`` is an error)."""


class Recipe(abc.ABC):
    """Base class of every distillation recipe; see the module docstring for the contract with the loop."""

    name: str = "abstract"
    options_class: type | None = None
    """The dataclass of this recipe's ``recipe.*`` options (registered with the config validator)."""

    @abc.abstractmethod
    def trainable_modules(self) -> dict[str, nn.Module]:
        """The networks this recipe trains, by name (e.g. ``{"student": g, "fake_score": f}``)."""

    def optimizer_params(self) -> dict[str, list]:
        """Optimizer name -> params (or param-group dicts). Default: one optimizer per trainable module, over its
        parameters that require grad."""
        return {name: [p for p in m.parameters() if p.requires_grad] for name, m in self.trainable_modules().items()}

    @abc.abstractmethod
    def set_prepared(self, name: str, module: nn.Module) -> None:
        """Receive ``accelerator.prepare(trainable_modules()[name])``; use it for training forwards."""

    def frozen_modules(self) -> dict[str, nn.Module]:
        """Frozen networks the recipe runs, by name: the teacher backbone by default. The loop applies the run's
        ``model.*`` attention settings (and ``train.compile``) to them as well as to :meth:`trainable_modules`."""
        net = getattr(getattr(getattr(self, "teacher", None), "denoiser", None), "backbone", None)
        return {"teacher": net} if isinstance(net, nn.Module) else {}

    def set_frozen(self, name: str, module: nn.Module) -> None:
        """Receive a replacement (e.g. ``torch.compile``d) of ``frozen_modules()[name]`` for its forwards."""
        if name != "teacher":
            raise NotImplementedError(f"recipe {self.name!r} does not take a replacement for frozen module {name!r}")
        self.teacher.denoiser.backbone = module

    def ema_modules(self) -> list[str]:
        """Trainable modules that get an evaluation EMA (``train.ema_decay > 0``): the student when there is one."""
        names = list(self.trainable_modules())
        return ["student"] if "student" in names else names

    @abc.abstractmethod
    def training_step(self, batch: Any, step: int, generator: torch.Generator) -> StepOutput:
        """Losses of one micro-batch. ``step``: updates completed so far; ``generator``: seeded CPU generator."""

    def after_optimizer_step(self, name: str, step: int) -> None:
        """Called after each real (finite, synced) update of optimizer ``name``; ``step`` as in training_step."""
        return None

    @abc.abstractmethod
    def state_dict_for_checkpoint(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every trainable state (weights, target EMAs) as ``{group: {key: tensor}}`` of bare (unwrapped) modules."""

    @abc.abstractmethod
    def load_state_dict_from_checkpoint(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Inverse of :meth:`state_dict_for_checkpoint` (load in place)."""

    def default_conditions(self, num: int):
        """``num`` sampling conditions, cycled from ``recipe.sample_conditions`` or, when none were configured, from the
        first training batch (:meth:`remember_conditions`). Class labels come back as a tensor, prompts as a list."""
        conds = getattr(self, "_sample_conditions", None)
        if not conds:
            raise ValueError("no sample conditions: set recipe.sample_conditions (prompts or class labels)")
        conds = (list(conds) * num)[:num]
        return torch.tensor(conds) if isinstance(conds[0], int) else conds

    def remember_conditions(self, batch) -> None:
        """Keep the first training batch's conditions as the default sampling conditions if none were configured."""
        if getattr(self, "_sample_conditions", None) or not isinstance(batch, dict) or batch.get("conditions") is None:
            return
        c = batch["conditions"]
        self._sample_conditions = c.tolist() if torch.is_tensor(c) else list(c)

    def sample(self, num: int, generator: torch.Generator, **kw) -> torch.Tensor:
        """``num`` student samples in [-1, 1]: ``(N, C, H, W)`` images or ``(N, 2)`` points."""
        raise NotImplementedError(f"recipe {self.name!r} does not sample")

    def export(self, out_dir) -> Any:
        """Write the student as a stock Diffusers folder."""
        raise NotImplementedError(f"recipe {self.name!r} has no Diffusers export")


RECIPES: dict[str, type[Recipe]] = {}


def register_recipe(name: str) -> Callable[[type[Recipe]], type[Recipe]]:
    """Class decorator: register ``cls`` as recipe ``name`` (and its ``options_class`` with the config validator)."""

    def deco(cls: type[Recipe]) -> type[Recipe]:
        if not (isinstance(cls, type) and issubclass(cls, Recipe)):
            raise TypeError(f"@register_recipe({name!r}) must decorate a Recipe subclass, got {cls!r}")
        RECIPES[name] = cls
        cls.name = name
        register_recipe_options(name, cls.options_class or NoOptions)
        return cls

    return deco


def available_recipes() -> list[str]:
    """Names of the registered recipes (after importing the ``stepdistill.recipes`` package)."""
    importlib.import_module("stepdistill.recipes")
    return sorted(RECIPES)


def get_recipe_class(name: str) -> type[Recipe]:
    """The recipe class registered as ``name``, importing ``stepdistill.recipes.<name>`` if needed."""
    for module in (f"stepdistill.recipes.{name}", "stepdistill.recipes"):
        if name in RECIPES:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise
    if name not in RECIPES:
        close = difflib.get_close_matches(name, RECIPES, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "."
        raise ValueError(f"unknown recipe {name!r}{hint} Available: {', '.join(sorted(RECIPES)) or 'none'}")
    return RECIPES[name]

