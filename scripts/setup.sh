#!/usr/bin/env bash
# Create .venv and install stepdistill with its test extras (torch 2.14.1 / torchvision 0.29.1 pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
# Debian's Chromium for the demo's browser test (tests/test_demo.py drives it with playwright; no browser download).
# Best effort: without apt-get (or root) setup continues and that test fails with a message saying what to install.
if ! command -v chromium >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null 2>&1 && { [ -z "$SUDO" ] || command -v sudo >/dev/null 2>&1; }; then
    { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } \
      >/dev/null 2>&1 || echo "setup.sh: could not install chromium with apt-get; the browser test will fail" >&2
  else
    echo "setup.sh: chromium not found and apt-get unavailable; install Chromium for the browser test" >&2
  fi
fi
