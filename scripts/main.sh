#!/usr/bin/env bash
# The main job on the bundled defaults: set up, distill the bundled teachers, evaluate, write eval/RESULTS.md.
#   bash scripts/main.sh            toy2d (minutes) + digits LCM (about 10 min on 2 CPU cores)
#   SKIP_DIGITS=1 bash scripts/main.sh   toy2d only
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p eval/results
# 1. toy2d: the analytic Gaussian-mixture teacher (exact denoiser), LCM student at 1/2/4/8 steps vs the guided teacher.
.venv/bin/stepdistill bench toy2d --recipe lcm --mixture ring8 --steps 1,2,4,8 --json eval/results/toy2d-lcm-ring8.json
.venv/bin/stepdistill bench toy2d --recipe lcm --mixture grid25 --steps 1,2,4,8 --json eval/results/toy2d-lcm-grid25.json
# 2. digits: distill the bundled prompt-conditioned digits teacher (StableDiffusionPipeline-shaped) with LCM, then
#    evaluate the exported student against the teacher at 50 steps with CFG and DPM-Solver++/DDIM at the same NFE.
#    The student lands in runs/lcm-digits-sd/export, where `stepdistill demo` finds it.
if [ "${SKIP_DIGITS:-0}" != "1" ]; then
  .venv/bin/stepdistill train recipes/lcm/digits-sd.yaml
  .venv/bin/stepdistill eval runs/lcm-digits-sd/export --suite digits --steps 1,2,4 --json eval/results/digits-lcm-sd.json
fi
# 3. the comparison table and the quality-vs-NFE figure, written from the JSON results.
.venv/bin/python scripts/write_results.py
echo "wrote eval/RESULTS.md; see the students side by side with: .venv/bin/stepdistill demo"
