"""``stepdistill eval MODEL_DIR --suite coco-prompts``: a text-to-image student against its teacher on a prompt set.

The standard few-step text-to-image protocol (e.g. "zero-shot FID on MS-COCO" in LCM, DMD2, SwiftBrush):

* prompts: the caption file the user supplies (``--prompts``): a text file with one prompt per line, a COCO captions
  JSON (``{"annotations": [{"caption": ...}, ...]}``, as ``captions_val2014.json``) or a JSON list of strings. The
  first ``N`` prompts in file order are used (cycled when the file has fewer than ``N``; the number of distinct
  prompts is recorded). Nothing is bundled: COCO captions and images are not downloadable here.
* reference images (``--reference``): a folder of real images (e.g. COCO val2014); each is centre-cropped to a square
  and resized (bicubic, antialiased) to the generated resolution, then kept as uint8. The first ``M`` files in sorted
  order are used; the count is recorded, since FID depends on it.
* rows, all sampled in one process with the same seeds and prompts: the teacher at its default steps with CFG
  (SD: 50 steps, w = 7.5), the student at each requested step count (its ``stepdistill_sampling.json``), and
  DPM-Solver++(2M) and DDIM at the student's NFE (:mod:`.pipeline_runs`).
* metrics per row: NFE per image (counted), seconds per image and the speedup over the teacher, FID and KID against
  the reference (:mod:`.fid`: torch-fidelity's Inception, local weights, float64 statistics) and CLIP score against
  the row's own prompts (:mod:`.clip_score`: open_clip, local weights, 100 x cosine).

Missing weights or inputs raise before any sampling starts, so a long run never dies at the metric stage.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .pipeline_runs import (SOLVERS, eval_command_line, evaluate_rows, load_student, resolve_teacher_ref, sample_rows, save_grid,
                            student_kwargs, warm_up)

__all__ = ["PromptsEvalRow", "load_prompts", "load_reference_images", "run_prompts_eval"]

PROMPTS_TEACHER_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 7.5}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CLIP_ENV_VAR = "STEPDISTILL_CLIP_WEIGHTS"


@dataclass
class PromptsEvalRow:
    name: str
    kind: str  # "student" | "teacher" | "solver"
    solver: str
    steps: int
    nfe: float
    sec_per_image: float
    speedup_vs_teacher: float | None
    fid: float
    kid_mean: float | None
    kid_std: float | None
    clip_score: float
    guidance_scale: float
    grid: str | None = None


def load_prompts(path: str | os.PathLike, n: int) -> tuple[list[str], int]:
    """``n`` prompts from ``path`` (see module doc) and the number of distinct prompts the file holds."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist; pass --prompts with a text file (one prompt per "
                                f"line) or a COCO captions JSON such as annotations/captions_val2014.json")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"prompt file {path} is not valid JSON ({e}); use a COCO captions JSON, a JSON list of "
                             f"strings, or a .txt file with one prompt per line") from e
        if isinstance(data, dict) and isinstance(data.get("annotations"), list):
            prompts = [str(a.get("caption", "")) for a in data["annotations"] if isinstance(a, dict)]
        elif isinstance(data, list) and all(isinstance(p, str) for p in data):
            prompts = list(data)
        else:
            raise ValueError(f"prompt file {path}: expected a COCO captions JSON ({{'annotations': [{{'caption': "
                             f"...}}]}}) or a JSON list of strings")
    else:
        prompts = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    prompts = [" ".join(p.split()) for p in prompts]
    prompts = [p for p in prompts if p]
    if not prompts:
        raise ValueError(f"prompt file {path} has no prompts (only blank or '#' lines); put one prompt per line")
    if n < 1:
        raise ValueError(f"--num-samples must be at least 1, got {n}")
    return [prompts[i % len(prompts)] for i in range(n)], len(prompts)


