"""The demo's default models and limits, in one place.

With no arguments the demo shows the bundled digits teacher (``digits:sd``, built by
``scripts/build_digits_assets.py``) next to every student the README's main command exported for it
(``runs/<recipe>-digits-sd/export`` as written by ``stepdistill train recipes/<recipe>/digits-sd.yaml``).
Relative paths are resolved against the current working directory (run the demo from the repository root).
"""

from __future__ import annotations

__all__ = [
    "DEFAULT_TEACHER",
    "DEFAULT_STUDENT_GLOBS",
    "DEFAULT_EVAL_DIR",
    "QUALITY_FIGURE",
    "DEFAULT_PROMPT",
    "DEFAULT_TEACHER_STEPS",
    "DEFAULT_TEACHER_GUIDANCE",
    "TEACHER_STEPS_RANGE",
    "STUDENT_STEPS_RANGE",
    "GUIDANCE_RANGE",
    "SEED_RANGE",
    "DISPLAY_MIN_SIZE",
    "MAKE_STUDENTS_HINT",
]

DEFAULT_TEACHER = "digits:sd"
# Exported students of the digits teacher (one per recipe config recipes/<recipe>/digits-sd.yaml).
DEFAULT_STUDENT_GLOBS = ("runs/*digits-sd*/export",)
DEFAULT_EVAL_DIR = "eval"
QUALITY_FIGURE = "quality_vs_nfe.png"  # under DEFAULT_EVAL_DIR, written by scripts/write_results.py

DEFAULT_PROMPT = "a handwritten digit 3"
DEFAULT_TEACHER_STEPS = 50  # the eval harness's digits teacher baseline
DEFAULT_TEACHER_GUIDANCE = 3.0

TEACHER_STEPS_RANGE = (1, 200)
STUDENT_STEPS_RANGE = (0, 50)  # 0 = the step count / timesteps stored in the student's stepdistill_sampling.json
GUIDANCE_RANGE = (0.0, 20.0)  # for students 0 = the exported guidance scale
SEED_RANGE = (0, 2**31 - 1)

DISPLAY_MIN_SIZE = 256  # small images (16 px digits) are upscaled with nearest-neighbour for display only

MAKE_STUDENTS_HINT = (
    "train and export one with `stepdistill train recipes/lcm/digits-sd.yaml` (or `bash scripts/main.sh`), "
    "or pass `--student DIR` (an exported stepdistill folder)"
)
