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

__all__ = ["SamplingSpec", "export_full_student", "export_lora_student", "read_sampling_spec", "write_sampling_spec",
           "SAMPLING_FILE"]

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

    def call_kwargs(self) -> dict:
        kw = {"num_inference_steps": self.num_inference_steps, "guidance_scale": self.guidance_scale}
        if self.timesteps:
            kw = {"timesteps": list(self.timesteps), "guidance_scale": self.guidance_scale}
        return kw


def read_sampling_spec(folder: str | os.PathLike) -> SamplingSpec | None:
    f = Path(folder) / SAMPLING_FILE
    if not f.exists():
        return None
    return SamplingSpec(**json.loads(f.read_text()))


def write_sampling_spec(folder: str | os.PathLike, spec: SamplingSpec) -> None:
    (Path(folder) / SAMPLING_FILE).write_text(json.dumps(asdict(spec), indent=2))


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

    def write(tmp: Path) -> None:
        components[key] = base_model_without_lora(base)
        _build_pipeline(cls, components).save_pretrained(tmp, safe_serialization=True)
        kw = {"unet_lora_layers": lora_layers} if key == "unet" else {"transformer_lora_layers": lora_layers}
        cls.save_lora_weights(tmp, safe_serialization=True, **kw)
        _finish(tmp, spec, cls.__name__)

    return _write_folder(out_dir, write)
