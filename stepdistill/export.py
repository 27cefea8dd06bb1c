"""Export a trained student as a folder that stock Diffusers loads.

* A full student replaces the teacher's UNet/transformer and scheduler in a copy of the teacher pipeline and is saved
  with ``save_pretrained`` (safetensors). SD1.5-style LCM students become a ``LatentConsistencyModelPipeline``
  (whose call defaults are LCM's); other families keep the teacher's pipeline class.
* A LoRA student saves the teacher pipeline (with the student's scheduler) plus ``pytorch_lora_weights.safetensors``,
  loadable with ``pipe.load_lora_weights(folder)``.
* Every folder carries ``stepdistill_sampling.json`` (steps, guidance scale, timesteps, scheduler) and a model card
  ``README.md`` with the exact sampling call. Nothing from stepdistill is needed to sample.

The folder is written under a temporary name and renamed when complete, so an interrupted export never leaves a
half-written folder behind under the final name (an existing folder is replaced only after the new one is complete).
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .models.teacher_io import TeacherBundle, pipeline_backbone_name

__all__ = ["SamplingSpec", "export_full_student", "export_lora_student", "fit_step_count_schedule",
           "pipeline_takes_timesteps", "read_sampling_spec", "write_sampling_spec", "SAMPLING_FILE"]

SAMPLING_FILE = "stepdistill_sampling.json"


@dataclass
class SamplingSpec:
    """How the exported student must be sampled (written to ``stepdistill_sampling.json``)."""

    recipe: str
    num_inference_steps: int
    guidance_scale: float
    scheduler: str
    variant: str = "full"
    timesteps: list[int] | None = None
    lora: bool = False
    notes: str = ""
    extra: dict = field(default_factory=dict)
    timesteps_from_steps: bool = False
    """True when the pipeline takes no ``timesteps`` argument (``DiTPipeline``, ``DDPMPipeline``) and the saved
    scheduler's ``set_timesteps(num_inference_steps)`` yields ``timesteps`` by itself (see
    :func:`fit_step_count_schedule`): callers pass ``num_inference_steps`` only."""

    def call_kwargs(self) -> dict:
        kw = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        if self.timesteps and not self.timesteps_from_steps:
            kw = {"timesteps": list(self.timesteps), "guidance_scale": self.guidance_scale}
        return kw


def read_sampling_spec(folder: str | os.PathLike) -> SamplingSpec | None:
    f = Path(folder) / SAMPLING_FILE
    if not f.exists():
        return None
    return SamplingSpec(**json.loads(f.read_text()))


def write_sampling_spec(folder: str | os.PathLike, spec: SamplingSpec) -> None:
    (Path(folder) / SAMPLING_FILE).write_text(json.dumps(asdict(spec), indent=2))


def pipeline_takes_timesteps(pipe_or_cls) -> bool:
    """Whether a Diffusers pipeline's ``__call__`` accepts a custom ``timesteps`` list (``DiTPipeline`` and
    ``DDPMPipeline`` do not: they only call ``scheduler.set_timesteps(num_inference_steps)``)."""
    cls = pipe_or_cls if isinstance(pipe_or_cls, type) else type(pipe_or_cls)
    return "timesteps" in inspect.signature(cls.__call__).parameters


def _step_count_timesteps(scheduler, steps: int, original_steps: int) -> list[int]:
    scheduler.set_timesteps(steps, original_inference_steps=original_steps)
    return [int(t) for t in scheduler.timesteps]


def fit_step_count_schedule(scheduler, timesteps, *, exact: bool = True):
    """An ``LCMScheduler`` whose ``set_timesteps(len(timesteps))`` alone yields ``timesteps`` -> (scheduler, grid).

    Pipelines without a ``timesteps`` argument can only ask for a step count. ``LCMScheduler.set_timesteps(n)`` takes
    ``n`` evenly spaced entries of its ``original_inference_steps`` (O) grid ``{k i - 1}``, ``k = T // O``, so the
    grids a stock call reaches are one per O. This searches O in ``[n, T]`` for the grid equal to ``timesteps``;
    with ``exact=False`` it returns the reachable grid nearest to it (least summed absolute timestep difference, ties
    to the larger O) -- for continuous-time students (sCM) that are valid at any t, so moving a sampling time changes
    the sampler, not the model. Raises ``ValueError`` when ``exact`` and no O reproduces the grid.
    """
    from diffusers import LCMScheduler

    if not isinstance(scheduler, LCMScheduler):
        raise ValueError(f"only LCMScheduler schedules can be fitted to a step count, got {type(scheduler).__name__}")
    grid = [int(t) for t in timesteps]
    n, total = len(grid), int(scheduler.config.num_train_timesteps)
    probe = LCMScheduler.from_config(scheduler.config)
    best = None
    for original in range(total, n - 1, -1):
        got = _step_count_timesteps(probe, n, original)
        err = sum(abs(a - b) for a, b in zip(got, grid))
        if best is None or err < best[0]:
            best = (err, original, got)
        if err == 0:
            break
    err, original, got = best
    if exact and err:
        raise ValueError(f"no LCMScheduler step count reproduces the timesteps {grid} (nearest: {got}, "
                         f"original_inference_steps={original}); this pipeline takes no `timesteps` argument, so "
                         f"train the student on a grid that set_timesteps({n}) reaches, e.g. {got}")
    return LCMScheduler.from_config(scheduler.config, original_inference_steps=original), got


def _check_sampling_reachable(cls, scheduler, spec: SamplingSpec) -> None:
    """A spec with custom timesteps must be reachable by the exported pipeline (see :func:`fit_step_count_schedule`)."""
    if not spec.timesteps or pipeline_takes_timesteps(cls):
        return
    original = scheduler.config.get("original_inference_steps")
    got = None if original is None else \
        _step_count_timesteps(type(scheduler).from_config(scheduler.config), len(spec.timesteps), original)
    if not spec.timesteps_from_steps or got != [int(t) for t in spec.timesteps]:
        raise ValueError(f"{cls.__name__} takes no `timesteps` argument and the {type(scheduler).__name__} being "
                         f"exported does not yield {list(spec.timesteps)} from num_inference_steps="
                         f"{len(spec.timesteps)} (it gives {got}); fit it with stepdistill.export.fit_step_count_schedule "
                         f"and set SamplingSpec.timesteps_from_steps")


def _export_pipeline_class(pipe, spec: SamplingSpec, backbone=None):
    import diffusers

    name = type(pipe).__name__
    # LatentConsistencyModelPipeline always embeds guidance_scale - 1, so only students with a guidance embedding
    # (time_cond_proj_dim) use it; others (DMD2, SwiftBrush) keep the teacher's class, sampled without CFG.
    embeds = getattr(getattr(backbone, "config", None), "time_cond_proj_dim", None) is not None
    if spec.scheduler == "LCMScheduler" and name == "StableDiffusionPipeline" and not spec.lora and embeds:
        return diffusers.LatentConsistencyModelPipeline
    return type(pipe)


def _build_pipeline(cls, components: dict):
    params = inspect.signature(cls.__init__).parameters
    kwargs = {k: v for k, v in components.items() if k in params}
    for k, p in params.items():
        if k not in kwargs and k != "self" and p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            kwargs[k] = None
    if "requires_safety_checker" in params:
        kwargs["requires_safety_checker"] = False
    return cls(**kwargs)


def _model_card(spec: SamplingSpec, pipeline_class: str) -> str:
    call = ", ".join(f"{k}={v!r}" for k, v in spec.call_kwargs().items())
    lora = "\npipe.load_lora_weights(folder)" if spec.lora else ""
    return f"""---
