"""One real training update, run by the training loop's own code: ``training.loop._Trainer._update``.

:class:`StepHarness` sets the loop up exactly as ``stepdistill train`` does (accelerate, optimizers, schedulers,
NaN guard, evaluation EMA when ``train.ema_decay > 0``) in a throw-away run directory, without trackers, and then
calls ``_update`` -- forward(s), backward(s), gradient clipping, optimizer step(s), the recipe's target-EMA updates
and the evaluation-EMA update -- for one update at a time. Two things differ from a training run, on purpose:

* batches are fetched from the run's data iterator *before* timing (a real run overlaps data loading with compute
  in DataLoader workers; the update time here is compute only);
* the loop's step counter is pinned to ``at_step`` before every update, so every timed update is the same kind of
  update (DMD2's 5:1 schedule, progressive distillation's rounds and guidance distillation's stages are functions
  of the step).
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path

import torch

from ...config import RunConfig
from ...recipes.base import Recipe
from ...training.loop import _Trainer

__all__ = ["StepHarness"]


class StepHarness:
    """The training loop's update, callable one update at a time (see module doc)."""

    def __init__(self, cfg: RunConfig, recipe: Recipe, data_factory, *, at_step: int = 0, prefetch: int = 8):
        self._tmp = tempfile.TemporaryDirectory(prefix="stepdistill-speed-")
        cfg.run.output_dir = str(Path(self._tmp.name) / "run")
        cfg.run.resume = "never"
        cfg.train.trackers = []
        cfg.train.sample_every = 0
        self.cfg, self.recipe, self.at_step = cfg, recipe, at_step
        self.trainer = _Trainer(cfg, recipe, data_factory)
        self.trainer._setup()
        source = iter(self.trainer._open_data())
        n = max(1, prefetch) * cfg.train.gradient_accumulation_steps
        self.batches = [next(source) for _ in range(n)]
        self._data = itertools.cycle(self.batches)
        self.stepped: list[str] = []

    @property
    def accelerator(self):
        return self.trainer.accelerator

    @property
    def device(self) -> torch.device:
        return self.trainer.accelerator.device

    @property
    def optimizers(self) -> dict:
        return self.trainer.optimizers

    def update(self) -> None:
        """One optimizer update as the loop runs it (at the pinned step)."""
        self.trainer.state.step = self.at_step
        self.trainer._update(self._data)

    def update_recording_optimizers(self) -> list[str]:
        """:meth:`update`, returning the names of the optimizers that really stepped."""
        trainer, stepped = self.trainer, []
        original = trainer._apply

        def apply(name):
            ok = original(name)
            if ok:
                stepped.append(name)
            return ok

        trainer._apply = apply
        try:
            self.update()
        finally:
            del trainer._apply
        self.stepped = stepped
        return stepped

    def optimizer_step(self, name: str):
        """A callable running optimizer ``name``'s step alone (gradients are set to zeros outside the timing)."""
        opt, params = self.trainer.optimizers[name], self.trainer.params[name]

        def prepare():
            for p in params:
                p.grad = torch.zeros_like(p)

        def step():
            opt.step()

        def cleanup():
            opt.zero_grad(set_to_none=True)

        return prepare, step, cleanup

    def not_counted(self) -> dict[str, callable]:
        """Work of the update outside the networks and optimizers, runnable alone: the recipe's target-EMA update
        after each stepped optimizer, and the evaluation EMA (reported, not part of the sum)."""
        out = {}
        for name in self.stepped:
            out[f"recipe.after_optimizer_step({name})"] = lambda name=name: self.recipe.after_optimizer_step(
                name, self.at_step)
        ema = self.trainer.ema
        if ema is not None:
            out["evaluation EMA update"] = lambda: ema.update(list(ema.names))
        return out

    def close(self) -> None:
        self.trainer.accelerator.end_training()
        self._tmp.cleanup()
