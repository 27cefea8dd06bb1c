"""Skip updates whose loss or gradient norm is not finite, and stop a run that keeps producing them.

Per optimizer: every micro-batch loss is folded into a device-side flag (``flag |= ~isfinite(loss)``, no host
sync). At the synced micro-batch the flag and the gradient norm are combined and read once
(:meth:`NonFiniteGuard.should_skip`, the single host sync per optimizer update: skipping an optimizer step for
real, Adam moments and step count included, needs the decision on the host, as ``torch.amp.GradScaler`` does).
A skipped update zeroes the gradients and does not step the optimizer or the scheduler. After
``max_consecutive`` skipped updates of one optimizer in a row, :meth:`record` raises :class:`NonFiniteLossError`.

Under fp16 autocast, overflowing *gradients* with a finite loss are normal while the GradScaler calibrates its
scale; the scaler skips those steps itself, so only a non-finite loss counts there (``grads_checked_by_scaler``).
"""

from __future__ import annotations

from pathlib import Path

import torch

__all__ = ["NonFiniteGuard", "NonFiniteLossError", "stop_message"]


class NonFiniteLossError(RuntimeError):
    """Training produced non-finite losses or gradients too many updates in a row."""


def stop_message(name: str, count: int, step: int, lr: float, checkpoint: Path | None) -> str:
    """The error a stopped run shows: what happened, where the last good state is, how to go on."""
    if checkpoint is not None:
        where = (f"The last checkpoint is intact at {checkpoint}. Resume from it with a lower learning rate by "
                 f"rerunning the same command with run.resume=auto (or run.resume={checkpoint}) and "
                 f"train.lr={lr / 10:g} (currently {lr:g}).")
    else:
        where = (f"No checkpoint was written yet. Restart with a lower learning rate, e.g. train.lr={lr / 10:g} "
                 f"(currently {lr:g}).")
    return (f"stopping at step {step}: {count} consecutive updates of optimizer {name!r} had a non-finite loss or "
            f"gradient norm (NaN/Inf), so they were skipped and the weights were not changed. {where} Other causes "
            f"worth checking: train.mixed_precision=fp16 overflow (try bf16), train.grad_clip, bad input data.")


class NonFiniteGuard:
    """Tracks non-finite losses/grad norms per optimizer and counts consecutive skipped updates."""

    def __init__(self, max_consecutive: int):
        if max_consecutive < 1:
            raise ValueError(f"max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = int(max_consecutive)
        self._bad: dict[str, torch.Tensor] = {}
        self.consecutive: dict[str, int] = {}
        self.total_skipped: dict[str, int] = {}

    def observe_loss(self, name: str, loss: torch.Tensor) -> None:
        """Fold one micro-batch loss into the pending flag of optimizer ``name`` (device op, no sync)."""
        bad = ~torch.isfinite(loss.detach())
        self._bad[name] = bad if name not in self._bad else self._bad[name] | bad

    def should_skip(self, name: str, grad_norm: torch.Tensor, *, grads_checked_by_scaler: bool = False,
                    reduce=None) -> bool:
        """Whether the update of ``name`` must be skipped; clears the pending flag. One host sync.

        ``reduce``: optional callable combining the flag across processes (so every rank decides alike).
        """
        bad = self._bad.pop(name, torch.zeros((), dtype=torch.bool, device=grad_norm.device))
        if not grads_checked_by_scaler:
            bad = bad | ~torch.isfinite(grad_norm)
        if reduce is not None:
            bad = reduce(bad.to(torch.float32)) > 0
        return bool(bad)

    def discard_pending(self) -> None:
        """Forget the loss flags of an update that is being abandoned (rollback)."""
        self._bad.clear()

    def record(self, name: str, skipped: bool) -> bool:
        """Count the outcome of one update; True when ``name`` reached ``max_consecutive`` skips in a row."""
        if skipped:
            self.consecutive[name] = self.consecutive.get(name, 0) + 1
            self.total_skipped[name] = self.total_skipped.get(name, 0) + 1
        else:
            self.consecutive[name] = 0
        return self.consecutive[name] >= self.max_consecutive

    def state_dict(self) -> dict:
        return {"consecutive": dict(self.consecutive), "total_skipped": dict(self.total_skipped)}

    def load_state_dict(self, state: dict) -> None:
        self.consecutive = {k: int(v) for k, v in state.get("consecutive", {}).items()}
        self.total_skipped = {k: int(v) for k, v in state.get("total_skipped", {}).items()}
