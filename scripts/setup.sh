#!/usr/bin/env bash
# Create .venv and install stepdistill with its test extras (torch 2.14.1 / torchvision 0.29.1 pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
