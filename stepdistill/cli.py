"""The ``stepdistill`` command.

    stepdistill train CONFIG.yaml [key=value ...]     # also: accelerate launch -m stepdistill train ...
    stepdistill export RUN_DIR OUT_DIR
    stepdistill sample MODEL_DIR [--prompt P ...] [--steps N] [--guidance-scale W] [--out grid.png]
    stepdistill bench toy2d --recipe NAME [--mixture FILE.json] [--steps 1,2,4] [--json OUT.json]

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

    out = export_run(args.run_dir, args.out_dir, checkpoint=args.checkpoint)
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


def _cmd_bench(args) -> int:
    if args.suite != "toy2d":
        raise ValueError(f"unknown bench suite {args.suite!r}; available: toy2d")
    from .benchmarks.toy2d.bench import run_toy2d_bench

    kw = {"recipe": args.recipe, "mixture": args.mixture, "steps": [int(s) for s in args.steps.split(",")],
          "seed": args.seed}
    if args.train_steps is not None:
        kw["train_steps"] = args.train_steps
    result = run_toy2d_bench(**kw)
    text = json.dumps(result, indent=2)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(text)
    print(text)
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
    b.add_argument("suite", choices=["toy2d"])
    b.add_argument("--recipe", required=True)
    b.add_argument("--mixture", default="ring8", help="bundled mixture name or a JSON file")
    b.add_argument("--steps", default="1,2,4,8", help="comma-separated student step counts")
    b.add_argument("--train-steps", type=int)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--json", help="write the result JSON here")
    b.set_defaults(fn=_cmd_bench)
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
