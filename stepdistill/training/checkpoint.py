"""Training checkpoints: atomic, verifiable, and free of pickles.

Layout of ``<run_dir>/checkpoints/step-0001000/``::

    recipe_state.safetensors   # recipe.state_dict_for_checkpoint(), keys "group.key"
    ema.safetensors            # evaluation EMA, keys "module.param"
    optimizers.safetensors     # optimizer/scheduler/scaler tensors (Adam moments, step counts)
    optimizers.json            # ... and their non-tensor remainder (param groups, lr-scheduler counters)
    rng_rank0.safetensors      # torch CPU/CUDA and numpy RNG states of rank 0 (one pair per process)
    rng_rank0.json             # python `random` state, numpy counters
    trainer.json               # step, micro-batch index, NaN-guard counters
    manifest.json              # written LAST: step, and size + sha256 of every file above

Writing (:func:`save_checkpoint`, or :func:`begin_checkpoint` + ``write_*`` + :func:`finalize_checkpoint` when
several processes contribute files) goes to ``checkpoints/.tmp-step-XXXXXXX/``; every file and the folder are
fsynced, then the folder is renamed into place (``os.replace``, atomic on POSIX). A crash at any point leaves the
previous checkpoints untouched and at worst a ``.tmp-*`` folder that is ignored and removed by the next save.

Disk full (ENOSPC/EDQUOT, also when safetensors reports it): :func:`is_disk_full` recognises it and
:func:`disk_full_message` says which checkpoint is intact and what to do; the loop removes the partial folder.

Test hook: with ``STEPDISTILL_FAULT=point[,point...]`` in the environment, :func:`fault_point` SIGKILLs the process
when it reaches a listed point: ``write:step-0000008/optimizers.safetensors`` (after that file of checkpoint 8 is
written), ``manifest:step-0000008`` (manifest written, before the rename), ``checkpoint-renamed:step-0000008``
(renamed, before pruning), ``train:step-0000006`` (before update 6), ``backward:step-0000006`` (after a backward of
update 6). This makes crash tests deterministic; nothing happens when the variable is unset.

Reading never unpickles: tensors come from safetensors, everything else from JSON. :func:`latest_checkpoint`
verifies manifests (sizes and sha256) and skips incomplete or corrupt checkpoints with a warning naming the file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINTS_DIR",
    "MANIFEST",
    "PICKLE_SUFFIXES",
    "CheckpointError",
    "LoadedCheckpoint",
    "begin_checkpoint",
    "capture_rng_state",
    "checkpoint_name",
    "disk_full_message",
    "fault_point",
    "finalize_checkpoint",
    "flatten_recipe_state",
    "flatten_state",
    "is_disk_full",
    "latest_checkpoint",
    "list_checkpoints",
    "load_safetensors",
    "prune_checkpoints",
    "read_checkpoint",
    "recipe_state_groups",
    "resolve_checkpoint",
    "restore_rng_state",
    "safetensors_problem",
    "save_checkpoint",
    "temp_checkpoint_dir",
    "unflatten_state",
    "verify_checkpoint",
    "write_json",
    "write_tensors",
]

CHECKPOINTS_DIR = "checkpoints"
MANIFEST = "manifest.json"
FORMAT = "stepdistill.checkpoint"
VERSION = 1
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".bin", ".ckpt")
_STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint (or a weights file) that is missing, incomplete, corrupt or unsafe to load."""


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


FAULT_ENV = "STEPDISTILL_FAULT"


def fault_point(name: str) -> None:
    """Test hook: SIGKILL this process if ``name`` is listed in ``$STEPDISTILL_FAULT`` (comma-separated)."""
    spec = os.environ.get(FAULT_ENV)
    if spec and name in spec.split(","):
        os.kill(os.getpid(), signal.SIGKILL)


