"""The demo's command-line options, shared by ``stepdistill demo`` and ``python demo/app.py`` (no heavy imports)."""

from __future__ import annotations

import argparse

from . import defaults as D

__all__ = ["add_demo_arguments"]


def add_demo_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--teacher", default=D.DEFAULT_TEACHER,
                   help=f"teacher pipeline folder, digits:NAME or tiny:FAMILY (default: {D.DEFAULT_TEACHER})")
    p.add_argument("--student", action="append", dest="students", metavar="DIR",
                   help="exported student folder (repeatable; default: every folder matching "
                        + ", ".join(D.DEFAULT_STUDENT_GLOBS) + ")")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 to share on the network)")
    p.add_argument("--eval-dir", default=D.DEFAULT_EVAL_DIR, help="where the gallery looks for grids and figures")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "fp16", "bf16"])
    return p
