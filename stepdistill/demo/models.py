"""Load the demo's teacher and students once, and sample each one from the same seed with NFE and wall time.

* A *model reference* is a Diffusers pipeline folder, ``digits:NAME`` (a bundled digits teacher) or ``tiny:FAMILY``
  (a random tiny pipeline, for tests). Students are folders exported by stepdistill: their
  ``stepdistill_sampling.json`` (:class:`~stepdistill.export.SamplingSpec`) gives the steps / timesteps / guidance
  they were trained for, and a ``pytorch_lora_weights.safetensors`` beside the base pipeline is loaded with
  ``pipe.load_lora_weights`` (an LCM full export is a ``LatentConsistencyModelPipeline`` and loads as is).
* :class:`ModelCache` loads each reference at most once (thread-safe). A missing folder is looked for again on every
  request, and a folder that failed to load is retried once its files change, so fixing a model needs no restart.
  Every failure becomes a :class:`DemoModelError` whose message names the folder and the fix; callers show it in
  the UI.
* NFE is counted, not assumed: a forward pre-hook on the pipeline's UNet / transformer adds up the batch rows of
  every call, divided by the number of images, so a classifier-free-guidance step (conditional and unconditional
  rows in one batch) counts as 2 evaluations and a guidance-embedded LCM step as 1.
* Wall time is the pipeline call (text encoding, denoising, VAE decode) after a one-step warm-up done at load time,
  with ``torch.cuda.synchronize`` on GPU; the speedup is the teacher's time over the student's, both measured in the
  same request in the same process.
"""

from __future__ import annotations

import inspect
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = ["DemoModelError", "LoadedModel", "SampleResult", "ModelCache", "resolve_model_path", "conditioning_kind",
           "display_image"]


class DemoModelError(RuntimeError):
    """A model folder is missing, does not load, or cannot be sampled the way the demo asks."""


def resolve_model_path(ref: str) -> Path:
    """A model reference (folder, ``digits:NAME``, ``tiny:FAMILY``) -> a folder with ``model_index.json``."""
    ref = str(ref).strip()
    if not ref:
        raise DemoModelError("empty model path; pass a Diffusers pipeline folder (one containing model_index.json)")
    if ref.startswith("digits:"):
        from ..benchmarks.digits.paths import load_digits_teacher

        try:
            return load_digits_teacher(ref.split(":", 1)[1])
        except (FileNotFoundError, ValueError) as exc:
            raise DemoModelError(f"bundled teacher {ref!r} is not available: {exc}") from None
    if ref.startswith("tiny:"):
        from ..testing.tiny_pipelines import tiny_pipeline_dir

        try:
            return tiny_pipeline_dir(ref.split(":", 1)[1])
        except (KeyError, ValueError) as exc:
            raise DemoModelError(f"unknown tiny pipeline {ref!r}: {exc}") from None
    path = Path(ref).expanduser()
    if not path.exists():
        raise DemoModelError(f"model folder {str(path)!r} does not exist; pass a Diffusers pipeline folder "
                             f"(for a student: the folder `stepdistill export` or a finished training run wrote)")
    if not (path / "model_index.json").is_file():
        raise DemoModelError(f"{str(path)!r} has no model_index.json, so it is not a Diffusers pipeline folder; "
                             f"pass the folder that contains model_index.json")
    return path


def conditioning_kind(folder: Path) -> str:
    """``"prompt"`` or ``"class"``, read from the pipeline class named in ``model_index.json`` (nothing is loaded)."""
    import diffusers

    try:
        name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise DemoModelError(f"{folder}/model_index.json is unreadable or has no _class_name ({exc})") from None
    cls = getattr(diffusers, name, None)
    if cls is None:
        raise DemoModelError(f"{folder}: pipeline class {name!r} is not in this diffusers version")
    params = inspect.signature(cls.__call__).parameters
    if "prompt" in params:
        return "prompt"
    if "class_labels" in params:
        return "class"
    raise DemoModelError(f"{folder}: {name}.__call__ takes neither a prompt nor class_labels; the demo shows "
                         f"prompt- or class-conditional pipelines only")


def _call_defaults(pipe) -> tuple[int, float]:
    params = inspect.signature(type(pipe).__call__).parameters
    steps = params.get("num_inference_steps")
    guidance = params.get("guidance_scale")
    return (int(steps.default) if steps is not None and isinstance(steps.default, int) else 4,
            float(guidance.default) if guidance is not None and isinstance(guidance.default, (int, float)) else 1.0)


def _num_classes(pipe) -> int | None:
    from ..models.teacher_io import pipeline_backbone_name

    cfg = getattr(pipe, pipeline_backbone_name(pipe)).config
    n = getattr(cfg, "num_embeds_ada_norm", None) or getattr(cfg, "num_class_embeds", None)
    return int(n) if n else None


