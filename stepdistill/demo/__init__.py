"""The Gradio demo (``stepdistill demo`` / ``python demo/app.py``): teacher and students side by side.

``models`` loads and samples (no Gradio), ``gallery`` finds eval outputs, ``app`` builds the UI, ``args`` the
command-line options, ``defaults`` the default model paths and control ranges. Importing this package is cheap; torch
and gradio load when the app is built.
"""

__all__ = ["DemoApp", "build_demo", "launch_demo", "main", "DemoModelError", "ModelCache"]


def __getattr__(name):
    if name in ("DemoApp", "build_demo", "launch_demo", "main"):
        from . import app

        return getattr(app, name)
    if name in ("DemoModelError", "ModelCache"):
        from . import models

        return getattr(models, name)
    raise AttributeError(name)
