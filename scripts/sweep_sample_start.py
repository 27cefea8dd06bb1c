"""Choose where a consistency student's sampler starts: domain FID per start timestep and step count.

An eps-prediction student of a linear-beta teacher is ill-conditioned at the top of the grid (alpha(999) = 0.0064:
x0 = (x - sigma eps) / alpha multiplies its eps error by 157), so its 1- and 2-step samples can improve a lot when the
sampler starts lower. This script samples an exported LCM / MLCM / sCM digits student with the stock pipeline and an
``LCMScheduler`` whose ``original_inference_steps`` makes ``set_timesteps(n)`` start at each given timestep (the
mechanism ``recipe.sample_max_timestep`` saves in the export), and scores every (start, steps) pair against the
**training** digits (1,437 images), not the held-out test split that `stepdistill eval` reports on, so choosing the
start here does not tune on the reported number. It prints a table and the start with the least mean FID over the
step counts, and writes them to ``--json``.

    python scripts/sweep_sample_start.py runs/lcm-digits-unet/export --starts 999,850,700,600,500 --steps 1,2,4,8 \\
        --json eval/results/sweeps/sample-start-lcm-unet.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from types import SimpleNamespace


def main() -> None:
    import torch
    from diffusers import LCMScheduler

    from stepdistill.benchmarks.digits.data import IMAGE_SIZE, load_split
    from stepdistill.benchmarks.digits.domain_fid import class_accuracy, default_classifier, domain_fid
    from stepdistill.benchmarks.digits.sampling import eval_conditions
    from stepdistill.evaluation.pipeline_runs import load_student, sample_rows
    from stepdistill.recipes.lcm import original_steps_starting_at

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="exported digits student folder (LCMScheduler, with stepdistill_sampling.json)")
    ap.add_argument("--starts", default="999,850,700,600,500", help="comma-separated start timesteps")
    ap.add_argument("--steps", default="1,2,4,8", help="comma-separated step counts")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, help="write the table here")
    args = ap.parse_args()
    starts = [int(s) for s in args.starts.split(",")]
    steps = [int(s) for s in args.steps.split(",")]
    if not starts or not steps or min(steps) < 1:
        raise SystemExit("--starts and --steps need at least one value each; steps must be >= 1")

    pipe, spec = load_student(args.model_dir)
    if not isinstance(pipe.scheduler, LCMScheduler):
        raise SystemExit(f"{args.model_dir}: its scheduler is {type(pipe.scheduler).__name__}; this sweep moves an "
                         f"LCMScheduler's start (LCM, MLCM and discrete-teacher sCM exports)")
    pipe.set_progress_bar_config(disable=True)
    base = dict(pipe.scheduler.config)
    total = int(base["num_train_timesteps"])
    originals = {s: original_steps_starting_at(total, s) for s in starts}  # refuse unreachable starts up front
    clf = default_classifier()
    reference = load_split("train").images
    labels, conds = eval_conditions(SimpleNamespace(pipeline=pipe), args.num_samples)
    rows = []
    for start in starts:
        pipe.scheduler = LCMScheduler.from_config(base, original_inference_steps=originals[start])
        for n in steps:
            pipe.scheduler.set_timesteps(n)
            ts = [int(t) for t in pipe.scheduler.timesteps]
            imgs, _, _ = sample_rows(pipe, labels, conds, {"guidance_scale": float(spec.guidance_scale),
                                                           "num_inference_steps": n},
                                     seed=args.seed, batch_size=250, image_size=IMAGE_SIZE, desc=f"start {start}")
            fid = float(domain_fid(imgs, reference, value_range=(0.0, 1.0), classifier=clf))
            acc = float(class_accuracy(imgs, labels, value_range=(0.0, 1.0), classifier=clf))
            rows.append({"start": start, "original_inference_steps": originals[start], "steps": n, "timesteps": ts,
                         "domain_fid_vs_train": fid, "class_accuracy": acc})
            print(f"start {start:4d}  {n} step(s) {ts}: domain FID vs train {fid:8.2f}, class accuracy {acc:.3f}",
                  flush=True)
    mean = {s: sum(r["domain_fid_vs_train"] for r in rows if r["start"] == s) / len(steps) for s in starts}
    best = min(starts, key=lambda s: mean[s])
    print(f"least mean FID over {steps} steps: start {best} ({mean[best]:.2f}); "
          + ", ".join(f"{s}: {m:.2f}" for s, m in mean.items()))
    if args.json:
        out = {"model": str(args.model_dir), "reference": "digits train split (1437 images)",
               "num_samples": args.num_samples, "seed": args.seed, "torch_threads": torch.get_num_threads(),
               "command": "python scripts/sweep_sample_start.py " + " ".join(
                   [str(args.model_dir), "--starts", args.starts, "--steps", args.steps, "--num-samples",
                    str(args.num_samples), "--seed", str(args.seed), "--json", str(args.json)]),
               "rows": rows, "mean_fid_by_start": {str(s): m for s, m in mean.items()}, "best_start": best}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
