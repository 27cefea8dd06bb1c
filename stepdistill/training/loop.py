"""The one accelerate-based training loop shared by every recipe: ``train(cfg, recipe, data_iter_factory)``.

One update (``step`` -> ``step + 1``) is ``train.gradient_accumulation_steps`` micro-batches. For each micro-batch
``k`` (counted per process, ``batch_index``)::

    batch = next(data)                                  # micro-batch k, from (seed, rank, k): see training/data.py
    out = recipe.training_step(batch, step, generator)  # generator: CPU, seeded from (seed, "noise", rank, k)
    for name, loss in out.losses.items():               # in order
        accelerator.backward(loss, inputs=params[name]) # grads land only in optimizer `name`'s parameters
        if synced micro-batch:
            unscale (fp16), grad norm, clip to train.grad_clip
            non-finite loss/grad norm?  -> skip: zero grads, no optimizer step (NaN guard)
            else optimizer.step(), recipe.after_optimizer_step(name, step)
            optimizer.zero_grad(set_to_none=True)
    after the synced micro-batch: evaluation-EMA update of the modules whose optimizer stepped;
    every lr scheduler steps once (lr is a function of the loop step, also for an optimizer that DMD2's 5:1
    schedule or the NaN guard left out of this update); step += 1

Back-propagating each loss with ``inputs=`` its own parameters (rather than zeroing every module after each
optimizer step) keeps a later loss from ever seeing an earlier loss's gradients *and* keeps accumulation exact:
optimizer B's gradients accumulated over earlier micro-batches are not wiped by optimizer A's step.

Then logging (every ``log_every``; the only ``.item()`` calls: one batched transfer of window averages), sample
grids (every ``sample_every``, fixed seed, EMA weights), checkpoints (every ``checkpoint_every`` and at the end).
Host syncs per update besides logging: one per optimizer for the NaN guard (skipping a real optimizer step needs
the decision on the host); under fp16 the GradScaler adds its own.

Exact resume: a checkpoint holds weights, EMA, optimizer, scheduler and GradScaler state, the step and micro-batch
counters and every process's RNG states; data and noise are functions of the micro-batch index. Killing a run
after a checkpoint and resuming gives bitwise the same weights as an uninterrupted run (tests/test_training_loop.py).

Multi-process (``accelerate launch --num_processes N``, see docs/distributed.md): data and noise of process r's
micro-batch k come from the run-wide slot ``k * N + r`` (training/data.py), so N processes with accumulation A give
the same updates as one process with accumulation ``A * N`` (same global batch; tests/test_distributed.py); DDP
averages gradients through the prepared modules, guard decisions are reduced across ranks, checkpoints are
assembled by all ranks (RNG files) and finalised by the main process. DeepSpeed runs one model per engine, so
recipes with more than one trained network are refused there with a message. FSDP/DeepSpeed configs ship in
recipes/accelerate/ but need GPUs and are not exercised by the CPU test suite (docs/distributed.md).

Non-finite handling (``train.on_nan``): after ``train.max_consecutive_nonfinite`` skipped updates in a row the run
stops with a message ("stop") or reloads the last checkpoint, multiplies every learning rate by
``train.rollback_lr_factor`` and goes on ("rollback", at most ``train.max_rollbacks`` times). The lr scale is part of
the checkpoints (scheduler base lrs), and a changed ``train.lr`` on resume is applied (scaled) to them.

Checkpoint writes that fail because the disk is full remove the partial checkpoint and stop with a message saying
which checkpoint is intact and how to go on; ``STEPDISTILL_FAULT`` (checkpoint.fault_point) lets tests SIGKILL the
process at named points (inside a checkpoint write, during a step).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import (
    DistributedDataParallelKwargs,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
)
from tqdm.auto import tqdm

from ..config import RunConfig, flatten_config, save_config
from ..models.backbones import unwrap
from ..models.student import disable_label_dropout
from ..recipes.base import Recipe, StepOutput
from .checkpoint import (
    CHECKPOINTS_DIR,
    CheckpointError,
    LoadedCheckpoint,
    begin_checkpoint,
    capture_rng_state,
    checkpoint_name,
    disk_full_message,
    fault_point,
    finalize_checkpoint,
    flatten_recipe_state,
    flatten_state,
    is_disk_full,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint,
    recipe_state_groups,
    resolve_checkpoint,
    restore_rng_state,
    temp_checkpoint_dir,
    unflatten_state,
    write_json,
    write_tensors,
)
from .data import (
    STREAMS,
    DataIterFactory,
    DataStart,
    StepIndexedBatchSampler,
    derive_seed,
    global_batch_index,
    move_to_device,
    seed_everything,
    step_generator,
)
from .ema import EMA
from .nan_guard import NonFiniteGuard, NonFiniteLossError, stop_message
from .speed import autocast_warning, maybe_compile, prepare_networks, summary_lines, warnings_of, write_attention_report

__all__ = ["TrainerState", "process_state", "resolve_resume", "save_sample_grid", "train"]

_SCHEDULES = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}


@dataclass
class TrainerState:
    """Loop counters stored in ``trainer.json``: updates done, and micro-batches consumed by each process."""

    step: int = 0
    batch_index: int = 0


def _launched_world_size() -> int:
    for key in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        with contextlib.suppress(ValueError):
            if int(os.environ.get(key, "1")) > 1:
                return int(os.environ[key])
    return 1


def _has_accelerator_device() -> bool:
    from accelerate.utils import is_mps_available, is_npu_available, is_xpu_available

    return torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available()


def process_state():
    """accelerate's ``PartialState``, created on the CPU when ``ACCELERATE_USE_CPU`` is set or when this process is
    one of several launched (``WORLD_SIZE > 1``) on a machine without GPUs -- accelerate would otherwise start every
    process as an independent single-process run (gloo needs ``cpu=True``). Call it before anything else touches
    ``PartialState`` (``runner.default_device`` does)."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (_launched_world_size() > 1 and not _has_accelerator_device())
    return PartialState(cpu=cpu)


