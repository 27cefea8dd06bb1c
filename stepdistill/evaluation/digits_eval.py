"""``stepdistill eval MODEL_DIR --suite digits``: a distilled student against its teacher and training-free solvers.

Rows of the result (all sampled in the same process, same seeds, same conditions, same thread count):

* ``teacher``: the teacher pipeline at its default steps with classifier-free guidance (digits: 50 steps, w = the
  teacher's ``paths.TEACHER_GUIDANCE``: 3 for sd, 1.5 for dit and unet);
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

from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from .pipeline_runs import (SOLVERS, count_nfe, eval_command_line, evaluate_rows, load_student, resolve_teacher_ref, sample_rows,
                            save_grid, solver_scheduler, student_kwargs, warm_up)

__all__ = ["EvalRow", "count_nfe", "run_digits_eval", "solver_scheduler"]

DIGITS_TEACHER_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 3.0}
"""Teacher row defaults; a committed ``digits:NAME`` teacher uses its own ``paths.TEACHER_GUIDANCE`` instead."""
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


def eval_command(model_dir, suite, teacher, steps, num_samples, json_path, teacher_steps, teacher_guidance, seed,
                 batch_size, classifier_source=None) -> str:
    return eval_command_line(model_dir, suite, teacher=teacher, steps=steps, num_samples=num_samples, seed=seed,
                             batch_size=batch_size, json_path=json_path,
                             options=(("--teacher-steps", teacher_steps), ("--teacher-guidance", teacher_guidance),
                                      ("--classifier", classifier_source or None)))


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
    from ..benchmarks.digits.paths import teacher_guidance as teacher_guidance_for
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
    student, spec = load_student(model_dir, teacher)
    teacher_ref = resolve_teacher_ref(spec, teacher)
    tpipe = load_pipeline(teacher_folder(teacher_ref))
    for p in (student, tpipe):
        p.set_progress_bar_config(disable=True)
    clf = classifier if classifier is not None else default_classifier()
    labels, conds = eval_conditions(SimpleNamespace(pipeline=tpipe), num_samples)
    s_labels, s_conds = eval_conditions(SimpleNamespace(pipeline=student), num_samples)
    t_kw = {"num_inference_steps": int(teacher_steps or DIGITS_TEACHER_DEFAULTS["num_inference_steps"]),
            "guidance_scale": float(teacher_guidance_for(teacher_ref) if teacher_guidance is None
                                    else teacher_guidance)}
    out_dir = Path(json_path).parent if json_path else None
    grid_dir_name = f"{Path(json_path).stem}-samples" if json_path else None

    def measure(name, kind, solver, pipe, kw, slug) -> EvalRow:
        lab, cnd = (s_labels, s_conds) if kind == "student" else (labels, conds)
        imgs, spi, nfe = sample_rows(pipe, lab, cnd, kw, seed=seed, batch_size=batch_size, image_size=image_size,
                                 desc=f"{name} {kw.get('num_inference_steps', len(kw.get('timesteps', [])))} steps")
        grid = None
        if out_dir is not None:
            grid = f"{grid_dir_name}/{slug}.png"
            save_grid(imgs, out_dir / grid)
        fid = domain_fid(imgs, reference_images, value_range=(0.0, 1.0), classifier=clf)
        acc = class_accuracy(imgs, lab, value_range=(0.0, 1.0), classifier=clf)
        n_steps = int(kw["num_inference_steps"]) if "num_inference_steps" in kw else len(kw["timesteps"])
        return EvalRow(name=name, kind=kind, solver=solver, steps=n_steps, nfe=round(nfe, 4), sec_per_image=spi,
                       speedup_vs_teacher=None, domain_fid=fid, class_accuracy=acc,
                       guidance_scale=float(kw.get("guidance_scale", 1.0)), grid=grid)

    warm_up(tpipe, labels, conds, t_kw, image_size)
    warm_up(student, s_labels, s_conds, student_kwargs(spec, 1), image_size)
    rows = evaluate_rows(tpipe, student, spec, t_kw, steps, solvers, measure)
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
