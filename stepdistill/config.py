"""Run configuration: a YAML file plus ``key=value`` overrides, validated before any model loads.

A run config has seven sections (nested dataclasses below, each field documented where it is declared)::

    run:     {output_dir, name, seed, resume}
    teacher: {path, dtype, variant}
    model:   {attention_backend, fuse_qkv}                # how every network of the run computes attention
    recipe:  {name, ...options of that recipe}        # validated against the recipe's own options dataclass
    data:    {kind, path, batch_size, resolution, channels, conditioning, num_workers, ...}
    train:   {max_steps, lr, lr_scheduler, ..., ema_decay, checkpoint_every, ...}
    export:  {output_dir, use_ema, dtype}

Overrides use dotted keys and YAML scalars: ``train.lr=1e-4``, ``recipe.w_range=[2,8]``, ``data.path=/x``.
Every mistake is reported at once, each naming the key, the bad value and what is allowed, e.g.::

    train.lrr: unknown key 'lrr' in section 'train'; did you mean 'lr'? Allowed keys: adam_beta1, ...

Recipes register an options dataclass with :func:`register_recipe_options` (``recipes.base.register_recipe`` does it
from the recipe's ``options_class``); ``recipe.*`` keys are then checked exactly like the built-in sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

__all__ = [
    "ConfigError",
    "DataSection",
    "ExportSection",
    "ModelSection",
    "RecipeSection",
    "RunConfig",
    "RunSection",
    "TeacherSection",
    "TrainSection",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "flatten_config",
    "load_config",
    "parse_override",
    "recipe_options_type",
    "register_recipe_options",
    "save_config",
]


class ConfigError(ValueError):
    """An invalid run config. ``problems`` holds one line per mistake (key, bad value, what is allowed)."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = list(problems)
        self.source = source
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid run config ({source}):\n{lines}")


class _Problems(ValueError):
    """Raised by a section's ``__post_init__`` with every range problem it found (keys relative to the section)."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def _check(problems: list[str], ok: bool, key: str, rule: str, value: Any) -> None:
    if not ok:
        problems.append(f"{key}: {rule}, got {value!r}")


def _raise_if(problems: list[str]) -> None:
    if problems:
        raise _Problems(problems)


# ----------------------------------------------------------------------------------------------------- sections
@dataclass
class RunSection:
    """Where the run lives and how it starts."""

    output_dir: str = "runs/default"
    """Run directory: resolved config, checkpoints/, samples/, metrics.jsonl, tracker logs."""
    name: str = "stepdistill"
    """Run name (tracker project name, model card)."""
    seed: int = 0
    """Master seed. Data batch k, the noise of step k and the sample grids are all derived from (seed, rank, k)."""
    resume: str = "auto"
    """'auto': continue from the newest valid checkpoint in output_dir if there is one; 'never': refuse to reuse a
    run dir that already has checkpoints; otherwise a path to a checkpoint folder (or a run dir) to start from."""

    def __post_init__(self):
        p: list[str] = []
        _check(p, self.seed >= 0, "seed", "must be >= 0", self.seed)
        _check(p, bool(self.output_dir), "output_dir", "must not be empty", self.output_dir)
        _check(p, bool(self.resume), "resume", "must be 'auto', 'never' or a checkpoint path", self.resume)
        _raise_if(p)


@dataclass
class TeacherSection:
    """The model being distilled."""

    path: str = ""
    """A local Diffusers pipeline/model folder, a repo id already in the local HF cache, or a builtin teacher name."""
    dtype: Literal["auto", "fp32", "fp16", "bf16"] = "fp32"
    """Dtype the frozen teacher runs in; 'auto' = bf16 on a CUDA device that supports it, fp32 otherwise (CPU)."""
    variant: str | None = None
    """Diffusers weight variant to load (e.g. 'fp16'), if the folder has several."""


@dataclass
class ModelSection:
    """How the run's networks (student, teacher, fake scores) compute attention (``stepdistill.models.attention_backends``).
    The backend each attention layer really uses is logged at the start and written to ``attention_backends.json``."""

    attention_backend: str = "sdpa"
    """'sdpa' (PyTorch scaled_dot_product_attention, automatic kernel), 'math' (unfused), 'xformers' (CUDA + the
    xformers package), 'jvp' (forward-AD capable; sCM installs it on its student by itself), or a Diffusers dispatcher
    backend name ('flash', '_native_flash', '_native_efficient', 'sage', ...), which only layers using Diffusers'
    dispatcher honour (the report names the layers that do not)."""
    fuse_qkv: bool = False
    """Fuse the query/key/value projections of frozen networks (the teacher) where Diffusers can; trained networks
    are never fused (their exported to_q/to_k/to_v would go stale)."""

    def __post_init__(self):
        from .models.attention_backends import check_backend_name

        problem = check_backend_name(self.attention_backend)
        _raise_if([f"attention_backend: {problem}"] if problem else [])


@dataclass
class RecipeSection:
    """``name`` picks the recipe; every other ``recipe.*`` key is an option of that recipe (``options``)."""

    name: str
    """Registered recipe name (see ``stepdistill.recipes``)."""
    options: Any = None
    """An instance of the recipe's registered options dataclass."""


