"""Build tiny, randomly initialised Diffusers pipelines (one folder per family), fully offline.

Usage::

    python scripts/build_tiny_pipelines.py --out DIR [--families sd,sdxl,...] [--seed 0]
        [--prediction-type epsilon|v_prediction] [--scheduler ddim|ddpm|euler|dpmsolver]
        [--time-cond-proj-dim N] [--check]

Each family lands in ``DIR/<family>`` and loads with ``diffusers.DiffusionPipeline.from_pretrained``.
``--prediction-type``, ``--scheduler`` and ``--time-cond-proj-dim`` apply to the families that accept
them (see ``stepdistill.testing.tiny_pipelines``); ``--check`` reloads every folder and samples two
steps at the tiny size.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from stepdistill.testing.tiny_pipelines import (
    FAMILIES,
    build_tiny_pipeline,
    tiny_backbone_config,
    tiny_call_kwargs,
    tiny_family,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="folder to write <family>/ subfolders into")
    parser.add_argument(
        "--families",
        default=",".join(FAMILIES),
        help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=None)
    parser.add_argument("--scheduler", choices=("ddim", "ddpm", "euler", "dpmsolver"), default=None)
    parser.add_argument("--time-cond-proj-dim", type=int, default=None, help="UNet guidance-embedding width (sd, sdxl)")
    parser.add_argument("--check", action="store_true", help="reload each pipeline and sample 2 steps")
    args = parser.parse_args(argv)
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in families if f not in FAMILIES]
    if unknown or not families:
        parser.error(f"--families: unknown {unknown or '(empty)'}; choose from {','.join(FAMILIES)}")
    args.families = families
    return args


def family_options(family: str, args: argparse.Namespace) -> dict:
    """The subset of the command-line options that ``family`` accepts (the others do not apply to it)."""
    spec = tiny_family(family)
    options = {}
    if args.prediction_type is not None and args.prediction_type in spec.prediction_types:
        options["prediction_type"] = args.prediction_type
    if args.scheduler is not None and args.scheduler in spec.schedulers:
        options["scheduler"] = args.scheduler
    if args.time_cond_proj_dim is not None and "time_cond_proj_dim" in tiny_backbone_config(family):
        options["time_cond_proj_dim"] = args.time_cond_proj_dim
    return options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    for family in args.families:
        options = family_options(family, args)
        folder = build_tiny_pipeline(family, args.out / family, seed=args.seed, **options)
        size_mb = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20
        line = f"{family:13s} -> {folder} ({size_mb:.2f} MiB)"
        if args.check:
            from diffusers import DiffusionPipeline

            pipe = DiffusionPipeline.from_pretrained(folder)
            pipe.set_progress_bar_config(disable=True)
            images = pipe(**tiny_call_kwargs(family), num_inference_steps=2, output_type="np").images
            line += f", sampled {tuple(images.shape)} with {type(pipe).__name__}"
        print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
