"""The gallery tab's contents: saved sample grids from eval runs and the quality-vs-NFE figure."""

from __future__ import annotations

from pathlib import Path

from .defaults import QUALITY_FIGURE

__all__ = ["find_eval_images", "quality_figure"]

_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def quality_figure(eval_dir: str | Path) -> Path | None:
    """``eval_dir/quality_vs_nfe.png`` when it exists."""
    path = Path(eval_dir) / QUALITY_FIGURE
    return path if path.is_file() else None


def find_eval_images(eval_dir: str | Path, limit: int = 200) -> list[tuple[str, str]]:
    """``(path, caption)`` for every image under ``eval_dir`` (recursively, sorted), except the quality figure.

    The caption is the path relative to ``eval_dir``, which names the run, recipe and step count that made it.
    """
    root = Path(eval_dir)
    if not root.is_dir():
        return []
    figure = root / QUALITY_FIGURE
    found = sorted(p for p in root.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES and p.is_file() and p != figure)
    return [(str(p), str(p.relative_to(root))) for p in found[:limit]]