@dataclass
class DataSection:
    """Training data. Batches are step-indexed (batch k depends only on (seed, rank, k)), so resume is exact."""

    kind: Literal["prompts", "image_folder", "digits", "toy2d", "random_images"] = "digits"
    """Data source: a prompt file, a folder of images, the digits benchmark, the 2-D toy, or Gaussian noise images."""
    path: str | None = None
    """Prompt file (one prompt per line) for 'prompts'; image folder for 'image_folder'; unused otherwise."""
    batch_size: int = 8
    """Per-process micro-batch size. Global batch per update = batch_size x train.gradient_accumulation_steps x
    number of processes; N processes give the same updates as one with N x the accumulation steps."""
    resolution: int | None = None
    """Image side length; None = the data's native size (required for image_folder and random_images)."""
    channels: int = 3
    """Image channels for image_folder (1 = greyscale) and random_images."""
    conditioning: Literal["prompt", "class"] = "prompt"
    """What ``batch['conditions']`` holds when the data has both (digits): prompt strings or class labels."""
    num_workers: int = 0
    """DataLoader worker processes for image_folder."""
    random_flip: bool = False
    """Random horizontal flips (image_folder), drawn from the batch's seeded generator."""

    def __post_init__(self):
        p: list[str] = []
        _check(p, self.batch_size >= 1, "batch_size", "must be >= 1", self.batch_size)
        _check(p, self.resolution is None or self.resolution >= 1, "resolution", "must be >= 1 or null",
               self.resolution)
        _check(p, self.channels in (1, 3), "channels", "must be 1 or 3", self.channels)
        _check(p, self.num_workers >= 0, "num_workers", "must be >= 0", self.num_workers)
        if self.kind in ("prompts", "image_folder") and not self.path:
            p.append(f"path: required when data.kind is {self.kind!r} (a "
                     f"{'text file with one prompt per line' if self.kind == 'prompts' else 'folder of images'})")
        if self.kind in ("image_folder", "random_images") and self.resolution is None:
            p.append(f"resolution: required when data.kind is {self.kind!r} (e.g. data.resolution=512)")
        _raise_if(p)