_DISK_FULL_ERRNOS = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` (or its cause chain) says the disk or quota is full."""
    seen = 0
    while exc is not None and seen < 8:
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL_ERRNOS:
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "Disk quota exceeded" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def _folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file()) if path.is_dir() else 0


def disk_full_message(exc: BaseException, root: str | Path, step: int, previous: Path | None, keep: int) -> str:
    """What a run that ran out of disk space while writing checkpoint ``step`` under ``root`` tells the user."""
    root = Path(root)
    size = _folder_bytes(previous) if previous is not None else 0
    need = f" (a checkpoint of this run takes about {size / 2**20:.1f} MiB)" if size else ""
    if previous is not None:
        state = (f"The unfinished checkpoint was removed; the previous checkpoint {previous} is intact and verified "
                 f"on resume, so nothing before its step is lost.")
        resume = f"then rerun the same command: run.resume=auto continues from {previous.name}."
    else:
        state = "The unfinished checkpoint was removed; no earlier checkpoint exists, so the run restarts from step 0."
        resume = "then rerun the same command."
    keep_hint = (f"lower train.keep_checkpoints (now {keep}; each kept checkpoint uses space)" if keep != 1 else
                 "delete other runs or files")
    return (f"disk full: no space left on the device while writing checkpoint {checkpoint_name(step)} to {root} "
            f"({exc}). {state} To go on, free space on that disk{need} -- {keep_hint}, or set run.output_dir to a "
            f"disk with more room -- {resume}")


# ------------------------------------------------------------------------------------------ safe tensor files
def _refuse_pickle(path: Path) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"refusing to load {path}: {path.suffix} files are Python pickles, and unpickling a file can run "
            f"arbitrary code. stepdistill only reads safetensors. If you trust the file, convert it once: "
            f"python -c \"import torch, safetensors.torch as st; "
            f"st.save_file(torch.load('{path}', weights_only=True), '{path.with_suffix('.safetensors')}')\"")


def safetensors_problem(path: str | Path) -> str | None:
    """Why ``path`` is not a complete safetensors file (None if its header and size agree). Reads the header only.

    Layout: 8-byte little-endian header length N, N bytes of JSON ``{name: {dtype, shape, data_offsets}}``, then
    the data; the file must end exactly where the largest ``data_offsets`` end says.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        return f"it has {size} bytes, fewer than the 8-byte header length (empty or truncated)"
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > size - 8 or n > 100 * 2**20:
            return (f"its header claims {n} bytes but the file has {size} bytes (truncated, or not a safetensors "
                    f"file)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return f"its header is not valid JSON ({exc}); the file is corrupt or not a safetensors file"
    if not isinstance(header, dict):
        return "its header is not a JSON object; the file is corrupt"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        return "its header has malformed tensor entries; the file is corrupt"
    if 8 + n + end != size:
        return f"the header says {8 + n + end} bytes but the file has {size} bytes (truncated or corrupt)"
    return None


def load_safetensors(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file; pickles are refused and unreadable files named in the error."""
    path = Path(path)
    _refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist")
    problem = safetensors_problem(path)
    if problem is not None:
        raise CheckpointError(f"cannot read {path}: {problem}; the file is truncated or corrupt: restore it or "
                              f"re-create it (a checkpoint folder with a bad file is skipped on resume)")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc} (the file is truncated or corrupt)") from None


def _savable(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing storage (safetensors refuses shared or strided tensors)."""
    out, seen = {}, set()
    for key, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"checkpoint entry {key!r} is a {type(t).__name__}, not a tensor")
        t = t.detach()
        t = t.cpu() if t.device.type != "cpu" else t
        ptr = t.untyped_storage().data_ptr()
        if not t.is_contiguous() or (ptr and ptr in seen):
            t = t.clone(memory_format=torch.contiguous_format)
            ptr = t.untyped_storage().data_ptr()
        seen.add(ptr)
        out[key] = t
    return out


def write_tensors(folder: Path, stem: str, tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``<folder>/<stem>.safetensors``."""
    path = Path(folder) / f"{stem}.safetensors"
    save_file(_savable(tensors), str(path))
    fault_point(f"write:{_step_of(folder)}/{path.name}")
    return path


def write_json(folder: Path, stem: str, obj: Any) -> Path:
    """Write ``<folder>/<stem>.json``."""
    path = Path(folder) / f"{stem}.json"
    path.write_text(json.dumps(obj, indent=1))
    fault_point(f"write:{_step_of(folder)}/{path.name}")
    return path


def _step_of(folder: str | Path) -> str:
    return Path(folder).name.removeprefix(".tmp-")


# --------------------------------------------------------------------------- nested state <-> tensors + JSON
def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (e.g. ``optimizer.state_dict()``) into ``{path: tensor}`` and a JSON skeleton.

    Tensors become ``{"__tensor__": path}``; tuples ``{"__tuple__": [...]}``; dicts with non-string keys (optimizer
    state is keyed by int) ``{"__dict__": [[key, value], ...]}``. Leaves must be JSON scalars.
    """
    tensors: dict[str, torch.Tensor] = {}

    def sub(path: str, key: Any) -> str:
        return f"{path}/{key}" if path else str(key)

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x
            return {"__tensor__": path}
        if isinstance(x, dict):
            if all(isinstance(k, str) and not k.startswith("__") for k in x):
                return {k: walk(v, sub(path, k)) for k, v in x.items()}
            for k in x:
                if not isinstance(k, (str, int, float, bool)) and k is not None:
                    raise TypeError(f"cannot store a dict key of type {type(k).__name__} at {path!r}")
            return {"__dict__": [[k, walk(v, sub(path, k))] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [walk(v, sub(path, i)) for i, v in enumerate(x)]}
        if isinstance(x, list):
            return [walk(v, sub(path, i)) for i, v in enumerate(x)]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot store a {type(x).__name__} at {path!r} safely (tensors and JSON scalars only)")

    return tensors, walk(obj, prefix)


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten_state`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {"__tensor__"}:
            key = skeleton["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"tensor {key!r} is missing from the checkpoint")
            return tensors[key]
        if set(skeleton) == {"__tuple__"}:
            return tuple(unflatten_state(v, tensors) for v in skeleton["__tuple__"])
        if set(skeleton) == {"__dict__"}:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        return {k: unflatten_state(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


# ------------------------------------------------------------------------------------------------ RNG states
def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """Global RNG states of this process: torch CPU (+ every initialised CUDA device), numpy, python."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = state
    np_state = np.random.get_state(legacy=False)
    tensors["numpy_key"] = torch.from_numpy(np.asarray(np_state["state"]["key"], dtype=np.int64))
    version, py_state, gauss_next = random.getstate()
    meta = {
        "numpy": {"bit_generator": np_state["bit_generator"], "pos": int(np_state["state"]["pos"]),
                  "has_gauss": int(np_state["has_gauss"]), "gauss": float(np_state["gauss"])},
        "python": {"version": version, "state": list(py_state), "gauss_next": gauss_next},
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((k for k in tensors if k.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    n = meta["numpy"]
    np.random.set_state({"bit_generator": n["bit_generator"],
                         "state": {"key": tensors["numpy_key"].numpy().astype(np.uint32), "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))


# ------------------------------------------------------------------------------------------------ writing
def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def temp_checkpoint_dir(root: str | Path, step: int) -> Path:
    """Where checkpoint ``step`` is assembled before the atomic rename (every process can compute it)."""
    return Path(root) / f".tmp-{checkpoint_name(step)}"


def begin_checkpoint(root: str | Path, step: int) -> Path:
    """Create an empty temporary folder for checkpoint ``step`` under ``root`` (removing stale ``.tmp-*`` ones)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_checkpoint_dir(root, step)
    tmp.mkdir()
    return tmp


def finalize_checkpoint(tmp: str | Path, step: int) -> Path:
    """fsync every file, write the manifest last, fsync, and atomically rename ``tmp`` to ``step-XXXXXXX``."""
    tmp = Path(tmp)
    files = {}
    for path in sorted(p for p in tmp.iterdir() if p.name != MANIFEST):
        if not path.is_file():
            raise CheckpointError(f"unexpected non-file {path} in checkpoint folder")
        _fsync(path)
        files[path.name] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": FORMAT, "version": VERSION, "step": int(step), "files": files}
    write_json(tmp, Path(MANIFEST).stem, manifest)
    _fsync(tmp / MANIFEST)
    _fsync(tmp)
    fault_point(f"manifest:{checkpoint_name(step)}")
    final = tmp.parent / checkpoint_name(step)
    old = None
    if final.exists():  # re-saving a step: move the old one aside first (a directory rename cannot overwrite)
        old = tmp.parent / f".tmp-old-{final.name}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(root: str | Path, step: int, tensor_files: dict[str, dict[str, torch.Tensor]],
                    json_files: dict[str, Any]) -> Path:
    """Write one checkpoint atomically (single process): ``{stem: tensors}`` and ``{stem: json}`` files."""
    tmp = begin_checkpoint(root, step)
    for stem, tensors in tensor_files.items():
        write_tensors(tmp, stem, tensors)
    for stem, obj in json_files.items():
        write_json(tmp, stem, obj)
    return finalize_checkpoint(tmp, step)


def list_checkpoints(root: str | Path) -> list[Path]:
    """Finished checkpoint folders under ``root`` (``step-*``), oldest first (not verified)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: str | Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints (``keep=0`` keeps all); return the deleted folders."""
    ckpts = list_checkpoints(root)
    doomed = ckpts[:-keep] if keep > 0 else []
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


# ------------------------------------------------------------------------------------------------ reading
def verify_checkpoint(path: str | Path, *, check_hashes: bool = True) -> dict:
    """Check the manifest of checkpoint folder ``path`` against its files; return the manifest.

    Raises :class:`CheckpointError` naming the first missing, truncated or altered file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {path} is incomplete: {MANIFEST} is missing (the write was interrupted)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files, step = manifest["files"], int(manifest["step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path}: {manifest_path} is unreadable ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{manifest_path} is not a stepdistill checkpoint manifest")
    for name, entry in files.items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {f} is missing")
        size = f.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} has {size} bytes, the manifest says "
                                  f"{entry['bytes']} (truncated?)")
        if check_hashes and _sha256(f) != entry["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupt: {f} does not match its sha256 in the manifest")
    manifest["step"] = step
    return manifest


def latest_checkpoint(run_dir: str | Path, *, verify: bool = True) -> Path | None:
    """The newest valid checkpoint in ``<run_dir>/checkpoints``; invalid ones are skipped with a warning."""
    for path in reversed(list_checkpoints(Path(run_dir) / CHECKPOINTS_DIR)):
        try:
            if verify:
                verify_checkpoint(path)
            return path
        except CheckpointError as exc:
            warnings.warn(f"skipping checkpoint: {exc}", stacklevel=2)
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A user-given resume target -> a verified checkpoint folder. Accepts a checkpoint folder or a run dir (its
    newest valid checkpoint); refuses pickle files."""
    path = Path(path).expanduser()
    _refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"resume path {path} does not exist; give a checkpoint folder "
                              f"(<run_dir>/{CHECKPOINTS_DIR}/step-XXXXXXX) or a run dir")
    if path.is_file():
        raise CheckpointError(f"resume path {path} is a file; give a checkpoint folder "
                              f"(<run_dir>/{CHECKPOINTS_DIR}/step-XXXXXXX) or a run dir")
    if (path / MANIFEST).exists() or _STEP_DIR.match(path.name):
        verify_checkpoint(path)
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"no valid checkpoint under {path / CHECKPOINTS_DIR}")
    return found


