"""Running Diffusers pipelines for evaluation: students, teachers and training-free solvers, timed and NFE-counted.

Shared by every ``stepdistill eval`` suite (:mod:`.digits_eval`, :mod:`.prompts_eval`):

* :func:`load_student` -- an exported student folder (``stepdistill_sampling.json``) -> pipeline + sampling spec;
* :func:`solver_scheduler` -- the teacher's scheduler swapped for DPM-Solver++(2M) (Lu et al. 2022) or DDIM
  (Song et al. 2021), both on ``trailing`` timesteps (Lin et al. 2024), built from the teacher's scheduler config;
* :func:`count_nfe` -- network evaluations per image, measured by a forward pre-hook on the backbone that sums the
  batch sizes of its calls (so a batched CFG forward counts 2);
* :func:`evaluate_rows` -- the row plan every suite shares: teacher, student per step count, solvers at its NFE;
* :func:`sample_rows` -- all images of one row in [0, 1] with seconds per image (pipeline wall clock: text encoding,
  denoising, decoding) and NFE per image.
"""

from __future__ import annotations

import inspect
import shlex
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

__all__ = ["SOLVERS", "count_nfe", "eval_command_line", "evaluate_rows", "load_student", "pipe_kind", "resolve_teacher_ref", "sample_rows",
           "save_grid", "solver_scheduler", "student_kwargs", "warm_up"]

SOLVERS = {
    "DPM-Solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                     "timestep_spacing": "trailing"}),
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}


def solver_scheduler(name: str, base_config: dict):
    """A training-free solver (``SOLVERS``) built from the teacher's scheduler config."""
    import diffusers

    cls_name, overrides = SOLVERS[name]
    cfg = {k: v for k, v in dict(base_config).items() if not k.startswith("_")}
    return getattr(diffusers, cls_name).from_config({**cfg, **overrides})