@dataclass
class TrainSection:
    """The shared training loop (``stepdistill.training.loop``)."""

    max_steps: int = 1000
    """Number of optimizer updates (one update = gradient_accumulation_steps micro-batches)."""
    lr: float = 1e-4
    """AdamW learning rate (a recipe may give a param group its own 'lr')."""
    lr_scheduler: Literal["constant", "linear", "cosine"] = "constant"
    """Schedule after warmup (diffusers.optimization.get_scheduler); linear/cosine decay to 0 at max_steps."""
    warmup_steps: int = 0
    """Linear warmup from 0 over this many updates."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.999
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    weight_decay: float = 0.0
    """AdamW decoupled weight decay."""
    grad_clip: float = 1.0
    """Max global grad norm per optimizer; 0 = no clipping (the norm is still computed for the NaN guard)."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per update, for every trained model."""
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    """accelerate autocast mode; fp16 adds a GradScaler."""
    allow_tf32: bool = True
    """Allow TF32 matmuls on Ampere+ GPUs."""
    ema_decay: float = 0.0
    """Evaluation EMA decay mu (theta_ema <- mu theta_ema + (1 - mu) theta); 0 = off. Used only for samples/export."""
    checkpoint_every: int = 500
    """Checkpoint every N updates (and always at the end); 0 = only at the end."""
    keep_checkpoints: int = 3
    """Keep the newest K checkpoints; 0 = keep all."""
    sample_every: int = 0
    """Save a fixed-seed sample grid every N updates; 0 = never."""
    sample_num: int = 16
    """Samples per grid (points per scatter for 2-D toys)."""
    log_every: int = 10
    """Log averaged scalars every N updates (trackers, metrics.jsonl, progress bar)."""
    max_consecutive_nonfinite: int = 10
    """After this many consecutive skipped updates (non-finite loss or grad norm) of one optimizer, act per on_nan."""
    on_nan: Literal["stop", "rollback"] = "stop"
    """'stop': end the run with a message naming the last good checkpoint; 'rollback': reload the last checkpoint,
    multiply every learning rate by rollback_lr_factor and continue (at most max_rollbacks times, then stop)."""
    rollback_lr_factor: float = 0.5
    """Learning-rate multiplier applied at each rollback (on_nan=rollback); in (0, 1]."""
    max_rollbacks: int = 3
    """Rollbacks allowed per run before it stops (on_nan=rollback)."""
    trackers: list[Literal["auto", "tensorboard", "wandb", "mlflow", "aim", "comet_ml", "clearml", "dvclive"]] = field(
        default_factory=lambda: ["auto"])
    """accelerate trackers; 'auto' = tensorboard when installed, none otherwise; [] = none."""
    ddp_find_unused_parameters: bool = False
    """Passed to DistributedDataParallel (multi-process only)."""
    compile: bool = False
    """torch.compile the trained networks and the frozen teacher backbone (not networks differentiated with
    torch.func.jvp, e.g. sCM's student). The first steps are slow while it compiles."""
    gradient_checkpointing: bool = False
    """Gradient checkpointing on every trained Diffusers backbone (recomputes activations in backward: less memory,
    about 30% more compute). Recipes' own recipe.gradient_checkpointing options keep working alongside."""
    channels_last: bool | Literal["auto"] = "auto"
    """channels_last memory format for UNet backbones; 'auto' = on for UNets on CUDA only (it slows CPU convs)."""

    def __post_init__(self):
        p: list[str] = []
        _check(p, self.max_steps >= 1, "max_steps", "must be >= 1", self.max_steps)
        _check(p, self.lr > 0, "lr", "must be > 0", self.lr)
        _check(p, self.warmup_steps >= 0, "warmup_steps", "must be >= 0", self.warmup_steps)
        _check(p, 0 <= self.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)", self.adam_beta1)
        _check(p, 0 <= self.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)", self.adam_beta2)
        _check(p, self.adam_eps > 0, "adam_eps", "must be > 0", self.adam_eps)
        _check(p, self.weight_decay >= 0, "weight_decay", "must be >= 0", self.weight_decay)
        _check(p, self.grad_clip >= 0, "grad_clip", "must be >= 0 (0 = off)", self.grad_clip)
        _check(p, self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1",
               self.gradient_accumulation_steps)
        _check(p, 0 <= self.ema_decay < 1, "ema_decay", "must be in [0, 1) (0 = off)", self.ema_decay)
        _check(p, self.checkpoint_every >= 0, "checkpoint_every", "must be >= 0", self.checkpoint_every)
        _check(p, self.keep_checkpoints >= 0, "keep_checkpoints", "must be >= 0 (0 = keep all)", self.keep_checkpoints)
        _check(p, self.sample_every >= 0, "sample_every", "must be >= 0 (0 = never)", self.sample_every)
        _check(p, self.sample_num >= 1, "sample_num", "must be >= 1", self.sample_num)
        _check(p, self.log_every >= 1, "log_every", "must be >= 1", self.log_every)
        _check(p, self.max_consecutive_nonfinite >= 1, "max_consecutive_nonfinite", "must be >= 1",
               self.max_consecutive_nonfinite)
        _check(p, 0 < self.rollback_lr_factor <= 1, "rollback_lr_factor", "must be in (0, 1]",
               self.rollback_lr_factor)
        _check(p, self.max_rollbacks >= 0, "max_rollbacks", "must be >= 0", self.max_rollbacks)
        _raise_if(p)


