"""Seconds per image of a student at each of its step counts against its teacher at its default steps with CFG.

Both are sampled through stock Diffusers pipeline calls (text encoding, denoising, VAE decoding;
``evaluation.pipeline_runs._call_pipe``), in one process, interleaved repeat by repeat (teacher, then each student
step count), after one warm-up call each; the reported time is the median over repeats divided by the batch size.
The teacher samples with batched classifier-free guidance as its pipeline does (one forward of a doubled batch per
step; NFE 2 per step is measured by counting backbone evaluations). The student is an exported folder
(``--student DIR``) or the recipe's freshly initialised student exported to a temporary folder (speed does not
depend on trained weights).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch

from .timing import median, timed

__all__ = ["sampling_speed", "SPEEDUP_TARGETS"]

SPEEDUP_TARGETS = {1: 60.0, 4: 20.0}
"""Minimum speedup over the teacher (default steps + CFG) per student step count (issue #8)."""


def _image_size(pipe, fallback: int | None) -> int:
    if fallback:
        return int(fallback)
    from ...evaluation.pipeline_runs import _backbone

    size = _backbone(pipe).config.sample_size
    size = size if isinstance(size, int) else size[0]
    return int(size * (getattr(pipe, "vae_scale_factor", None) or 1))


def _export_fresh(recipe, out: Path) -> Path:
    try:
        return Path(recipe.export(out))
    except NotImplementedError as exc:
        raise ValueError(f"recipe {recipe.name!r} cannot export its student ({exc}); pass an exported student "
                         f"folder with --student DIR") from exc


@torch.no_grad()
def sampling_speed(recipe, teacher_ref: str, *, student_dir: str | None, student_steps: list[int],
                   teacher_steps: int, cfg_scale: float, batch_size: int, repeats: int, image_size: int | None,
                   device: torch.device) -> dict:
    """The sampling table (see module doc) as a dict for the JSON."""
    from ...benchmarks.digits.sampling import eval_conditions
    from ...evaluation.pipeline_runs import _call_pipe, count_nfe, load_student, pipe_kind, student_kwargs
    from ...evaluation.teacher_ref import teacher_folder
    from ...models.teacher_io import load_pipeline

    if not student_steps or any(s < 1 for s in student_steps):
        raise ValueError(f"--student-steps must be positive integers, got {student_steps}")
    with tempfile.TemporaryDirectory(prefix="stepdistill-speed-student-") as tmp:
        if student_dir is None:
            folder = _export_fresh(recipe, Path(tmp) / "student")
            source = "fresh: the recipe's freshly initialised student, exported to a temporary folder (untrained)"
        else:
            folder = Path(student_dir)
            source = f"exported: {student_dir}"
        student, spec = load_student(folder, teacher_ref)
        teacher = load_pipeline(teacher_folder(teacher_ref))  # a fresh copy: no LoRA layers a recipe added
        pipes = {"teacher": teacher.to(device), "student": student.to(device)}
        for p in pipes.values():
            p.set_progress_bar_config(disable=True)
        size = _image_size(teacher, image_size)
        t_kw = {"num_inference_steps": int(teacher_steps), "guidance_scale": float(cfg_scale)}
        runs = [("teacher", teacher_steps, pipes["teacher"], t_kw)]
        runs += [("student", s, pipes["student"], student_kwargs(spec, s)) for s in student_steps]
        calls = []
        for name, steps, pipe, kw in runs:
            labels, conds = eval_conditions(SimpleNamespace(pipeline=pipe), batch_size)
            kind = pipe_kind(pipe)
            prompts = conds if kind == "prompt" else None
            calls.append((name, steps, pipe, kw, lambda p=pipe, k=kind, lab=labels, pr=prompts, kw=kw:
                          _call_pipe(p, k, lab, pr, kw, 0, size)))
        nfe = {}
        for name, steps, pipe, kw, fn in calls:  # warm-up, and the measured NFE per image
            with count_nfe(pipe) as counter:
                fn()
            nfe[(name, steps)] = counter["evals"] / batch_size
        times: dict[tuple, list[float]] = {(c[0], c[1]): [] for c in calls}
        for _ in range(repeats):
            for name, steps, pipe, kw, fn in calls:
                times[(name, steps)].append(timed(fn, device))
    spi = {k: median(v) / batch_size for k, v in times.items()}
    t_sec = spi[("teacher", teacher_steps)]
    rows = []
    for name, steps, _pipe, kw, _fn in calls:
        sec = spi[(name, steps)]
        row = {"model": name, "steps": int(steps), "nfe_per_image": nfe[(name, steps)],
               "guidance_scale": float(kw.get("guidance_scale", 1.0)), "sec_per_image": sec,
               "speedup_vs_teacher": t_sec / sec, "samples_s": times[(name, steps)]}
        if name == "student" and steps in SPEEDUP_TARGETS:
            row["target_speedup"] = SPEEDUP_TARGETS[steps]
            row["meets_target"] = row["speedup_vs_teacher"] >= SPEEDUP_TARGETS[steps]
        rows.append(row)
    return {"student_source": source, "student_scheduler": spec.scheduler, "teacher": teacher_ref,
            "teacher_steps": int(teacher_steps), "cfg_scale": float(cfg_scale), "batch_size": int(batch_size),
            "image_size": size, "repeats": int(repeats),
            "method": "stock pipeline calls (text encoder + denoiser + VAE decode), warm-up first, interleaved "
                      "repeats, median seconds per call / batch size; speedup = teacher sec/image / row sec/image",
            "rows": rows}
