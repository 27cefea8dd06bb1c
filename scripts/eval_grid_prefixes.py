"""Domain FID of a multi-step digits student when its timestep grid is cut after 1, 2, ... steps.

Diagnostic for re-noising samplers (DMD2 backward simulation, spec B.8): shows whether each extra step refines the
sample or degrades it. Uses the stock pipeline of the export (its saved scheduler, ``timesteps=`` prefixes of the
grid in ``stepdistill_sampling.json``), 1000 samples with the digits eval's conditions and seed, no CFG.

    python scripts/eval_grid_prefixes.py runs/dmd2-digits-sd-4step/export            # every prefix of the grid
    python scripts/eval_grid_prefixes.py runs/dmd2-digits-sd/export 999               # explicit grids
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from stepdistill.benchmarks.digits.data import IMAGE_SIZE
from stepdistill.benchmarks.digits.domain_fid import class_accuracy, default_classifier, domain_fid
from stepdistill.benchmarks.digits.sampling import eval_conditions
from stepdistill.evaluation.pipeline_runs import load_student, sample_rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", help="exported student folder (with stepdistill_sampling.json)")
    ap.add_argument("grids", nargs="*", help="comma-separated timestep grids (default: every prefix of the export's)")
    ap.add_argument("--num-samples", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    pipe, spec = load_student(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    grids = [[int(x) for x in g.split(",")] for g in args.grids]
    if not grids:
        if not spec.timesteps:
            raise SystemExit(f"{args.model_dir}: its stepdistill_sampling.json has no timestep grid; pass grids")
        grids = [list(spec.timesteps[:k]) for k in range(1, len(spec.timesteps) + 1)]
    clf = default_classifier()
    labels, conds = eval_conditions(SimpleNamespace(pipeline=pipe), args.num_samples)
    for ts in grids:
        imgs, _, _ = sample_rows(pipe, labels, conds, {"guidance_scale": float(spec.guidance_scale), "timesteps": ts},
                                 seed=args.seed, batch_size=250, image_size=IMAGE_SIZE, desc=str(ts))
        fid = domain_fid(imgs, None, value_range=(0.0, 1.0), classifier=clf)
        acc = class_accuracy(imgs, labels, value_range=(0.0, 1.0), classifier=clf)
        print(f"timesteps {ts}: domain FID {fid:.2f}, class accuracy {acc:.3f}", flush=True)


if __name__ == "__main__":
    main()
