"""Gradio demo entry point: ``python demo/app.py [--teacher REF] [--student DIR ...] [--port N]``.

Same as ``stepdistill demo``; the logic lives in :mod:`stepdistill.demo`.
"""

import sys

from stepdistill.demo.app import main

if __name__ == "__main__":
    sys.exit(main())