def _backbone(pipe) -> torch.nn.Module:
    for key in ("unet", "transformer"):
        m = getattr(pipe, key, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise ValueError(f"{type(pipe).__name__} has no unet/transformer to evaluate")


@contextmanager
def count_nfe(pipe):
    """Count backbone evaluations: yields a dict whose ``"evals"`` is the sum of the batch sizes of every forward
    call (divide by the number of images for NFE per image)."""
    counter = {"evals": 0}

    def hook(module, args, kwargs):
        x = args[0] if args else next(iter(v for k, v in kwargs.items() if k in ("sample", "hidden_states")))
        counter["evals"] += int(x.shape[0])

    handle = _backbone(pipe).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield counter
    finally:
        handle.remove()


def pipe_kind(pipe) -> str:
    params = inspect.signature(pipe.__call__).parameters
    if "prompt" in params:
        return "prompt"
    if "class_labels" in params:
        return "class"
    if type(pipe).__name__ == "DDPMPipeline":
        return "ddpm_class"
    raise ValueError(f"cannot condition {type(pipe).__name__} on digit classes (no prompt or class_labels argument)")


def _to_nchw(images) -> torch.Tensor:
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return images.detach().float().cpu()


def _call_pipe(pipe, kind: str, labels: torch.Tensor, prompts, kw: dict, seed: int, image_size: int) -> torch.Tensor:
    """One pipeline call -> images ``(B, C, H, W)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "prompt":
        out = pipe(prompt=list(prompts), height=image_size, width=image_size, generator=g, output_type="pt", **kw)
        return _to_nchw(out.images)
    if kind == "class":
        # Stock DiTPipeline does not pass `generator` to scheduler.step, so a stochastic multistep scheduler (the
        # LCMScheduler of consistency / DMD2 exports re-noises between steps) draws from the global RNG: seed it too,
        # inside fork_rng (CPU and every visible CUDA device: on GPU the scheduler's noise comes from the CUDA
        # generator, which manual_seed also reseeds) so the caller's RNG state is left as it was.
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return _to_nchw(pipe(class_labels=labels.tolist(), generator=g, output_type="pt", **kw).images)
    from ..benchmarks.digits.sampling import sample_with_scheduler

    if "timesteps" in kw:
        raise ValueError("explicit timesteps are not supported for DDPMPipeline-shaped digits models")
    x = sample_with_scheduler(pipe, labels, num_inference_steps=kw["num_inference_steps"],
                              guidance_scale=kw.get("guidance_scale", 1.0), seed=seed)
    return ((x + 1) / 2).clamp(0, 1).float().cpu()


def sample_rows(pipe, labels, conds, kw, *, seed, batch_size, image_size, desc) -> tuple[torch.Tensor, float, float]:
    """All samples of one row: (images in [0, 1], seconds per image, NFE per image)."""
    from tqdm.auto import tqdm

    kind = pipe_kind(pipe)
    n = labels.shape[0]
    out, seconds = [], 0.0
    with count_nfe(pipe) as counter:
        for b, start in enumerate(tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False)):
            sl = slice(start, start + batch_size)
            prompts = conds[sl] if kind == "prompt" else None
            t0 = time.perf_counter()
            imgs = _call_pipe(pipe, kind, labels[sl], prompts, kw, seed * 100_003 + b, image_size)
            seconds += time.perf_counter() - t0
            out.append(imgs)
    images = torch.cat(out)
    if image_size is not None and tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(f"{desc}: the pipeline produced {tuple(images.shape[2:])} images; this suite needs "
                         f"{image_size}x{image_size}")
    return images, seconds / n, counter["evals"] / n


def warm_up(pipe, labels, conds, kw, image_size) -> None:
    kind = pipe_kind(pipe)
    kw = {k: v for k, v in kw.items() if k != "timesteps"}
    kw["num_inference_steps"] = 1
    _call_pipe(pipe, kind, labels[:1], conds[:1] if kind == "prompt" else None, kw, 0, image_size)


def save_grid(images: torch.Tensor, path: Path, max_images: int = 50) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images[:max_images], str(path), nrow=10, padding=1, pad_value=0.5)


def student_kwargs(spec, steps: int) -> dict:
    kw = {"guidance_scale": float(spec.guidance_scale)}
    if spec.timesteps and len(spec.timesteps) == steps and not getattr(spec, "timesteps_from_steps", False):
        kw["timesteps"] = list(spec.timesteps)
    else:
        kw["num_inference_steps"] = int(steps)
    return kw


def load_student(model_dir: str | Path, teacher: str | None = None):
    """An exported student folder -> (pipeline, SamplingSpec); LoRA weights are loaded when present.

    An AGD export holds adapters only (``extra.adapters``): its base pipeline (``teacher``, else the spec's
    ``extra.teacher``) is loaded and the adapters are installed into it (:func:`stepdistill.agd.install_adapters`).
    """
    from ..export import SAMPLING_FILE, read_sampling_spec
    from ..models.teacher_io import load_pipeline

    model_dir = Path(model_dir)
    spec = read_sampling_spec(model_dir)
    if spec is None:
        raise FileNotFoundError(f"{model_dir} has no {SAMPLING_FILE}; pass a folder written by `stepdistill export` "
                                f"(or `stepdistill train`)")
    if (spec.extra or {}).get("adapters"):
        from ..agd import install_adapters
        from .teacher_ref import teacher_folder

        pipe = load_pipeline(teacher_folder(resolve_teacher_ref(spec, teacher)))
        install_adapters(pipe, model_dir)
        return pipe, spec
    pipe = load_pipeline(model_dir)
    if (model_dir / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(str(model_dir))
    return pipe, spec


def resolve_teacher_ref(spec, teacher: str | None) -> str:
    if teacher:
        return teacher
    ref = (spec.extra or {}).get("teacher")
    if not ref:
        raise ValueError("the student's stepdistill_sampling.json does not name its teacher; pass --teacher "
                         "(e.g. --teacher digits:sd or a local pipeline folder)")
    return str(ref)


def evaluate_rows(tpipe, student, spec, t_kw: dict, steps, solvers, measure) -> list:
    """The rows of an evaluation, in order: the teacher at ``t_kw``; then per student step count (ascending) the
    student and each training-free solver at the student's NFE (``max(1, NFE // 2)`` guided steps, each pair of
    solver and step count measured once). ``measure(name, kind, solver, pipe, kw, slug)`` samples and scores one row
    and returns an object with ``nfe``, ``sec_per_image`` and a writable ``speedup_vs_teacher`` (set here as
    ``sec_teacher / sec_row``). The teacher's own scheduler is restored after every solver row."""
    base_sched = tpipe.scheduler
    rows = [measure("teacher", "teacher", type(base_sched).__name__, tpipe, t_kw,
                    f"teacher-{t_kw['num_inference_steps']}steps")]
    done: set[tuple[str, int]] = set()
    per_step = 2 if t_kw["guidance_scale"] > 1.0 else 1
    for s in sorted({int(s) for s in steps}):
        row = measure(spec.recipe, "student", spec.scheduler, student, student_kwargs(spec, s), f"student-{s}steps")
        rows.append(row)
        k = max(1, int(row.nfe) // per_step)
        for name in solvers:
            if (name, k) in done:
                continue
            done.add((name, k))
            tpipe.scheduler = solver_scheduler(name, base_sched.config)
            try:
                rows.append(measure(name, "solver", type(tpipe.scheduler).__name__, tpipe,
                                    {**t_kw, "num_inference_steps": k}, f"{name.lower().replace('+', 'p')}-{k}steps"))
            finally:
                tpipe.scheduler = base_sched
    t_sec = rows[0].sec_per_image
    for r in rows:
        r.speedup_vs_teacher = t_sec / r.sec_per_image if r.sec_per_image > 0 else None
    return rows


def eval_command_line(model_dir, suite: str, *, teacher, steps, num_samples, seed, batch_size, json_path,
                      suite_args: tuple = (), options: tuple = ()) -> str:
    """The ``stepdistill eval`` command that reproduces a result, recorded in its JSON: ``suite_args`` (flag, value)
    pairs right after ``--suite``, then ``--teacher``, ``--steps``, ``--num-samples``, then each ``options`` pair whose
    value is not None, then ``--seed``, ``--batch-size`` and ``--json``."""
    parts = ["stepdistill", "eval", str(model_dir), "--suite", suite]
    for flag, value in suite_args:
        parts += [flag, str(value)]
    if teacher:
        parts += ["--teacher", teacher]
    parts += ["--steps", ",".join(str(s) for s in steps), "--num-samples", str(num_samples)]
    for flag, value in options:
        if value is not None:
            parts += [flag, str(value)]
    parts += ["--seed", str(seed), "--batch-size", str(batch_size)]
    if json_path:
        parts += ["--json", str(json_path)]
    return shlex.join(parts)