def train(cfg: RunConfig, recipe: Recipe, data_iter_factory: DataIterFactory) -> Path:
    """Train ``recipe`` as configured by ``cfg``; return the run dir (``cfg.run.output_dir``).

    ``data_iter_factory(DataStart(batch_index, seed, rank, num_processes))`` must return an iterable whose first
    batch is micro-batch ``batch_index`` (see :mod:`stepdistill.training.data`). With ``run.resume=auto`` an
    existing run dir continues from its newest valid checkpoint.
    """
    return _Trainer(cfg, recipe, data_iter_factory).run()


def resolve_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint this run starts from per ``run.resume`` (None = fresh start)."""
    run_dir, mode = cfg.run_dir, cfg.run.resume
    if mode == "never":
        existing = list_checkpoints(run_dir / CHECKPOINTS_DIR)
        if existing:
            raise RuntimeError(f"run.resume=never, but {run_dir} already has checkpoints (newest {existing[-1].name}); "
                               f"use run.resume=auto to continue that run, or choose a new run.output_dir")
        return None
    if mode == "auto":
        return latest_checkpoint(run_dir)
    return resolve_checkpoint(mode)


def save_sample_grid(samples: torch.Tensor, path: Path) -> None:
    """Images ``(N, C, H, W)`` in [-1, 1] -> PNG grid; points ``(N, 2)`` -> scatter PNG."""
    samples = samples.detach().float().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    if samples.ndim == 2 and samples.shape[1] == 2:
        from matplotlib.figure import Figure

        fig = Figure(figsize=(4, 4), dpi=100)
        ax = fig.add_subplot()
        ax.scatter(samples[:, 0].numpy(), samples[:, 1].numpy(), s=2, alpha=0.5)
        ax.set_aspect("equal")
        ax.set_title(path.stem)
        fig.savefig(path)
        return
    if samples.ndim != 4 or samples.shape[1] not in (1, 3):
        raise ValueError(f"recipe.sample returned shape {tuple(samples.shape)}; expected (N, 1|3, H, W) images in "
                         f"[-1, 1] or (N, 2) points")
    from torchvision.utils import save_image

    save_image((samples.clamp(-1, 1) + 1) / 2, str(path), nrow=math.ceil(math.sqrt(samples.shape[0])))


def _trackers(names: list[str]) -> list[str]:
    out: list[str] = []
    for name in names:
        if name == "auto":
            if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
                name = "tensorboard"
            else:
                continue
        if name not in out:
            out.append(name)
    return out


class _Window:
    """Running sums of logged scalars between log steps, kept on device (no host sync until :meth:`flush`)."""

    def __init__(self):
        self.sums: dict[str, Any] = {}
        self.counts: dict[str, int] = {}

    def add(self, key: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            if value.numel() != 1:
                raise ValueError(f"logged value {key!r} must be a scalar, got shape {tuple(value.shape)}")
            value = value.detach().float().reshape(())
        self.sums[key] = self.sums[key] + value if key in self.sums else value
        self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self) -> dict[str, float]:
        keys = list(self.sums)
        tensor_keys = [k for k in keys if isinstance(self.sums[k], torch.Tensor)]
        values = dict(zip(tensor_keys, torch.stack([self.sums[k].cpu() for k in tensor_keys]).tolist())) \
            if tensor_keys else {}
        out = {k: float(values.get(k, self.sums[k])) / self.counts[k] for k in keys}
        self.sums, self.counts = {}, {}
        return out


class _RollbackRequest(Exception):
    """Raised inside an update when the NaN guard asks for a rollback (``train.on_nan=rollback``)."""

    def __init__(self, name: str, count: int):
        super().__init__(name, count)
        self.name, self.count = name, count


class _Trainer:
    def __init__(self, cfg: RunConfig, recipe: Recipe, data_iter_factory: DataIterFactory):
        self.cfg, self.recipe, self.data_iter_factory = cfg, recipe, data_iter_factory
        self.tc = cfg.train
        self.run_dir = cfg.run_dir
        self.state = TrainerState()
        self.window = _Window()
        self.guard = NonFiniteGuard(self.tc.max_consecutive_nonfinite)
        self.last_checkpoint: Path | None = None
        self.sampling_enabled = self.tc.sample_every > 0
        self.lr_scale = 1.0  # product of the rollback factors applied so far (train.on_nan=rollback)
        self.rollbacks = 0
        self._state_checked = False

    # ------------------------------------------------------------------------------------------------ setup
    def _setup(self) -> None:
        tc = self.tc
        self.trackers = _trackers(tc.trackers)
        process_state()
        self.accelerator = acc = Accelerator(
            mixed_precision=tc.mixed_precision,
            gradient_accumulation_plugin=GradientAccumulationPlugin(
                num_steps=tc.gradient_accumulation_steps, sync_with_dataloader=False),
            project_config=ProjectConfiguration(project_dir=str(self.run_dir), logging_dir=str(self.run_dir / "logs")),
            log_with=self.trackers or None,
            step_scheduler_with_optimizer=False,
            kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=tc.ddp_find_unused_parameters)],
        )
        self.rank, self.is_main = acc.process_index, acc.is_main_process
        launched = _launched_world_size()
        if launched > 1 and acc.num_processes == 1:
            raise RuntimeError(
                f"this process was launched as one of {launched} (WORLD_SIZE={launched}) but accelerate set up "
                f"{acc.num_processes} process(es), so every process would train alone and overwrite the same run dir. "
                f"On a machine without GPUs set ACCELERATE_USE_CPU=1, or launch with "
                f"`accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes {launched} ...` "
                f"(see docs/distributed.md)")
        self._check_distributed_support()
        if acc.num_processes > 1 and self.is_main:
            print(f"[stepdistill] distributed: {acc.distributed_type.value} over {acc.num_processes} processes",
                  flush=True)
        if torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = tc.allow_tf32
            torch.backends.cudnn.allow_tf32 = tc.allow_tf32

        resume = [str(resolve_resume(self.cfg) or "") if self.is_main else None]
        if acc.num_processes > 1:
            broadcast_object_list(resume)
        self.resume_from = Path(resume[0]) if resume[0] else None
        self._refuse_a_different_run()  # every rank reads the same file: all raise together, none waits alone
        if self.is_main:
            self._write_config()
        seed_everything(self.cfg.run.seed, self.rank)

        modules = self.recipe.trainable_modules()
        if not modules:
            raise ValueError(f"recipe {self.recipe.name!r} returned no trainable modules")
        for name in modules:
            if "." in name or "/" in name:
                raise ValueError(f"trainable module name {name!r} must not contain '.' or '/'")
        self._setup_networks(modules)
        self.module_names = list(modules)
        optimizers, schedulers = self._build_optimizers(self.recipe.optimizer_params())
        self.opt_names = list(optimizers)
        prepared = acc.prepare(*modules.values(), *optimizers.values(), *schedulers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        n, m = len(modules), len(optimizers)
        self.modules = dict(zip(self.module_names, prepared[:n]))
        self.optimizers = dict(zip(self.opt_names, prepared[n:n + m]))
        self.schedulers = dict(zip(self.opt_names, prepared[n + m:]))
        setups = {s.name: s for s in self.network_setups}
        for name, module in self.modules.items():
            disable_label_dropout(module)  # train mode must not make the backbone drop class labels on its own
            module.train()
            self.recipe.set_prepared(name, maybe_compile(setups.get(name), module) if tc.compile else module)
        if tc.compile:
            for name, module in self.recipe.frozen_modules().items():
                if name in setups and not setups[name].trainable:
                    self.recipe.set_frozen(name, maybe_compile(setups[name], module))
        self._log_networks()
        self.params = {name: [p for g in opt.param_groups for p in g["params"]]
                       for name, opt in self.optimizers.items()}
        owner = {id(p): mod for mod in self.module_names for p in unwrap(self.modules[mod]).parameters()}
        self.modules_of = {name: {owner[id(p)] for p in ps if id(p) in owner} for name, ps in self.params.items()}

        self.ema = None
        if tc.ema_decay > 0:
            ema_names = self.recipe.ema_modules()
            unknown = set(ema_names) - set(self.modules)
            if unknown:
                raise ValueError(f"recipe.ema_modules() names {sorted(unknown)}, not trainable modules "
                                 f"{self.module_names}")
            self.ema = EMA({k: self.modules[k] for k in ema_names}, tc.ema_decay)

        if self.resume_from is not None:
            self._load(read_checkpoint(self.resume_from, verify=False))
        if self.trackers:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in flatten_config(self.cfg).items()}
            acc.init_trackers(self.cfg.run.name, config=hparams)

    def _setup_networks(self, modules: dict) -> None:
        """Attention backend, QKV fusion, channels_last and gradient checkpointing of every network (training/speed.py)."""
        message = autocast_warning(self.tc.mixed_precision, self.accelerator.device)
        if message:
            warnings.warn(message, stacklevel=3)
        self.network_setups = prepare_networks(self.cfg, self.recipe, modules, self.accelerator.device)

    def _log_networks(self) -> None:
        """Log what every attention layer really runs (summary) and write the per-layer report to the run dir."""
        for line in warnings_of(self.network_setups):
            warnings.warn(line, stacklevel=3)
        if self.is_main:
            write_attention_report(self.network_setups, self.run_dir)
            for line in summary_lines(self.network_setups):
                print(f"[stepdistill] {line}", flush=True)

    def _check_distributed_support(self) -> None:
        from accelerate.utils import DistributedType

        kind = self.accelerator.distributed_type
        modules = self.recipe.trainable_modules()
        if kind == DistributedType.DEEPSPEED and len(modules) > 1:
            raise RuntimeError(
                f"recipe {self.recipe.name!r} trains {len(modules)} networks ({', '.join(modules)}), but DeepSpeed "
                f"wraps exactly one model per engine (one optimizer, one backward); use the DDP or FSDP accelerate "
                f"config (recipes/accelerate/ddp.yaml or fsdp.yaml) for this recipe -- see docs/distributed.md")
        if kind == DistributedType.DEEPSPEED and self.tc.gradient_accumulation_steps > 1:
            raise RuntimeError("under DeepSpeed set gradient_accumulation_steps in the DeepSpeed config, not "
                               "train.gradient_accumulation_steps (the engine accumulates itself)")

    def _config_changes(self) -> dict[str, tuple]:
        """``{key: (old, new)}`` for every key whose value differs between the run folder's config.yaml and this
        config (resumed runs only; ``run.resume`` itself is left out)."""
        path = self.run_dir / "config.yaml"
        if self.resume_from is None or not path.is_file():
            return {}
        with contextlib.suppress(yaml.YAMLError, AttributeError):
            old = {f"{section}.{k}": v for section, values in yaml.safe_load(path.read_text()).items()
                   for k, v in values.items()}
            new = flatten_config(self.cfg)
            return {k: (old.get(k), new.get(k)) for k in sorted(old.keys() | new.keys())
                    if old.get(k) != new.get(k) and k != "run.resume"}
        return {}

    def _refuse_a_different_run(self) -> None:
        """Resuming continues the checkpointed run, so a changed ``recipe.*`` or ``teacher.*`` key (what is trained,
        and from what; ``recipe.sample_*`` only shapes the preview grids) would silently mix two runs: refuse it."""
        self.config_changes = self._config_changes()  # read once; _write_config reports the same changes
        changed = [k for k in self.config_changes
                   if k.startswith(("recipe.", "teacher.")) and not k.startswith("recipe.sample_")]
        if changed:
            raise ValueError(
                f"{self.run_dir} holds a checkpointed run whose {', '.join(changed)} differ from this config; resuming "
                f"would continue that run with the new settings mixed in. Use a new run.output_dir (or move "
                f"{self.run_dir} away) to start this one; train.* changes such as max_steps may resume.")

    def _write_config(self) -> None:
        if self.config_changes:  # say what changed since the run started
            warnings.warn(f"resuming {self.run_dir} with a changed config: "
                          + ", ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in self.config_changes.items()),
                          stacklevel=2)
        save_config(self.cfg, self.run_dir / "config.yaml")

    def _build_optimizers(self, groups: dict[str, list]):
        from diffusers.optimization import get_scheduler

        tc = self.tc
        if not groups:
            raise ValueError(f"recipe {self.recipe.name!r} returned no optimizer params")
        optimizers, schedulers = {}, {}
        for name, params in groups.items():
            if "." in name or "/" in name:
                raise ValueError(f"optimizer name {name!r} must not contain '.' or '/'")
            params = list(params)
            if not params:
                raise ValueError(f"optimizer {name!r} of recipe {self.recipe.name!r} has no parameters")
            opt = torch.optim.AdamW(params, lr=tc.lr, betas=(tc.adam_beta1, tc.adam_beta2), eps=tc.adam_eps,
                                    weight_decay=tc.weight_decay)
            optimizers[name] = opt
            schedulers[name] = get_scheduler(_SCHEDULES[tc.lr_scheduler], opt, num_warmup_steps=tc.warmup_steps,
                                             num_training_steps=tc.max_steps)
        return optimizers, schedulers

    # ------------------------------------------------------------------------------------------------ run
    def run(self) -> Path:
        self._setup()
        acc, tc = self.accelerator, self.tc
        self.pbar = tqdm(total=tc.max_steps, initial=self.state.step, desc=f"{self.recipe.name}", unit="step",
                         disable=not acc.is_local_main_process, dynamic_ncols=True)
        try:
            data = iter(self._open_data())
            while self.state.step < tc.max_steps:
                fault_point(f"train:{checkpoint_name(self.state.step)}")
                try:
                    self._update(data)
                except _RollbackRequest as req:
                    self._rollback(req)
                    data = iter(self._open_data())
                    continue
                step = self.state.step
                self.pbar.update(1)
                if step % tc.log_every == 0 or step == tc.max_steps:
                    self._log()
                # checkpoint before the sample grid, so that a failing grid never costs a finished checkpoint
                if (tc.checkpoint_every and step % tc.checkpoint_every == 0) or step == tc.max_steps:
                    self._save(step)
                if self.sampling_enabled and step % tc.sample_every == 0:
                    self._sample(step)
        finally:
            self.pbar.close()
            acc.end_training()
        return self.run_dir

    def _open_data(self):
        acc = self.accelerator
        start = DataStart(batch_index=self.state.batch_index, seed=self.cfg.run.seed, rank=self.rank,
                          num_processes=acc.num_processes)
        source = self.data_iter_factory(start)
        if isinstance(source, torch.utils.data.DataLoader) and not isinstance(source.batch_sampler,
                                                                              StepIndexedBatchSampler):
            raise TypeError("data_iter_factory returned a DataLoader whose order cannot be resumed exactly; give it "
                            "batch_sampler=StepIndexedBatchSampler(len(dataset), batch_size, start) (it also shards "
                            "across processes), or build the factory with training.data.step_indexed(sample_fn)")
        return source

    def _update(self, data) -> None:
        acc, recipe = self.accelerator, self.recipe
        pending: set[str] = set()
        stepped: set[str] = set()
        for _ in range(self.tc.gradient_accumulation_steps):
            try:
                batch = next(data)
            except StopIteration:
                raise RuntimeError(f"the data iterator ran out at micro-batch {self.state.batch_index}; "
                                   f"data factories must be infinite (step-indexed)") from None
            batch = move_to_device(batch, acc.device)
            recipe.remember_conditions(batch)  # default sample-grid conditions when recipe.sample_conditions is empty
            slot = global_batch_index(self.state.batch_index, self.rank, acc.num_processes)
            generator = step_generator(self.cfg.run.seed, slot, stream="noise")
            with acc.accumulate(*self.modules.values()):
                with acc.autocast():
                    out = recipe.training_step(batch, self.state.step, generator)
                self._check_output(out)
                for name, loss in out.losses.items():
                    self.guard.observe_loss(name, loss)
                    acc.backward(loss, inputs=self.params[name])
                    fault_point(f"backward:{checkpoint_name(self.state.step)}")
                    self.window.add(f"loss/{name}", loss)
                    if acc.sync_gradients:
                        if self._apply(name):
                            stepped.add(name)
                    else:
                        pending.add(name)
                if acc.sync_gradients and pending - set(out.losses):
                    raise RuntimeError(
                        f"recipe {recipe.name!r} returned losses for {sorted(pending)} on earlier micro-batches of "
                        f"step {self.state.step} but not on the last one ({sorted(out.losses)}); the set of losses "
                        f"must depend on the step only")
            for key, value in out.logs.items():
                self.window.add(key, value)
            self.state.batch_index += 1
        if self.ema is not None and stepped:
            self.ema.update([m for m in self.ema.names if any(m in self.modules_of[o] for o in stepped)])
        for scheduler in self.schedulers.values():  # lr is a function of the loop step, for every optimizer
            scheduler.step()
        self.state.step += 1

    def _check_output(self, out: StepOutput) -> None:
        if not isinstance(out, StepOutput):
            raise TypeError(f"recipe {self.recipe.name!r}.training_step returned {type(out).__name__}, "
                            f"expected StepOutput(losses=..., logs=...)")
        unknown = [k for k in out.losses if k not in self.optimizers]
        if unknown:
            raise KeyError(f"recipe {self.recipe.name!r} returned losses for {unknown}, which are not optimizers "
                           f"({self.opt_names})")
        for name, loss in out.losses.items():
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise ValueError(f"loss {name!r} must be a scalar tensor, got "
                                 f"{tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__}")

    def _apply(self, name: str) -> bool:
        """Clip and step optimizer ``name`` on a synced micro-batch; False when the update did not happen."""
        acc, opt = self.accelerator, self.optimizers[name]
        acc.unscale_gradients(optimizer=opt)  # no-op unless fp16
        grads = [p.grad for p in self.params[name] if p.grad is not None]
        norm = (torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=acc.device)).float()
        if self.tc.grad_clip > 0 and grads:
            torch.nn.utils.clip_grads_with_norm_(self.params[name], self.tc.grad_clip, norm)
        self.window.add(f"grad_norm/{name}", norm)
        reduce = (lambda t: acc.reduce(t, "sum")) if acc.num_processes > 1 else None
        scaler = acc.scaler
        bad = self.guard.should_skip(name, norm, grads_checked_by_scaler=scaler is not None, reduce=reduce)
        if bad and scaler is None:
            opt.zero_grad(set_to_none=True)
            stepped = False
        else:  # under fp16 the GradScaler skips the step itself when the gradients overflowed (and lowers its scale)
            opt.step()
            opt.zero_grad(set_to_none=True)
            stepped = not opt.step_was_skipped
        if self.guard.record(name, bad):
            self._log()
            if self.tc.on_nan == "rollback":
                raise _RollbackRequest(name, self.guard.consecutive[name])
            raise NonFiniteLossError(stop_message(name, self.guard.consecutive[name], self.state.step,
                                                  self.tc.lr * self.lr_scale,
                                                  self.last_checkpoint or latest_checkpoint(self.run_dir)))
        if stepped:
            self.recipe.after_optimizer_step(name, self.state.step)
        return stepped

    # ------------------------------------------------------------------------------------------------ outputs
    def _log(self) -> None:
        values = self.window.flush()
        values.update({f"lr/{n}": float(s.get_last_lr()[0]) for n, s in self.schedulers.items()})
        values.update({f"skipped/{n}": c for n, c in self.guard.total_skipped.items()})
        if self.rollbacks:
            values["rollbacks"] = self.rollbacks
        step = self.state.step
        if self.trackers:
            self.accelerator.log(values, step=step)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")
        losses = {k.split("/", 1)[1]: f"{v:.4g}" for k, v in values.items() if k.startswith("loss/")}
        self.pbar.set_postfix(losses, refresh=False)

    def _sample(self, step: int) -> None:
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.run.seed, STREAMS["sample"]))
        modes = {name: m.training for name, m in self.modules.items()}
        for m in self.modules.values():
            m.eval()
        try:
            with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext(), torch.no_grad():
                samples = self.recipe.sample(self.tc.sample_num, generator)
        except NotImplementedError as exc:
            warnings.warn(f"sample grids disabled: {exc}", stacklevel=2)
            self.sampling_enabled = False
            return
        finally:
            for name, m in self.modules.items():
                m.train(modes[name])
        if self.is_main:
            save_sample_grid(samples, self.run_dir / "samples" / f"{checkpoint_name(step)}.png")

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _save(self, step: int) -> None:
        acc = self.accelerator
        root = self.run_dir / CHECKPOINTS_DIR
        previous = self.last_checkpoint
        tmp = temp_checkpoint_dir(root, step)
        try:
            if self.is_main:
                begin_checkpoint(root, step)
            acc.wait_for_everyone()
            rng_tensors, rng_meta = capture_rng_state()
            write_tensors(tmp, f"rng_rank{self.rank}", rng_tensors)
            write_json(tmp, f"rng_rank{self.rank}", rng_meta)
            acc.wait_for_everyone()
            if self.is_main:
                recipe_state = flatten_recipe_state(self.recipe.state_dict_for_checkpoint())
                self._check_state_complete(recipe_state)
                write_tensors(tmp, "recipe_state", recipe_state)
                if self.ema is not None:
                    write_tensors(tmp, "ema", self.ema.state_dict())
                opt_tensors, opt_meta = flatten_state({
                    "optimizers": {n: o.state_dict() for n, o in self.optimizers.items()},
                    "schedulers": {n: s.state_dict() for n, s in self.schedulers.items()},
                    "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
                })
                write_tensors(tmp, "optimizers", opt_tensors)
                write_json(tmp, "optimizers", opt_meta)
                write_json(tmp, "trainer", {"step": step, "batch_index": self.state.batch_index,
                                            "num_processes": acc.num_processes, "seed": self.cfg.run.seed,
                                            "config_lr": self.tc.lr, "lr_scale": self.lr_scale,
                                            "rollbacks": self.rollbacks, "guard": self.guard.state_dict()})
                finalize_checkpoint(tmp, step)
                fault_point(f"checkpoint-renamed:{checkpoint_name(step)}")
                prune_checkpoints(root, self.tc.keep_checkpoints)
        except Exception as exc:
            if not is_disk_full(exc):
                raise
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(disk_full_message(exc, root, step, previous or latest_checkpoint(self.run_dir),
                                                    self.tc.keep_checkpoints)) from exc
        acc.wait_for_everyone()
        self.last_checkpoint = root / checkpoint_name(step)

    def _check_state_complete(self, recipe_state: dict[str, torch.Tensor]) -> None:
        """Every trainable parameter of every trained module must be in ``recipe_state`` (once per run): a network
        left out of the checkpoints would silently restart from scratch on resume."""
        from accelerate.utils import DistributedType

        if self._state_checked or self.accelerator.distributed_type in (DistributedType.FSDP,
                                                                         DistributedType.DEEPSPEED):
            return
        ptrs = {t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size()
                for t in recipe_state.values() if t.device.type != "meta"}
        by_shape: dict[tuple, list[torch.Tensor]] = {}
        for t in recipe_state.values():
            by_shape.setdefault(tuple(t.shape), []).append(t)
        for name in self.module_names:
            missing = []
            for key, p in unwrap(self.modules[name]).named_parameters():
                if not p.requires_grad:
                    continue
                if p.data_ptr() in ptrs:
                    continue
                same = by_shape.get(tuple(p.shape), [])  # saved as a copy (maybe cast): compare values
                if not any(torch.equal(p.detach().to(device=t.device, dtype=t.dtype), t) for t in same):
                    missing.append(key)
            if missing:
                raise RuntimeError(
                    f"recipe {self.recipe.name!r}: state_dict_for_checkpoint() leaves out {len(missing)} trainable "
                    f"parameter(s) of module {name!r} (e.g. {', '.join(missing[:3])}); every trained network, its "
                    f"EMA targets included, must be in every checkpoint, or a resumed run restarts it silently")
        self._state_checked = True

    def _scale_lr(self, factor: float) -> None:
        """Multiply every learning rate (current and scheduler base) by ``factor``; schedules keep their shape."""
        for name, opt in self.optimizers.items():
            sched = getattr(self.schedulers[name], "scheduler", self.schedulers[name])
            sched.base_lrs = [b * factor for b in sched.base_lrs]
            for group in opt.param_groups:
                group["lr"] = group["lr"] * factor
                if "initial_lr" in group:
                    group["initial_lr"] = group["initial_lr"] * factor
            sched._last_lr = [group["lr"] for group in opt.param_groups]

    def _rollback(self, req: _RollbackRequest) -> None:
        """``train.on_nan=rollback``: reload the last checkpoint and lower every learning rate."""
        ckpt = self.last_checkpoint or latest_checkpoint(self.run_dir)
        lr_now = self.tc.lr * self.lr_scale
        if ckpt is None or self.rollbacks >= self.tc.max_rollbacks:
            why = ("no checkpoint was written yet to roll back to" if ckpt is None else
                   f"the run already rolled back {self.rollbacks} time(s) (train.max_rollbacks="
                   f"{self.tc.max_rollbacks}), lowering the learning rate to {lr_now:g}, and it diverged again")
            raise NonFiniteLossError(f"{stop_message(req.name, req.count, self.state.step, lr_now, ckpt)} "
                                     f"(train.on_nan=rollback gave up: {why})")
        failed_at, rollbacks = self.state.step, self.rollbacks
        totals = dict(self.guard.total_skipped)
        factor = self.tc.rollback_lr_factor
        target_scale = self.lr_scale * factor  # lower the lr that failed, not the checkpoint's
        self.window.flush()
        for opt in self.optimizers.values():  # gradients of the abandoned update must not leak into the next one
            opt.zero_grad(set_to_none=True)
        self.guard.discard_pending()
        self._load(read_checkpoint(ckpt, verify=False))
        self.guard.total_skipped = totals  # skipped updates stay counted across the rollback
        self.guard.consecutive = {}
        self.rollbacks = rollbacks + 1
        self._scale_lr(target_scale / self.lr_scale)
        self.lr_scale = target_scale
        self.pbar.n = self.state.step
        self.pbar.refresh()
        message = (f"step {failed_at}: {req.count} consecutive non-finite updates of optimizer {req.name!r}; rolled "
                   f"back to {ckpt} (step {self.state.step}) and lowered the learning rate by "
                   f"train.rollback_lr_factor={factor:g} to {self.tc.lr * self.lr_scale:g} (rollback {self.rollbacks} "
                   f"of at most train.max_rollbacks={self.tc.max_rollbacks})")
        warnings.warn(message, stacklevel=2)
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": self.state.step, "time": time.time(), "event": "rollback",
                                    "failed_at": failed_at, "lr_scale": self.lr_scale, "message": message}) + "\n")

    def _load(self, ckpt: LoadedCheckpoint) -> None:
        acc = self.accelerator
        trainer = ckpt.json("trainer")
        batch_index = int(trainer["batch_index"])
        if trainer["num_processes"] != acc.num_processes:  # data are indexed by run-wide slot: convert the counter
            slots = batch_index * int(trainer["num_processes"])
            batch_index, rest = divmod(slots, acc.num_processes)
            if rest:
                warnings.warn(f"{ckpt.path} was written by {trainer['num_processes']} process(es) after {slots} "
                              f"micro-batches, not a multiple of this run's {acc.num_processes} processes; the data "
                              f"order after resuming differs slightly from an uninterrupted run", stacklevel=2)
        if trainer["seed"] != self.cfg.run.seed:
            warnings.warn(f"{ckpt.path} was written with seed {trainer['seed']}; this run has seed "
                          f"{self.cfg.run.seed}, so the data order after resuming differs from an uninterrupted run",
                          stacklevel=2)
        self.recipe.load_state_dict_from_checkpoint(recipe_state_groups(ckpt))
        if self.ema is not None:
            if ckpt.has("ema.safetensors"):
                self.ema.load_state_dict(ckpt.tensors("ema"))
            else:
                warnings.warn(f"{ckpt.path} has no EMA (train.ema_decay was 0); the EMA restarts from the current "
                              f"weights", stacklevel=2)
                self.ema = EMA({k: self.modules[k] for k in self.ema.names}, self.tc.ema_decay)
        opt_state = unflatten_state(ckpt.json("optimizers"), ckpt.tensors("optimizers"))
        if set(opt_state["optimizers"]) != set(self.optimizers):
            raise ValueError(f"{ckpt.path} holds optimizers {sorted(opt_state['optimizers'])}, but recipe "
                             f"{self.recipe.name!r} has {self.opt_names}")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(opt_state["optimizers"][name])
            self.schedulers[name].load_state_dict(opt_state["schedulers"][name])
        if acc.scaler is not None and opt_state.get("scaler"):
            acc.scaler.load_state_dict(opt_state["scaler"])
        self.state = TrainerState(step=int(trainer["step"]), batch_index=batch_index)
        guard = trainer.get("guard", {})
        self.guard.load_state_dict(guard)
        self.rollbacks = int(trainer.get("rollbacks", 0))
        self.lr_scale = float(trainer.get("lr_scale", 1.0))
        config_lr = float(trainer.get("config_lr", self.tc.lr))
        if config_lr != self.tc.lr:  # the user changed train.lr on resume: apply it to the restored schedules
            self._scale_lr(self.tc.lr / config_lr)
            warnings.warn(f"train.lr changed from {config_lr:g} (in {ckpt.path}) to {self.tc.lr:g}; every learning "
                          f"rate of the resumed run is scaled by {self.tc.lr / config_lr:g}", stacklevel=2)
        self.last_checkpoint = ckpt.path
        if self.is_main:
            self._truncate_metrics(self.state.step)
        rng = f"rng_rank{self.rank}"
        if ckpt.has(f"{rng}.safetensors"):
            restore_rng_state(ckpt.tensors(rng), ckpt.json(rng))
        else:
            warnings.warn(f"{ckpt.path} has no RNG state for rank {self.rank}; global RNGs are freshly seeded",
                          stacklevel=2)

    def _truncate_metrics(self, step: int) -> None:
        """Drop metrics logged after the checkpoint we resume from (they are about to be recomputed)."""
        path = self.run_dir / "metrics.jsonl"
        if not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        path.write_text("".join(line + "\n" for line in kept))