@dataclass
class SampleResult:
    """One model's image for one request (or the message saying why there is none)."""

    name: str
    image: Any = None  # PIL.Image at native resolution
    nfe: float | None = None
    seconds: float | None = None
    steps: int | None = None
    guidance: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class LoadedModel:
    """A loaded pipeline plus how the demo samples it."""

    name: str
    folder: Path
    pipe: Any
    kind: str  # "prompt" | "class"
    spec: Any = None  # SamplingSpec or None (teachers)
    num_classes: int | None = None
    default_steps: int = 4
    default_guidance: float = 1.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def call_kwargs(self, steps: int | None, guidance: float | None) -> dict:
        """Sampling kwargs: the exported spec (or the pipeline's defaults), overridden by ``steps`` / ``guidance``."""
        kw = self.spec.call_kwargs() if self.spec is not None else {
            "num_inference_steps": self.default_steps, "guidance_scale": self.default_guidance}
        if steps:
            kw.pop("timesteps", None)
            kw["num_inference_steps"] = int(steps)
        if guidance is not None:
            kw["guidance_scale"] = float(guidance)
        return kw

    def condition_kwargs(self, prompt: str, class_label: int) -> dict:
        if self.kind == "class":
            if self.num_classes is not None and not 0 <= class_label < self.num_classes:
                raise DemoModelError(f"class label {class_label} is out of range for {self.name}: "
                                     f"use 0..{self.num_classes - 1}")
            return {"class_labels": [int(class_label)]}
        if not prompt or not prompt.strip():
            raise DemoModelError("the prompt is empty; type a prompt such as 'a handwritten digit 3'")
        return {"prompt": prompt}

    def sample(self, prompt: str, class_label: int, seed: int, steps: int | None = None,
               guidance: float | None = None) -> SampleResult:
        """One image from ``torch.Generator().manual_seed(seed)`` (CPU noise: the same on every device)."""
        from ..models.teacher_io import pipeline_backbone_name

        kw = {**self.call_kwargs(steps, guidance), **self.condition_kwargs(prompt, class_label)}
        backbone = getattr(self.pipe, pipeline_backbone_name(self.pipe))
        rows = [0]

        def count(_module, args, kwargs):
            x = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            rows[0] += int(x.shape[0])

        with self.lock:
            handle = backbone.register_forward_pre_hook(count, with_kwargs=True)
            try:
                _sync(self.pipe)
                start = time.perf_counter()
                out = self.pipe(generator=torch.Generator().manual_seed(int(seed)), output_type="pil", **kw)
                _sync(self.pipe)
                seconds = time.perf_counter() - start
            finally:
                handle.remove()
        image = out.images[0]
        n_steps = len(kw["timesteps"]) if kw.get("timesteps") else int(kw["num_inference_steps"])
        return SampleResult(name=self.name, image=image, nfe=rows[0] / len(out.images), seconds=seconds,
                            steps=n_steps, guidance=kw.get("guidance_scale"))


def _sync(pipe) -> None:
    device = getattr(pipe, "device", None)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def _folder_signature(folder: Path) -> tuple:
    """(file count, newest mtime, total size) of everything under ``folder``: changes when the folder is rewritten."""
    count = newest = size = 0
    for path in folder.rglob("*"):
        try:
            st = path.stat()
        except OSError:
            continue
        count, newest, size = count + 1, max(newest, st.st_mtime_ns), size + st.st_size
    return count, newest, size


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class ModelCache:
    """Loads each model reference once (``get``) and keeps it; failures are raised as :class:`DemoModelError`."""

    def __init__(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        self.device = torch.device(device) if device not in (None, "auto") else default_device()
        self.dtype = dtype
        self._models: dict[str, LoadedModel] = {}
        self._failed: dict[str, tuple[tuple, str]] = {}  # ref -> (folder signature, message) of a failed load
        self._lock = threading.Lock()

    def loaded(self, ref: str) -> bool:
        return str(ref) in self._models

    def get(self, ref: str, name: str | None = None) -> LoadedModel:
        ref = str(ref)
        with self._lock:
            if ref not in self._models:
                folder = resolve_model_path(ref)  # cheap; a missing folder is re-checked on every request
                signature = _folder_signature(folder)
                failed = self._failed.get(ref)
                if failed is not None and failed[0] == signature:
                    raise DemoModelError(failed[1])  # same files as last time: don't pay for the failing load again
                try:
                    self._models[ref] = self._load(folder, name or ref)
                except DemoModelError as exc:
                    self._failed[ref] = (signature, str(exc))
                    raise
                self._failed.pop(ref, None)
            return self._models[ref]

    def _load(self, folder: Path, name: str) -> LoadedModel:
        from ..export import read_sampling_spec
        from ..models.teacher_io import TeacherLoadError, load_pipeline

        kind = conditioning_kind(folder)
        try:
            spec = read_sampling_spec(folder)
        except (TypeError, ValueError) as exc:
            raise DemoModelError(f"{folder}/stepdistill_sampling.json is not a valid sampling spec ({exc}); "
                                 f"re-export the student with `stepdistill export RUN_DIR {folder}`") from None
        try:
            pipe = load_pipeline(folder, torch_dtype=self.dtype)
            if (folder / "pytorch_lora_weights.safetensors").is_file():
                pipe.load_lora_weights(folder)
            pipe = pipe.to(self.device)
        except TeacherLoadError as exc:  # already says what is wrong and how to fix it
            raise DemoModelError(f"could not load {folder}: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - any loader failure becomes one message in the UI
            raise DemoModelError(f"could not load {folder}: {type(exc).__name__}: {exc}") from None
        pipe.set_progress_bar_config(disable=True)
        steps, guidance = _call_defaults(pipe)
        model = LoadedModel(name=name, folder=folder, pipe=pipe, kind=kind, spec=spec, num_classes=_num_classes(pipe),
                            default_steps=steps, default_guidance=guidance)
        try:  # warm-up (first-call allocations and lazy inits stay out of the timings); also proves it samples
            model.sample("warm-up", 0, 0, steps=1)
        except Exception as exc:  # noqa: BLE001
            raise DemoModelError(f"{folder} loads but fails to sample: {type(exc).__name__}: {exc}") from None
        return model


def display_image(image, min_size: int):
    """Nearest-neighbour upscale of a small image by an integer factor so its short side is at least ``min_size``."""
    if image is None:
        return None
    factor = max(1, math.ceil(min_size / max(1, min(image.size))))
    if factor == 1:
        return image
    from PIL import Image

    return image.resize((image.size[0] * factor, image.size[1] * factor), Image.NEAREST)
