"""The shared training loop (layer 4): accelerate, EMA, checkpoints with exact resume, NaN guard, sample grids."""

from .checkpoint import CheckpointError, latest_checkpoint, load_safetensors, read_checkpoint, resolve_checkpoint
from .data import (
    DataIterFactory,
    DataStart,
    StepIndexedBatchSampler,
    build_data_factory,
    register_data_kind,
    seed_everything,
    step_generator,
    step_indexed,
)
from .ema import EMA
from .loop import TrainerState, train
from .nan_guard import NonFiniteGuard, NonFiniteLossError

__all__ = [
    "EMA",
    "CheckpointError",
    "DataIterFactory",
    "DataStart",
    "NonFiniteGuard",
    "NonFiniteLossError",
    "StepIndexedBatchSampler",
    "TrainerState",
    "build_data_factory",
    "latest_checkpoint",
    "load_safetensors",
    "read_checkpoint",
    "register_data_kind",
    "resolve_checkpoint",
    "seed_everything",
    "step_generator",
    "step_indexed",
    "train",
]