@dataclass
class LoadedCheckpoint:
    """A verified checkpoint folder; files are read on demand."""

    path: Path
    step: int
    files: tuple[str, ...]

    def has(self, name: str) -> bool:
        return name in self.files

    def tensors(self, stem: str, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        name = f"{stem}.safetensors"
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no {name}")
        return load_safetensors(self.path / name, device)

    def json(self, stem: str) -> Any:
        name = f"{stem}.json"
        if name not in self.files:
            raise CheckpointError(f"checkpoint {self.path} has no {name}")
        try:
            return json.loads((self.path / name).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"cannot read {self.path / name}: {exc} (corrupt)") from None


def flatten_recipe_state(state: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """``{group: {key: t}}`` (``recipe.state_dict_for_checkpoint()``) -> ``{"group.key": t}``."""
    flat = {}
    for group, tensors in state.items():
        if "." in group:
            raise ValueError(f"recipe checkpoint group {group!r} must not contain '.'")
        flat.update({f"{group}.{k}": v for k, v in tensors.items()})
    return flat


def recipe_state_groups(ckpt: LoadedCheckpoint, device: str | torch.device = "cpu") -> dict[str, dict[str, torch.Tensor]]:
    """The ``{group: {key: tensor}}`` to pass to ``recipe.load_state_dict_from_checkpoint``."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in ckpt.tensors("recipe_state", device).items():
        group, _, sub = key.partition(".")
        groups.setdefault(group, {})[sub] = value
    return groups


def read_checkpoint(path: str | Path, *, verify: bool = True) -> LoadedCheckpoint:
    """Open checkpoint folder ``path`` (verifying sizes and, if ``verify``, sha256 of every file)."""
    path = Path(path)
    manifest = verify_checkpoint(path, check_hashes=verify)
    return LoadedCheckpoint(path=path, step=manifest["step"], files=tuple(manifest["files"]))