def load_reference_images(folder: str | os.PathLike, size: int, max_images: int | None = None) -> torch.Tensor:
    """Real images from ``folder`` as uint8 ``(M, 3, size, size)``: centre square crop, bicubic resize."""
    from PIL import Image

    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"reference folder {folder} does not exist; pass --reference with a folder of real "
                                f"images (e.g. COCO val2014), which FID compares the samples against")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if max_images is not None:
        files = files[:max_images]
    if len(files) < 2:
        raise ValueError(f"reference folder {folder} holds {len(files)} image(s) ({', '.join(IMAGE_SUFFIXES)}); FID "
                         f"needs at least 2 (the usual protocol uses thousands)")
    out = torch.empty((len(files), 3, size, size), dtype=torch.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as im:
                im = im.convert("RGB")
                w, h = im.size
                s = min(w, h)
                im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
                im = im.resize((size, size), Image.Resampling.BICUBIC)
                out[i] = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(size, size, 3).permute(
                    2, 0, 1)
        except OSError as e:
            raise ValueError(f"reference image {f} cannot be read ({e}); remove it or replace it") from e
    return out


def _resolve_clip(clip_weights: str | None) -> str:
    weights = clip_weights or os.environ.get(CLIP_ENV_VAR)
    if not weights:
        raise ValueError(f"the coco-prompts suite needs CLIP weights for the CLIP score: pass --clip with a local "
                         f"open_clip checkpoint (plus --clip-backbone, e.g. ViT-L-14) or an open_clip local-dir "
                         f"folder, or set ${CLIP_ENV_VAR}. Nothing is downloaded.")
    return weights


def _command(model_dir, *, teacher, steps, num_samples, prompts, reference, inception, clip, clip_backbone,
             teacher_steps, teacher_guidance, seed, batch_size, json_path, fid_features=2048) -> str:
    return eval_command_line(
        model_dir, "coco-prompts", teacher=teacher, steps=steps, num_samples=num_samples, seed=seed,
        batch_size=batch_size, json_path=json_path, suite_args=(("--prompts", prompts), ("--reference", reference)),
        options=(("--inception", inception), ("--clip", clip), ("--clip-backbone", clip_backbone),
                 ("--teacher-steps", teacher_steps), ("--teacher-guidance", teacher_guidance),
                 ("--fid-features", fid_features if fid_features != 2048 else None)))


@torch.no_grad()
def run_prompts_eval(model_dir: str | Path, *, steps: list[int], prompts: str | Path, reference: str | Path,
                     json_path: str | Path | None = None, teacher: str | None = None, num_samples: int = 1000,
                     num_reference: int | None = None, inception: str | None = None, clip: str | None = None,
                     clip_backbone: str | None = None, teacher_steps: int | None = None,
                     teacher_guidance: float | None = None, batch_size: int = 8, seed: int = 0,
                     solvers: tuple[str, ...] = tuple(SOLVERS), kid_subsets: int = 100,
                     fid_features: int = 2048) -> dict:
    """Run the prompt-set evaluation (module doc); returns the result and writes it to ``json_path``.

    ``fid_features`` other than 2048 (64 / 192 / 768: earlier Inception blocks) make quick runs cheaper but are not
    comparable to published FIDs; the JSON records which was used.
    """
    from ..models.teacher_io import load_pipeline
    from .clip_score import clip_score, load_clip
    from .fid import compute_fid_kid, inception_features, load_inception
    from .teacher_ref import teacher_folder

    steps = sorted({int(s) for s in steps})
    if not steps or steps[0] < 1:
        raise ValueError(f"--steps must be positive integers, got {steps}")
    if num_samples < 2:
        raise ValueError(f"--num-samples must be at least 2 (FID needs 2 samples), got {num_samples}")
    unknown = [s for s in solvers if s not in SOLVERS]
    if unknown:
        raise ValueError(f"unknown solvers {unknown}; available: {sorted(SOLVERS)}")
    command = _command(model_dir, teacher=teacher, steps=steps, num_samples=num_samples, prompts=prompts,
                       reference=reference, inception=inception, clip=clip, clip_backbone=clip_backbone,
                       teacher_steps=teacher_steps, teacher_guidance=teacher_guidance, seed=seed,
                       batch_size=batch_size, json_path=json_path, fid_features=fid_features)
    # Everything that can be missing is checked before the first sample is drawn.
    prompt_list, distinct = load_prompts(prompts, num_samples)
    extractor = load_inception(inception, features=fid_features)
    scorer = load_clip(_resolve_clip(clip), clip_backbone)
    student, spec = load_student(model_dir, teacher)
    teacher_ref = resolve_teacher_ref(spec, teacher)
    tpipe = load_pipeline(teacher_folder(teacher_ref))
    for p in (student, tpipe):
        p.set_progress_bar_config(disable=True)
        if getattr(p, "text_encoder", None) is None:
            raise ValueError(f"{type(p).__name__} takes no prompts; the coco-prompts suite is for text-to-image "
                             f"pipelines (use --suite digits for class-conditional digits models)")
    size = int(tpipe.unet.config.sample_size * tpipe.vae_scale_factor) if hasattr(tpipe, "unet") else None
    if size is None:
        size = int(tpipe.transformer.config.sample_size * tpipe.vae_scale_factor)
    ref_images = load_reference_images(reference, size, num_reference)
    labels = torch.zeros(num_samples, dtype=torch.long)  # unused by prompt pipelines; keeps one sampling API
    t_kw = {"num_inference_steps": int(teacher_steps or PROMPTS_TEACHER_DEFAULTS["num_inference_steps"]),
            "guidance_scale": float(PROMPTS_TEACHER_DEFAULTS["guidance_scale"] if teacher_guidance is None
                                    else teacher_guidance)}
    out_dir = Path(json_path).parent if json_path else None
    grid_dir_name = f"{Path(json_path).stem}-samples" if json_path else None
    reference_name = f"{ref_images.shape[0]} images from {reference} (centre crop, bicubic {size}x{size})"
    ref_features = inception_features(ref_images, extractor)  # once, shared by every row

    def measure(name, kind, solver, pipe, kw, slug) -> PromptsEvalRow:
        n_steps = int(kw["num_inference_steps"]) if "num_inference_steps" in kw else len(kw["timesteps"])
        imgs, spi, nfe = sample_rows(pipe, labels, prompt_list, kw, seed=seed, batch_size=batch_size,
                                     image_size=size, desc=f"{name} {n_steps} steps")
        grid = None
        if out_dir is not None:
            grid = f"{grid_dir_name}/{slug}.png"
            save_grid(imgs, out_dir / grid)
        fk = compute_fid_kid(imgs, ref_images, reference_name=reference_name, extractor=extractor,
                             kid_subsets=kid_subsets, seed=seed, reference_features=ref_features)
        cs = clip_score(imgs, prompt_list, scorer)
        return PromptsEvalRow(name=name, kind=kind, solver=solver, steps=n_steps, nfe=round(nfe, 4),
                              sec_per_image=spi, speedup_vs_teacher=None, fid=fk["fid"], kid_mean=fk.get("kid_mean"),
                              kid_std=fk.get("kid_std"), clip_score=cs["clip_score"],
                              guidance_scale=float(kw.get("guidance_scale", 1.0)), grid=grid)

    warm_up(tpipe, labels, prompt_list, t_kw, size)
    warm_up(student, labels, prompt_list, student_kwargs(spec, 1), size)
    rows = evaluate_rows(tpipe, student, spec, t_kw, steps, solvers, measure)
    result = {
        "suite": "coco-prompts", "model": str(model_dir), "recipe": spec.recipe, "variant": spec.variant,
        "teacher": teacher_ref, "num_samples": int(num_samples), "prompts": str(prompts),
        "distinct_prompts": int(distinct), "reference": reference_name, "num_reference": int(ref_images.shape[0]),
        "image_size": size, "feature_extractor": extractor.describe(),
        "clip": {"backbone": scorer.backbone, "weights": scorer.weights, "scale": "100 * max(cos, 0)"},
        "teacher_defaults": t_kw, "seed": seed, "torch_threads": torch.get_num_threads(), "command": command,
        "rows": [asdict(r) for r in rows],
    }
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result
