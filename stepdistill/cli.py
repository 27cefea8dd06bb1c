"""The ``stepdistill`` command.

    stepdistill train CONFIG.yaml [key=value ...]     # also: accelerate launch -m stepdistill train ...
    stepdistill export RUN_DIR OUT_DIR [key=value ...]    # sampling overrides, e.g. recipe.sample_max_timestep=600
    stepdistill sample MODEL_DIR [--prompt P ...] [--steps N] [--guidance-scale W] [--out grid.png]
    stepdistill bench toy2d --recipe NAME [--mixture FILE.json] [--steps 1,2,4] [--json OUT.json]
    stepdistill bench speed --recipe NAME --model DIR [--config RECIPE.yaml] [--batch-size B] [--student-steps 1,2,4]
                            [--teacher-steps 50] [--cfg 3.0] [--repeats N] [--threads 1] [--json OUT.json]
    stepdistill eval MODEL_DIR --suite digits [--teacher digits:sd|DIR] [--steps 1,2,4] [--json OUT.json]
    stepdistill demo [--teacher REF] [--student DIR ...] [--port N]

Errors the user can fix (bad config keys, missing teacher files, corrupt checkpoints) are printed as one clear
message with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["main", "build_parser"]


def _cmd_train(args) -> int:
    from .config import load_config
    from .runner import run_training

    cfg = load_config(args.config, args.overrides)  # validated before any model loads
    run_dir = run_training(cfg, export=not args.no_export)
    print(f"run finished: {run_dir}")
    return 0


def _cmd_export(args) -> int:
    from .runner import export_run

    out = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint, overrides=args.overrides)
    print(f"exported to {out}; load it with DiffusionPipeline.from_pretrained({str(out)!r})")
    return 0


def _cmd_sample(args) -> int:
    import torch
    from torchvision.utils import save_image

    from .export import read_sampling_spec
    from .models.teacher_io import load_pipeline

    pipe = load_pipeline(args.model_dir)
    spec = read_sampling_spec(args.model_dir)
    if (Path(args.model_dir) / "pytorch_lora_weights.safetensors").exists():
        pipe.load_lora_weights(args.model_dir)
    kw = spec.call_kwargs() if spec else {"num_inference_steps": 50}
    if args.steps is not None:
        kw.pop("timesteps", None)
        kw["num_inference_steps"] = args.steps
    if args.guidance_scale is not None:
        kw["guidance_scale"] = args.guidance_scale
    if args.class_labels:
        kw["class_labels"] = [int(c) for c in args.class_labels]
        kw.pop("guidance_scale", None) if spec is None else None
    else:
        prompts = list(args.prompt or [])
        if not prompts or any(not p.strip() for p in prompts):
            raise ValueError("give at least one non-empty --prompt (or --class-labels for class-conditional models)")
        kw["prompt"] = prompts
        kw["num_images_per_prompt"] = args.num
    out = pipe(generator=torch.Generator().manual_seed(args.seed), output_type="pt", **kw).images
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    save_image(out, args.out, nrow=max(1, int(len(out) ** 0.5)))
    print(f"wrote {len(out)} images to {args.out} ({kw})")
    return 0


def _cmd_bench_speed(args) -> int:
    from .benchmarks.speed import run_speed_bench

    if not args.model:
        raise ValueError("bench speed needs --model (a Diffusers pipeline folder, digits:sd|digits:dit|digits:unet, "
                         "or tiny:sd)")
    try:
        student_steps = [int(s) for s in args.student_steps.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--student-steps must be comma-separated integers, got {args.student_steps!r}") from None
    result = run_speed_bench(
        recipe=args.recipe, model=args.model, config=args.config, student=args.student, batch_size=args.batch_size,
        student_steps=student_steps, teacher_steps=args.teacher_steps, cfg=args.cfg, repeats=args.repeats,
        warmup=args.warmup, threads=args.threads, at_step=args.at_step, sample_batch_size=args.sample_batch_size,
        overrides=args.set or [], no_sampling=args.no_sampling, json_path=args.json)
    print(json.dumps(result, indent=2))
    return 0


def _cmd_bench(args) -> int:
    if args.suite == "speed":
        return _cmd_bench_speed(args)
    if args.suite != "toy2d":
        raise ValueError(f"unknown bench suite {args.suite!r}; available: toy2d, speed")
    from .benchmarks.toy2d.bench import run_toy2d_bench

    kw = {"recipe": args.recipe, "mixture": args.mixture, "steps": [int(s) for s in args.steps.split(",")],
          "seed": args.seed}
    if args.train_steps is not None:
        kw["train_steps"] = args.train_steps
    from .config import parse_override

    overrides = dict(parse_override(text) for text in (args.set or []))  # recipe.KEY / train.KEY / bench keys
    result = run_toy2d_bench(**kw, **overrides)
    import shlex

    cmd = ["stepdistill", "bench", "toy2d", "--recipe", args.recipe, "--mixture", args.mixture, "--steps", args.steps,
           "--seed", str(args.seed)]
    cmd += ["--train-steps", str(args.train_steps)] if args.train_steps is not None else []
    for text in args.set or []:
        cmd += ["--set", text]
    cmd += ["--json", args.json] if args.json else []
    result.setdefault("command", shlex.join(cmd))  # rendered by scripts/write_results.py
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
    return 0


def _cmd_demo(args) -> int:
    from .demo.app import run_from_args

    return run_from_args(args)


def _cmd_eval(args) -> int:
    steps = [int(s) for s in args.steps.split(",") if s.strip()]
    if args.suite == "coco-prompts":
        from .evaluation.prompts_eval import run_prompts_eval

        if not args.prompts or not args.reference:
            raise ValueError("--suite coco-prompts needs --prompts FILE (captions, one per line or COCO captions "
                             "JSON) and --reference DIR (real images for FID)")
        result = run_prompts_eval(args.model_dir, steps=steps, prompts=args.prompts, reference=args.reference,
                                  json_path=args.json, teacher=args.teacher, num_samples=args.num_samples,
                                  num_reference=args.num_reference, inception=args.inception, clip=args.clip,
                                  clip_backbone=args.clip_backbone, teacher_steps=args.teacher_steps,
                                  teacher_guidance=args.teacher_guidance, batch_size=args.batch_size, seed=args.seed,
                                  fid_features=args.fid_features)
        print(json.dumps(result, indent=2))
        return 0
    if args.suite != "digits":
        raise ValueError(f"unknown eval suite {args.suite!r}; available: digits, coco-prompts (toy2d results come "
                         f"from `stepdistill bench toy2d`)")
    from .evaluation.digits_eval import run_digits_eval

    classifier = None
    if args.classifier:
        from .benchmarks.digits.classifier import load_classifier

        classifier = load_classifier(args.classifier)
    result = run_digits_eval(args.model_dir, steps=steps,
                             json_path=args.json, teacher=args.teacher, num_samples=args.num_samples,
                             teacher_steps=args.teacher_steps, teacher_guidance=args.teacher_guidance,
                             classifier=classifier, classifier_source=args.classifier, batch_size=args.batch_size,
                             seed=args.seed)
    print(json.dumps(result, indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stepdistill", description="Distill diffusion models into few-step students.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a recipe from a YAML config",
                       description="Train a recipe. Overrides are dotted key=value pairs, e.g. train.lr=1e-5.")
    t.add_argument("config", help="YAML run config (see recipes/)")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.max_steps=100 recipe.variant=lora")
    t.add_argument("--no-export", action="store_true", help="skip the Diffusers export at the end")
    t.set_defaults(fn=_cmd_train)

    e = sub.add_parser("export", help="export a run's newest checkpoint as a Diffusers folder")
    e.add_argument("run_dir")
    e.add_argument("out_dir")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the run's saved config for this export, for "
                   "sampling options, e.g. recipe.sample_max_timestep=600 or recipe.t_max=1.43")
    e.add_argument("--checkpoint", help="a specific checkpoint folder (default: the newest complete one)")
    e.set_defaults(fn=_cmd_export)

    s = sub.add_parser("sample", help="sample an exported student (or any Diffusers folder) into an image grid")
    s.add_argument("model_dir")
    s.add_argument("--prompt", action="append", help="prompt (repeatable)")
    s.add_argument("--class-labels", nargs="*", help="class labels for class-conditional models")
    s.add_argument("--num", type=int, default=4, help="images per prompt")
    s.add_argument("--steps", type=int, help="override the exported step count")
    s.add_argument("--guidance-scale", type=float, help="override the exported guidance scale")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", default="samples.png")
    s.set_defaults(fn=_cmd_sample)

    b = sub.add_parser("bench", help="benchmark a recipe on a built-in suite")
    b.add_argument("suite", choices=["toy2d", "speed"])
    b.add_argument("--recipe", required=True)
    b.add_argument("--mixture", default="ring8", help="bundled mixture name or a JSON file")
    b.add_argument("--steps", default="1,2,4,8", help="comma-separated student step counts")
    b.add_argument("--train-steps", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="write the result JSON here")
    sp = b.add_argument_group("speed", "options of `bench speed` (training-update overhead, memory, sampling speedup)")
    sp.add_argument("--model", help="teacher: a Diffusers pipeline folder, digits:sd|digits:dit|digits:unet or tiny:sd")
    sp.add_argument("--config", help="recipe run config YAML (e.g. recipes/lcm/tiny-sd.yaml); default: recipe defaults")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="config override (repeatable; toy2d too: recipe.KEY, train.KEY or guidance_scale)")
    sp.add_argument("--student", help="exported student folder to time sampling (default: the fresh recipe student)")
    sp.add_argument("--batch-size", type=int, help="training batch size (data.batch_size)")
    sp.add_argument("--student-steps", default="1,2,4", help="comma-separated student sampling step counts")
    sp.add_argument("--teacher-steps", type=int, default=50, help="teacher sampling steps (with CFG)")
    sp.add_argument("--cfg", type=float, default=3.0, help="teacher CFG scale")
    sp.add_argument("--repeats", type=int, default=5, help="timed rounds (medians are reported)")
    sp.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    sp.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (0 = leave as is)")
    sp.add_argument("--at-step", type=int, default=0, help="pin the loop step (update kind: DMD2 5:1, PD rounds)")
    sp.add_argument("--sample-batch-size", type=int, help="images per sampling call (default: the batch size)")
    sp.add_argument("--no-sampling", action="store_true", help="skip the sampling-speed table")
    b.set_defaults(fn=_cmd_bench)

    from .demo.args import add_demo_arguments  # torch and gradio load only when the demo runs

    d = sub.add_parser("demo", help="Gradio demo: the teacher and its students side by side from the same seed")
    add_demo_arguments(d)
    d.set_defaults(fn=_cmd_demo)

    v = sub.add_parser("eval", help="evaluate an exported student against its teacher and training-free solvers")
    v.add_argument("model_dir", help="exported student folder (with stepdistill_sampling.json)")
    v.add_argument("--suite", default="digits", choices=["digits", "coco-prompts"],
                   help="digits: domain FID + class accuracy on the bundled digits; coco-prompts: FID/KID + CLIP "
                        "score of a text-to-image student on your caption file and reference images")
    v.add_argument("--teacher", help="digits:sd|digits:dit|digits:unet or a pipeline folder (default: the teacher "
                                     "named in the student's stepdistill_sampling.json)")
    v.add_argument("--steps", default="1,2,4", help="comma-separated student step counts")
    v.add_argument("--num-samples", type=int, default=1000)
    v.add_argument("--teacher-steps", type=int, help="teacher baseline steps (default: 50)")
    v.add_argument("--teacher-guidance", type=float, help="teacher CFG scale (digits default: 3.0, coco-prompts: 7.5)")
    v.add_argument("--classifier", help="digit classifier folder (default: the committed one)")
    v.add_argument("--prompts", help="coco-prompts: caption file (.txt one per line, COCO captions JSON, or a JSON "
                                     "list of strings)")
    v.add_argument("--reference", help="coco-prompts: folder of real reference images for FID/KID")
    v.add_argument("--num-reference", type=int, help="coco-prompts: use only the first N reference images")
    v.add_argument("--inception", help="coco-prompts: Inception weights file (default: searched locally; see "
                                       "stepdistill.evaluation.fid)")
    v.add_argument("--clip", help="coco-prompts: open_clip weights (file or local-dir folder; or "
                                  "$STEPDISTILL_CLIP_WEIGHTS)")
    v.add_argument("--clip-backbone", help="coco-prompts: open_clip architecture of a --clip file, e.g. ViT-L-14")
    v.add_argument("--fid-features", type=int, default=2048, choices=[64, 192, 768, 2048],
                   help="coco-prompts: Inception feature size; only 2048 is comparable to published FIDs")
    v.add_argument("--batch-size", type=int, default=250)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--json", help="write the result JSON here (sample grids go next to it)")
    v.set_defaults(fn=_cmd_eval)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .config import ConfigError
    from .models.teacher_io import TeacherLoadError

    user_errors: tuple[type[BaseException], ...] = (ConfigError, TeacherLoadError, FileNotFoundError, ValueError)
    try:
        from .training.checkpoint import CheckpointError

        user_errors += (CheckpointError,)
    except ImportError:
        pass
    try:
        return args.fn(args)
    except user_errors as exc:
        print(f"stepdistill {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