@dataclass
class ExportSection:
    """Export of the trained student to a Diffusers folder."""

    output_dir: str = ""
    """Export folder; empty = <run.output_dir>/export."""
    use_ema: bool = True
    """Export the evaluation-EMA weights when train.ema_decay > 0."""
    dtype: Literal["fp32", "fp16", "bf16"] = "fp32"
    """Dtype of the exported weights."""


@dataclass
class RunConfig:
    """A complete, validated run config."""

    recipe: RecipeSection
    run: RunSection = field(default_factory=RunSection)
    teacher: TeacherSection = field(default_factory=TeacherSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    export: ExportSection = field(default_factory=ExportSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.output_dir)


_SECTIONS = ("run", "teacher", "model", "recipe", "data", "train", "export")


# ------------------------------------------------------------------------------------------- recipe option registry
_RECIPE_OPTIONS: dict[str, type] = {}


def register_recipe_options(name: str, options_type: type) -> None:
    """Declare the options dataclass of recipe ``name``; ``recipe.*`` keys are validated against its fields."""
    if not dataclasses.is_dataclass(options_type):
        raise TypeError(f"options of recipe {name!r} must be a dataclass type, got {options_type!r}")
    if "name" in {f.name for f in dataclasses.fields(options_type)}:
        raise TypeError(f"options dataclass {options_type.__name__} of recipe {name!r} may not have a field 'name' "
                        f"(recipe.name selects the recipe)")
    _RECIPE_OPTIONS[name] = options_type


def recipe_options_type(name: str) -> type | None:
    """The options dataclass registered for ``name``, importing ``stepdistill.recipes.<name>`` (then the package)
    so recipes register themselves; None if no recipe of that name exists."""
    for module in (f"stepdistill.recipes.{name}", "stepdistill.recipes"):
        if name in _RECIPE_OPTIONS:
            break
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name != module:  # a real import error inside an existing recipe module
                raise
    return _RECIPE_OPTIONS.get(name)


# ----------------------------------------------------------------------------------------------------- YAML
class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.1 insists on a dot: ``1.0e-4``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        hint = " (it is a directory)" if path.is_dir() else ""
        raise ConfigError([f"config file {str(path)!r} does not exist{hint}; pass the path of a YAML run config "
                           f"(examples in recipes/)"], source=str(path))
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: YAML syntax error: {exc}"], source=str(path)) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the top level must be a mapping of sections ({', '.join(_SECTIONS)}), "
                           f"got {type(raw).__name__}"], source=str(path))
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.lr=1e-4'`` -> ``('train.lr', 0.0001)``; the value is parsed as YAML (``[2,8]`` is a list)."""
    key, sep, value = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([f"override {text!r} must look like section.key=value (e.g. train.lr=1e-4)"],
                          source="overrides")
    try:
        parsed = yaml.load(value, Loader=_Loader) if value.strip() else None
    except yaml.YAMLError as exc:
        raise ConfigError([f"override {text!r}: the value is not valid YAML ({exc}); quote strings with special "
                           f"characters"], source="overrides") from None
    return key, parsed


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...]) -> tuple[dict, set[str]]:
    """Apply ``key=value`` overrides to a raw config dict (copied); return it and the set of overridden keys."""
    import copy

    raw = copy.deepcopy(raw)
    keys: set[str] = set()
    for text in overrides:
        key, value = parse_override(text)
        node = raw
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError([f"override {text!r}: {'.'.join(parts[: i + 1])} is a value "
                                   f"({child!r}), not a section"], source="overrides")
            node = child
        node[parts[-1]] = value
        keys.add(key)
    return raw, keys


