"""``stepdistill eval MODEL_DIR --suite digits``: a distilled student against its teacher and training-free solvers.

Rows of the result (all sampled in the same process, same seeds, same conditions, same thread count):

* ``teacher``: the teacher pipeline at its default steps with classifier-free guidance (digits: 50 steps, w = 3);
* ``student``: the exported student (its ``stepdistill_sampling.json``: scheduler, guidance, timesteps) at each
  requested step count;
* ``solver``: the teacher with its scheduler swapped (``from_config``) for DPM-Solver++(2M) (Lu et al. 2022) and
  DDIM (Song et al. 2021), both with ``trailing`` timestep spacing (Lin et al. 2024: "leading" spacing never reaches
  t = T at few steps), with the teacher's CFG, at the student's NFE: ``max(1, NFE_student // 2)`` steps since each
  guided step costs 2 evaluations (at student NFE 1 the solver therefore uses 2).

Metrics per row: NFE per image *measured* by counting the backbone's forward calls weighted by their batch size
(so batched CFG counts 2), wall-clock seconds per image for the whole pipeline call (text encoding, denoising, VAE
decoding; after one warm-up call per pipeline), the speedup ``sec_teacher / sec_row``, the domain FID against the
360 held-out test digits and the class accuracy of the digit classifier (``benchmarks.digits.domain_fid``).

Conditions: ``N`` samples with labels ``i % 10``; prompts cycle through every prompt template
(``benchmarks.digits.sampling.eval_conditions``) for text teachers, class labels otherwise. Sample grids (up to 50
images, one column per digit) of every row are written next to the JSON.
"""

from __future__ import annotations

import inspect
import shlex
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

__all__ = ["EvalRow", "count_nfe", "run_digits_eval", "solver_scheduler"]

DIGITS_TEACHER_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 3.0}
SOLVERS = {
    "DPM-Solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                     "timestep_spacing": "trailing"}),
    "DDIM": ("DDIMScheduler", {"timestep_spacing": "trailing"}),
}
REFERENCE = "digits test split (360 held-out real images); features: digit-classifier penultimate layer (64-d)"


@dataclass
class EvalRow:
    name: str
    kind: str  # "student" | "teacher" | "solver"
    solver: str
    steps: int
    nfe: float
    sec_per_image: float
    speedup_vs_teacher: float | None
    domain_fid: float
    class_accuracy: float
    guidance_scale: float
    grid: str | None = None


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


def _pipe_kind(pipe) -> str:
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


