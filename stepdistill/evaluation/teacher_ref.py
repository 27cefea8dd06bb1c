"""Teacher references (``digits:sd``, ``tiny:sd``, a folder) <-> pipeline folders, for export metadata and eval."""

from __future__ import annotations

from pathlib import Path

__all__ = ["teacher_folder", "teacher_reference"]


def teacher_reference(pipe) -> str | None:
    """A portable name for the folder ``pipe`` was loaded from: ``digits:NAME`` for a committed digits teacher,
    else the folder path (``None`` when unknown). Written into an exported student's sampling spec."""
    src = getattr(pipe, "name_or_path", None)
    if not src:
        return None
    path = Path(str(src))
    from ..benchmarks.digits.paths import ASSETS_DIR, TEACHER_NAMES

    for name in TEACHER_NAMES:
        if path.name == f"teacher_{name}" and path.resolve().parent == ASSETS_DIR.resolve():
            return f"digits:{name}"
    return str(path)


def teacher_folder(ref: str) -> Path:
    """``digits:NAME`` / ``tiny:FAMILY`` / a local pipeline folder -> the folder to load."""
    if ref.startswith("digits:"):
        from ..benchmarks.digits.paths import load_digits_teacher

        return load_digits_teacher(ref.split(":", 1)[1])
    if ref.startswith("tiny:"):
        from ..testing.tiny_pipelines import tiny_pipeline_dir

        return tiny_pipeline_dir(ref.split(":", 1)[1])
    path = Path(ref).expanduser()
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"teacher {ref!r} is not a Diffusers pipeline folder (no model_index.json); pass "
                                f"--teacher digits:sd|digits:dit|digits:unet or a local pipeline folder")
    return path
