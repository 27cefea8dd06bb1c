#!/usr/bin/env bash
# The main job on the bundled defaults: set up, distill the bundled teachers, evaluate, write eval/RESULTS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p eval/results
# 1. toy2d: the analytic Gaussian-mixture teacher (exact denoiser), LCM student at 1/2/4/8 steps vs the guided teacher.
.venv/bin/stepdistill bench toy2d --recipe lcm --mixture ring8 --steps 1,2,4,8 --json eval/results/toy2d-lcm-ring8.json
.venv/bin/stepdistill bench toy2d --recipe lcm --mixture grid25 --steps 1,2,4,8 --json eval/results/toy2d-lcm-grid25.json
# 2. the comparison table, written from the JSON results.
.venv/bin/python scripts/write_results.py
echo "wrote eval/RESULTS.md"