def _call(pipe, kind: str, labels: torch.Tensor, prompts, kw: dict, seed: int, image_size: int) -> torch.Tensor:
    """One pipeline call -> images ``(B, C, H, W)`` in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    if kind == "prompt":
        out = pipe(prompt=list(prompts), height=image_size, width=image_size, generator=g, output_type="pt", **kw)
        return _to_nchw(out.images)
    if kind == "class":
        return _to_nchw(pipe(class_labels=labels.tolist(), generator=g, output_type="pt", **kw).images)
    from ..benchmarks.digits.sampling import sample_with_scheduler

    if "timesteps" in kw:
        raise ValueError("explicit timesteps are not supported for DDPMPipeline-shaped digits models")
    x = sample_with_scheduler(pipe, labels, num_inference_steps=kw["num_inference_steps"],
                              guidance_scale=kw.get("guidance_scale", 1.0), seed=seed)
    return ((x + 1) / 2).clamp(0, 1).float().cpu()


def _sample(pipe, labels, conds, kw, *, seed, batch_size, image_size, desc) -> tuple[torch.Tensor, float, float]:
    """All samples of one row: (images in [0, 1], seconds per image, NFE per image)."""
    from tqdm.auto import tqdm

    kind = _pipe_kind(pipe)
    n = labels.shape[0]
    out, seconds = [], 0.0
    with count_nfe(pipe) as counter:
        for b, start in enumerate(tqdm(range(0, n, batch_size), desc=desc, unit="batch", leave=False)):
            sl = slice(start, start + batch_size)
            prompts = conds[sl] if kind == "prompt" else None
            t0 = time.perf_counter()
            imgs = _call(pipe, kind, labels[sl], prompts, kw, seed * 100_003 + b, image_size)
            seconds += time.perf_counter() - t0
            out.append(imgs)
    images = torch.cat(out)
    if tuple(images.shape[2:]) != (image_size, image_size):
        raise ValueError(f"{desc}: the pipeline produced {tuple(images.shape[2:])} images; the digits suite needs "
                         f"{image_size}x{image_size}")
    return images, seconds / n, counter["evals"] / n


def _warm_up(pipe, labels, conds, kw, image_size) -> None:
    kind = _pipe_kind(pipe)
    kw = {k: v for k, v in kw.items() if k != "timesteps"}
    kw["num_inference_steps"] = 1
    _call(pipe, kind, labels[:1], conds[:1] if kind == "prompt" else None, kw, 0, image_size)


def _save_grid(images: torch.Tensor, path: Path, max_images: int = 50) -> None:
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images[:max_images], str(path), nrow=10, padding=1, pad_value=0.5)


def _student_kwargs(spec, steps: int) -> dict:
    kw = {"guidance_scale": float(spec.guidance_scale)}
    if spec.timesteps and len(spec.timesteps) == steps:
        kw["timesteps"] = list(spec.timesteps)
    else:
        kw["num_inference_steps"] = int(steps)
    return kw


def load_student(model_dir: str | Path):
    """An exported student folder -> (pipeline, SamplingSpec); LoRA weights are loaded when present."""
    from ..export import SAMPLING_FILE, read_sampling_spec
    from ..models.teacher_io import load_pipeline

    model_dir = Path(model_dir)
    spec = read_sampling_spec(model_dir)
    if spec is None:
        raise FileNotFoundError(f"{model_dir} has no {SAMPLING_FILE}; pass a folder written by `stepdistill export` "
                                f"(or `stepdistill train`)")
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


def eval_command(model_dir, suite, teacher, steps, num_samples, json_path, teacher_steps, teacher_guidance, seed,
                 batch_size, classifier_source=None) -> str:
    parts = ["stepdistill", "eval", str(model_dir), "--suite", suite]
    if teacher:
        parts += ["--teacher", teacher]
    parts += ["--steps", ",".join(str(s) for s in steps), "--num-samples", str(num_samples)]
    if teacher_steps is not None:
        parts += ["--teacher-steps", str(teacher_steps)]
    if teacher_guidance is not None:
        parts += ["--teacher-guidance", str(teacher_guidance)]
    if classifier_source:
        parts += ["--classifier", str(classifier_source)]
    parts += ["--seed", str(seed), "--batch-size", str(batch_size)]
    if json_path:
        parts += ["--json", str(json_path)]
    return shlex.join(parts)


@torch.no_grad()
def run_digits_eval(model_dir: str | Path, *, steps: list[int], json_path: str | Path | None = None,
                    teacher: str | None = None, num_samples: int = 1000, teacher_steps: int | None = None,
                    teacher_guidance: float | None = None, classifier=None, batch_size: int = 250, seed: int = 0,
                    solvers: tuple[str, ...] = tuple(SOLVERS), image_size: int | None = None,
                    reference_images: torch.Tensor | None = None, classifier_source: str | None = None) -> dict:
    """Run the digits evaluation and return (and write to ``json_path``) the result dict (see module doc).

    ``classifier`` defaults to the committed digit classifier (``classifier_source`` names where a given one came
    from, for the record); ``reference_images`` ([-1, 1]) default to the test split.
    """
    from ..benchmarks.digits.data import IMAGE_SIZE
    from ..benchmarks.digits.domain_fid import class_accuracy, default_classifier, domain_fid
    from ..benchmarks.digits.sampling import eval_conditions
    from ..models.teacher_io import load_pipeline
    from .teacher_ref import teacher_folder

    if not steps or any(int(s) < 1 for s in steps):
        raise ValueError(f"--steps must be positive integers, got {steps}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (FID needs 2 samples), got {num_samples}")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:
        raise ValueError(f"unknown solvers {unknown}; available: {sorted(SOLVERS)}")
    image_size = image_size or IMAGE_SIZE
    command = eval_command(model_dir, "digits", teacher, steps, num_samples, json_path, teacher_steps,
                           teacher_guidance, seed, batch_size, classifier_source)
    student, spec = load_student(model_dir)
    teacher_ref = resolve_teacher_ref(spec, teacher)
    tpipe = load_pipeline(teacher_folder(teacher_ref))
    for p in (student, tpipe):
        p.set_progress_bar_config(disable=True)
    clf = classifier if classifier is not None else default_classifier()
    labels, conds = eval_conditions(SimpleNamespace(pipeline=tpipe), num_samples)
    s_labels, s_conds = eval_conditions(SimpleNamespace(pipeline=student), num_samples)
    t_kw = {"num_inference_steps": int(teacher_steps or DIGITS_TEACHER_DEFAULTS["num_inference_steps"]),
            "guidance_scale": float(DIGITS_TEACHER_DEFAULTS["guidance_scale"] if teacher_guidance is None
                                    else teacher_guidance)}
    out_dir = Path(json_path).parent if json_path else None
    grid_dir_name = f"{Path(json_path).stem}-samples" if json_path else None

    def measure(name, kind, solver, pipe, kw, lab, cnd, slug) -> EvalRow:
        imgs, spi, nfe = _sample(pipe, lab, cnd, kw, seed=seed, batch_size=batch_size, image_size=image_size,
                                 desc=f"{name} {kw.get('num_inference_steps', len(kw.get('timesteps', [])))} steps")
        grid = None
        if out_dir is not None:
            grid = f"{grid_dir_name}/{slug}.png"
            _save_grid(imgs, out_dir / grid)
        fid = domain_fid(imgs, reference_images, value_range=(0.0, 1.0), classifier=clf)
        acc = class_accuracy(imgs, lab, value_range=(0.0, 1.0), classifier=clf)
        n_steps = int(kw["num_inference_steps"]) if "num_inference_steps" in kw else len(kw["timesteps"])
        return EvalRow(name=name, kind=kind, solver=solver, steps=n_steps, nfe=round(nfe, 4), sec_per_image=spi,
                       speedup_vs_teacher=None, domain_fid=fid, class_accuracy=acc,
                       guidance_scale=float(kw.get("guidance_scale", 1.0)), grid=grid)

    _warm_up(tpipe, labels, conds, t_kw, image_size)
    _warm_up(student, s_labels, s_conds, _student_kwargs(spec, 1), image_size)
    base_sched = tpipe.scheduler
    rows = [measure("teacher", "teacher", type(base_sched).__name__, tpipe, t_kw, labels, conds,
                    f"teacher-{t_kw['num_inference_steps']}steps")]
    done_solver_steps: set[tuple[str, int]] = set()
    for s in sorted({int(s) for s in steps}):
        row = measure(spec.recipe, "student", spec.scheduler, student, _student_kwargs(spec, s), s_labels, s_conds,
                      f"student-{s}steps")
        rows.append(row)
        per_step = 2 if t_kw["guidance_scale"] > 1.0 else 1
        k = max(1, int(row.nfe) // per_step)
        for name in solvers:
            if (name, k) in done_solver_steps:
                continue
            done_solver_steps.add((name, k))
            tpipe.scheduler = solver_scheduler(name, base_sched.config)
            try:
                rows.append(measure(name, "solver", type(tpipe.scheduler).__name__, tpipe,
                                    {**t_kw, "num_inference_steps": k}, labels, conds,
                                    f"{name.lower().replace('+', 'p')}-{k}steps"))
            finally:
                tpipe.scheduler = base_sched
    t_sec = rows[0].sec_per_image
    for r in rows:
        r.speedup_vs_teacher = t_sec / r.sec_per_image if r.sec_per_image > 0 else None
    result = {
        "suite": "digits", "model": str(model_dir), "recipe": spec.recipe, "variant": spec.variant,
        "teacher": teacher_ref, "num_samples": int(num_samples),
        "reference": REFERENCE if reference_images is None else f"{reference_images.shape[0]} given reference images",
        "classifier": "committed (assets/classifier)" if classifier is None else (classifier_source or "given"),
        "teacher_defaults": t_kw, "seed": seed, "torch_threads": torch.get_num_threads(),
        "command": command, "rows": [asdict(r) for r in rows],
    }
    if json_path:
        import json

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