library_name: diffusers
tags: [stepdistill, {spec.recipe}, few-step]
---
# {spec.recipe} student ({spec.variant}) exported by stepdistill

Distilled with the `{spec.recipe}` recipe. Sample it with {spec.num_inference_steps} step(s) and the `{spec.scheduler}`
saved in this folder. {spec.notes}

```python
import torch
from diffusers import DiffusionPipeline

folder = "PATH/TO/THIS/FOLDER"
pipe = DiffusionPipeline.from_pretrained(folder){lora}
image = pipe("your prompt", {call}).images[0]
```

Pipeline class: `{pipeline_class}`. Sampling settings: `{SAMPLING_FILE}`.
"""


def _write_folder(out_dir: str | os.PathLike, write) -> Path:
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        write(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _require_pipeline(teacher: TeacherBundle):
    if teacher.pipeline is None:
        raise NotImplementedError("this teacher is not a Diffusers pipeline (a toy teacher): there is nothing to export "
                                  "to; the student weights are in the run's checkpoints")
    return teacher.pipeline


def _finish(folder: Path, spec: SamplingSpec, pipeline_class: str) -> None:
    write_sampling_spec(folder, spec)
    (folder / "README.md").write_text(_model_card(spec, pipeline_class))


def export_full_student(teacher: TeacherBundle, backbone, scheduler, out_dir, spec: SamplingSpec) -> Path:
    """Save ``backbone`` in place of the teacher's denoiser, with ``scheduler``, as a stock Diffusers folder."""
    pipe = _require_pipeline(teacher)
    components = dict(pipe.components)
    components[pipeline_backbone_name(pipe)] = backbone
    components["scheduler"] = scheduler
    cls = _export_pipeline_class(pipe, spec, backbone)
    _check_sampling_reachable(cls, scheduler, spec)
    new_pipe = _build_pipeline(cls, components)

    def write(tmp: Path) -> None:
        new_pipe.save_pretrained(tmp, safe_serialization=True)
        _finish(tmp, spec, cls.__name__)

    return _write_folder(out_dir, write)


def base_model_without_lora(model):
    """A fresh copy of a peft-injected Diffusers model holding only its base weights (the frozen teacher)."""
    clean = type(model).from_config(model.config)
    state = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    clean.load_state_dict(state, strict=True)
    return clean.to(next(model.parameters()).dtype)


def export_lora_student(teacher: TeacherBundle, lora_layers: dict, scheduler, out_dir, spec: SamplingSpec) -> Path:
    """Save the teacher pipeline (with ``scheduler``) and ``pytorch_lora_weights.safetensors``."""
    from .models.backbones import unwrap

    pipe = _require_pipeline(teacher)
    spec.lora = True
    key = pipeline_backbone_name(pipe)
    components = dict(pipe.components)
    base = unwrap(components[key])
    components["scheduler"] = scheduler
    cls = type(pipe)
    _check_sampling_reachable(cls, scheduler, spec)

    def write(tmp: Path) -> None:
        components[key] = base_model_without_lora(base)
        _build_pipeline(cls, components).save_pretrained(tmp, safe_serialization=True)
        kw = {"unet_lora_layers": lora_layers} if key == "unet" else {"transformer_lora_layers": lora_layers}
        cls.save_lora_weights(tmp, safe_serialization=True, **kw)
        _finish(tmp, spec, cls.__name__)

    return _write_folder(out_dir, write)