# ------------------------------------------------------------------------------------------------ validation
def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


class _Invalid(Exception):
    """A value that does not fit its declared type; the message is the reason, ``key`` where it sits."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def _coerce_item(value: Any, tp, key: str, errors: list[str], from_override: set[str]):
    try:
        return _coerce(value, tp, key, errors, from_override)
    except _Invalid as exc:
        raise _Invalid(str(exc), exc.key or key) from None


def _coerce(value: Any, tp, key: str, errors: list[str], from_override: set[str]):
    """Check ``value`` against annotation ``tp`` and convert (int -> float, list -> tuple); nested dataclasses are
    built recursively. Raises _Invalid for a bad leaf."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise _Invalid(f"expected a mapping of {tp.__name__} keys, got {type(value).__name__} {value!r}")
        return _build(tp, value, key, errors, from_override)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key, errors, from_override)
            except _Invalid:
                continue
        raise _Invalid(f"expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise _Invalid(f"{value!r} is not allowed; allowed values: {', '.join(repr(a) for a in args)}{hint}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Invalid(f"expected bool (true/false), got {type(value).__name__} {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Invalid(f"expected int, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Invalid(f"expected float, got {type(value).__name__} {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Invalid(f"expected str, got {type(value).__name__} {value!r}; quote it in YAML (e.g. '{value}')")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _Invalid(f"expected {_type_name(tp)} (a YAML list like [a, b]), got {type(value).__name__} {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise _Invalid(f"expected {len(args)} items ({_type_name(tp)}), got {len(value)}: {value!r}")
            items = [_coerce_item(v, a, f"{key}[{i}]", errors, from_override)
                     for i, (v, a) in enumerate(zip(value, args))]
        else:
            item_tp = args[0] if args else Any
            items = [_coerce_item(v, item_tp, f"{key}[{i}]", errors, from_override) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a mapping, got {type(value).__name__} {value!r}")
        val_tp = args[1] if args else Any
        return {k: _coerce_item(v, val_tp, f"{key}.{k}", errors, from_override) for k, v in value.items()}
    if origin is None and isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Invalid(f"expected {tp.__name__}, got {type(value).__name__} {value!r}")
    raise TypeError(f"config field {key} has an unsupported annotation {tp!r}")


def _unknown_key(prefix: str, key: str, allowed: list[str], from_override: set[str], note: str = "") -> str:
    """``train.lrr: unknown key 'lrr' in section 'train'; did you mean 'lr'? Allowed keys: ...``"""
    dotted = f"{prefix}.{key}" if prefix else str(key)
    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else "."
    origin = " (from a command-line override)" if dotted in from_override else ""
    if prefix:
        return (f"{dotted}: unknown key {key!r} in section {prefix!r}{note}{origin}{hint} "
                f"Allowed keys: {', '.join(allowed) or 'none'}")
    return f"{dotted}: unknown section {key!r}{origin}{hint} Allowed sections: {', '.join(allowed)}"


def _build(cls: type, raw: dict, prefix: str, errors: list[str], from_override: set[str], note: str = ""):
    """Instantiate dataclass ``cls`` from ``raw``, appending every problem to ``errors``; None if any."""
    hints = typing.get_type_hints(cls)
    fields = [f for f in dataclasses.fields(cls) if f.init]
    allowed = [f.name for f in fields]
    n_before = len(errors)
    for key in raw:
        if key not in allowed:
            errors.append(_unknown_key(prefix, key, allowed, from_override, note))
    kwargs = {}
    for f in fields:
        if f.name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                errors.append(f"{prefix}.{f.name}: required key is missing")
            continue
        key = f"{prefix}.{f.name}"
        try:
            kwargs[f.name] = _coerce(raw[f.name], hints[f.name], key, errors, from_override)
        except _Invalid as exc:
            errors.append(f"{exc.key or key}: {exc}")
    if len(errors) > n_before:
        return None
    try:
        return cls(**kwargs)
    except _Problems as exc:
        errors.extend(f"{prefix}.{p}" for p in exc.problems)
    except (TypeError, ValueError) as exc:
        errors.append(f"{prefix}: {exc}")
    return None


def _build_recipe(raw: Any, errors: list[str], from_override: set[str]) -> RecipeSection | None:
    if not isinstance(raw, dict) or "name" not in raw:
        errors.append("recipe.name: required; pick a recipe, e.g. recipe.name=lcm")
        return None
    raw = dict(raw)
    name = raw.pop("name")
    if not isinstance(name, str):
        errors.append(f"recipe.name: expected str, got {type(name).__name__} {name!r}")
        return None
    if not name.isidentifier():  # also keeps arbitrary strings out of importlib
        known = sorted(_RECIPE_OPTIONS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        errors.append(f"recipe.name: {name!r} is not a recipe name (letters, digits and '_'){hint} Registered "
                      f"recipes: {', '.join(known) or 'none'}")
        return None
    options_type = recipe_options_type(name)
    if options_type is None:
        known = sorted(_RECIPE_OPTIONS)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        errors.append(f"recipe.name: unknown recipe {name!r}{hint} Registered recipes: {', '.join(known) or 'none'}")
        return None
    options = _build(options_type, raw, "recipe", errors, from_override, note=f" (options of recipe {name!r})")
    return None if options is None else RecipeSection(name=name, options=options)


def config_from_dict(raw: dict, *, source: str = "<dict>", override_keys: set[str] | None = None) -> RunConfig:
    """Validate a raw (YAML-shaped) dict into a :class:`RunConfig`; raise :class:`ConfigError` listing every problem."""
    from_override = override_keys or set()
    errors: list[str] = []
    if not isinstance(raw, dict):
        raise ConfigError([f"a run config must be a mapping of sections, got {type(raw).__name__}"], source=source)
    for key in raw:
        if key not in _SECTIONS:
            errors.append(_unknown_key("", key, list(_SECTIONS), from_override))
    sections: dict[str, Any] = {"recipe": _build_recipe(raw.get("recipe"), errors, from_override)}
    for f in dataclasses.fields(RunConfig):
        if f.name == "recipe":
            continue
        value = raw.get(f.name) or {}
        if not isinstance(value, dict):
            errors.append(f"{f.name}: expected a mapping of keys, got {type(value).__name__} {value!r}")
            continue
        sections[f.name] = _build(f.default_factory, value, f.name, errors, from_override)
    if errors:
        raise ConfigError(errors, source=source)
    return RunConfig(**sections)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read the YAML run config at ``path`` (None = all defaults), apply ``key=value`` overrides, validate."""
    raw = _read_yaml(Path(path)) if path is not None else {}
    raw, keys = apply_overrides(raw, overrides)
    source = str(path) if path is not None else "defaults"
    if overrides:
        source += f" + {len(overrides)} override(s)"
    return config_from_dict(raw, source=source, override_keys=keys)


# ------------------------------------------------------------------------------------------------ output
def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def config_to_dict(cfg: RunConfig) -> dict:
    """The config as plain YAML-ready data; ``recipe`` is flat (``name`` plus its options), as written in YAML."""
    out = {}
    for f in dataclasses.fields(cfg):
        section = getattr(cfg, f.name)
        if f.name == "recipe":
            out["recipe"] = {"name": section.name, **_plain(section.options)}
        else:
            out[f.name] = _plain(section)
    return out


def flatten_config(cfg: RunConfig) -> dict[str, Any]:
    """``{'train.lr': 1e-4, ...}``: dotted keys (what overrides use), for trackers and config diffs."""
    flat: dict[str, Any] = {}
    for section, values in config_to_dict(cfg).items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value
    return flat


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (loadable with :func:`load_config`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
