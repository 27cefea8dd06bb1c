"""``stepdistill bench speed``: a recipe's training-update time against the sum of its unavoidable network calls,
and its student's sampling speed against the teacher, in one process.

What "unavoidable" means here (also written into every JSON as ``unavoidable_definition``): every call the recorded
update made to a network the recipe owns (student, teacher, target/EMA copies, fake score, GAN head, text encoder,
VAE), each replayed alone -- forward under the same grad mode (inside ``torch.func.jvp`` when the update ran it
there), plus the backward the update ran through it when its output received a gradient -- and each optimizer's
``step()`` timed alone. Not included (so counted as overhead): the loss math, noise/timestep draws, parameterization
conversions, gradient-norm/clipping and the NaN guard, the recipe's target-EMA updates and the evaluation EMA (the
last two are timed and reported under ``not_counted``), and calls that recompute a constant (``constant_calls``: the
empty negative prompt's text encoding, which a cache would compute once). Rounds interleave the real update and
every replay, and every number is a median over ``repeats`` rounds after ``warmup`` rounds.
"""

from __future__ import annotations

import platform
import shlex
from pathlib import Path

import torch

from .memory import peak_memory
from .networks import find_networks
from .recorder import CallRecorder, tensors_in
from .replay import CallReplay
from .sampling import sampling_speed
from .timing import median, timed

__all__ = ["run_speed_bench", "OVERHEAD_TARGET", "UNAVOIDABLE"]

OVERHEAD_TARGET = 1.15
UNAVOIDABLE = (
    "sum over every network call of the recorded update (student, teacher, target/EMA nets, fake score, GAN head, "
    "text encoder, VAE), each replayed alone: forward under the recorded grad mode (jvp when the update used one), "
    "plus backward when its output received a gradient (backward = (forward+backward) - forward, computing the same "
    "parameter and input gradients the update's backward needed); plus each stepped optimizer's step() timed alone. "
    "Everything else in the update is overhead: loss math, noise and timestep draws, parameterization conversions, "
    "grad-norm/clipping and NaN guard, target-EMA and evaluation-EMA updates (the EMAs are timed under not_counted). "
    "Calls that recompute a constant (no grad, frozen network, inputs bitwise equal to the previous update's same "
    "call although batch and noise changed: e.g. the empty negative prompt's text encoding) are avoidable: they are "
    "listed with counted=false and left out of the sum.")


def _config(recipe: str, model: str, config: str | None, batch_size: int | None, overrides: list[str]):
    from ...config import load_config

    over = [f"recipe.name={recipe}", f"teacher.path={model}"]
    if model.startswith("digits:"):
        cond = "prompt" if model == "digits:sd" else "class"
        over += ["data.kind=digits", "data.resolution=null", f"data.conditioning={cond}"]
    elif config is None:
        over += ["data.kind=random_images", f"data.resolution={_default_resolution(model)}"]
    if batch_size is not None:
        over.append(f"data.batch_size={batch_size}")
    return load_config(config, over + list(overrides))


def _default_resolution(model: str) -> int:
    """Image side of a pipeline folder: the backbone's sample size times the VAE's downsampling factor."""
    import json

    from ...evaluation.teacher_ref import teacher_folder

    folder = teacher_folder(model)
    for key in ("unet", "transformer"):
        cfg = folder / key / "config.json"
        if cfg.is_file():
            size = json.loads(cfg.read_text()).get("sample_size", 64)
            size = size if isinstance(size, int) else size[0]
            vae = folder / "vae" / "config.json"
            scale = 2 ** (len(json.loads(vae.read_text()).get("block_out_channels", [0])) - 1) if vae.is_file() else 1
            return int(size * scale)
    raise FileNotFoundError(f"{folder} has no unet/ or transformer/ config.json; pass --config with data.resolution")


def _check_model(model: str) -> None:
    if model.startswith(("digits:", "tiny:")):
        return
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"--model {model}: no such folder; pass a Diffusers pipeline folder (with "
                                f"model_index.json), digits:sd|digits:dit|digits:unet, or tiny:sd")
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"--model {model}: not a Diffusers pipeline folder (no model_index.json); export or "
                                f"save the pipeline with save_pretrained, or pass digits:sd|digits:dit|digits:unet")


def _same_inputs(a, b) -> bool:
    ta = tensors_in(a.args) + tensors_in(a.kwargs) + list(a.duals)
    tb = tensors_in(b.args) + tensors_in(b.kwargs) + list(b.duals)
    return len(ta) == len(tb) and all(x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
                                      for x, y in zip(ta, tb))


def constant_calls(previous: list, calls: list, networks: dict, trained: set[int]) -> set[int]:
    """Indices of ``calls`` that are avoidable because they recompute a constant: a call made without grad to a
    network none of whose parameters an optimizer trains (``trained``: parameter ids), whose inputs are bitwise
    identical to the same call (same position, network and method) of the previous update, which drew a different
    batch and different noise. The typical case is the text encoding of the empty negative prompt for CFG (a cache
    would compute it once; ``ConditionEncoder`` now does, so such calls no longer appear for SD-style teachers)."""
    out = set()
    if len(previous) != len(calls):
        return out
    for i, (a, b) in enumerate(zip(previous, calls)):
        frozen = not any(id(p) in trained for p in networks[b.network].parameters())
        if (a.network, a.method) == (b.network, b.method) and not b.grad_enabled and frozen and _same_inputs(a, b):
            out.add(i)
    return out


def _call_rows(replays: list[CallReplay], fwd: dict, fb: dict, constant: set[int]) -> list[dict]:
    rows = []
    for i, r in enumerate(replays):
        c = r.call
        f = median(fwd[i])
        total = median(fb[i]) if r.needs_backward else f
        rows.append({"index": i, "network": c.network, "method": c.method, "kind": c.kind,
                     "counted": i not in constant, "constant_inputs": i in constant,
                     "batch_size": c.batch_size, "grad_enabled": c.grad_enabled, "adapters_off": c.adapters_off,
                     "partial_forward": c.partial, "backward": r.needs_backward,
                     "param_grads": (r.param_grads or 0) if r.needs_backward else 0,
                     "input_grads": len(r.inputs) if r.needs_backward else 0,
                     "forward_s": f, "backward_s": total - f if r.needs_backward else 0.0, "total_s": total})
    return rows


def measure_training_step(harness, repeats: int, warmup: int) -> dict:
    """(a) + (b) + (d): the interleaved measurement (module doc) on a ready :class:`StepHarness`."""
    device = harness.device
    harness.update()  # first update: lazy initialisation (optimizer state, caches) happens outside the recording
    networks = find_networks(harness.recipe, harness.trainer.modules)
    with CallRecorder(networks, harness.accelerator) as before:
        harness.update()
    with CallRecorder(networks, harness.accelerator) as rec:
        stepped = harness.update_recording_optimizers()
    trained = {id(p) for ps in harness.trainer.params.values() for p in ps}
    constant = constant_calls(before.calls, rec.calls, networks, trained)
    del before
    if not rec.calls:
        raise RuntimeError(f"recipe {harness.recipe.name!r}: the recorded update called none of the networks found "
                           f"({', '.join(networks)})")
    replays = [CallReplay(c, networks[c.network], harness.accelerator.autocast) for c in rec.calls]
    opt_steps = {name: harness.optimizer_step(name) for name in stepped}
    extra = harness.not_counted()
    step_t: list[float] = []
    fwd = {i: [] for i in range(len(replays))}
    fb = {i: [] for i in range(len(replays))}
    opt_t = {name: [] for name in opt_steps}
    extra_t = {name: [] for name in extra}
    for round_ in range(warmup + repeats):
        keep = round_ >= warmup
        t = timed(harness.update, device)
        if keep:
            step_t.append(t)
        for i, r in enumerate(replays):
            t = timed(r.forward, device)
            if keep:
                fwd[i].append(t)
            if r.needs_backward:
                t = timed(r.forward_backward, device)
                if keep:
                    fb[i].append(t)
        for name, (prepare, step, cleanup) in opt_steps.items():
            prepare()
            t = timed(step, device)
            cleanup()
            if keep:
                opt_t[name].append(t)
        for name, fn in extra.items():
            t = timed(fn, device)
            if keep:
                extra_t[name].append(t)
    calls = _call_rows(replays, fwd, fb, constant)
    opts = [{"optimizer": n, "params": sum(p.numel() for p in harness.trainer.params[n]), "step_s": median(v)}
            for n, v in opt_t.items()]
    step_s = median(step_t)
    calls_s = sum(c["total_s"] for c in calls if c["counted"])
    opt_s = sum(o["step_s"] for o in opts)
    total = calls_s + opt_s
    per_round = [step_t[k] / (sum(fb[i][k] if r.needs_backward else fwd[i][k]
                                  for i, r in enumerate(replays) if i not in constant)
                              + sum(v[k] for v in opt_t.values())) for k in range(len(step_t))]
    memory = peak_memory(harness.update, device)
    return {
        "step": {"median_s": step_s, "samples_s": step_t, "optimizers_stepped": stepped},
        "calls": calls, "optimizer_steps": opts,
        "sum_network_calls_s": calls_s, "sum_optimizer_steps_s": opt_s, "sum_of_calls_s": total,
        "overhead_ratio": step_s / total, "overhead_target": OVERHEAD_TARGET,
        "meets_overhead_target": step_s / total <= OVERHEAD_TARGET,
        "overhead_ratio_per_round": per_round,  # update / sum within each round (robust to load drifting between
        "overhead_ratio_round_median": median(per_round),  # rounds on a shared machine); a cross-check

        "not_counted": [{"what": n, "median_s": median(v)} for n, v in extra_t.items()],
        "networks": {name: type(m).__name__ for name, m in networks.items()},
        "memory": memory,
    }


def speed_command(args: dict) -> str:
    parts = ["stepdistill", "bench", "speed", "--recipe", args["recipe"], "--model", args["model"]]
    for flag, key in (("--config", "config"), ("--student", "student"), ("--batch-size", "batch_size"),
                      ("--student-steps", "student_steps"), ("--teacher-steps", "teacher_steps"), ("--cfg", "cfg"),
                      ("--repeats", "repeats"), ("--warmup", "warmup"), ("--threads", "threads"),
                      ("--at-step", "at_step"), ("--sample-batch-size", "sample_batch_size"), ("--json", "json")):
        v = args.get(key)
        if v is not None:
            parts += [flag, ",".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)]
    for o in args.get("overrides") or []:
        parts += ["--set", o]
    if args.get("no_sampling"):
        parts.append("--no-sampling")
    return shlex.join(parts)


def run_speed_bench(*, recipe: str, model: str, config: str | None = None, student: str | None = None,
                    batch_size: int | None = None, student_steps: list[int] = (1, 2, 4), teacher_steps: int = 50,
                    cfg: float = 3.0, repeats: int = 5, warmup: int = 1, threads: int | None = 1, at_step: int = 0,
                    sample_batch_size: int | None = None, overrides: list[str] = (), no_sampling: bool = False,
                    json_path: str | None = None) -> dict:
    """Run the speed bench (module doc) and return the result dict (written to ``json_path`` when given)."""
    from ...recipes.base import get_recipe_class
    from ...runner import _data_factory, build_recipe
    from ...training.data import seed_everything

    args = dict(recipe=recipe, model=model, config=config, student=student, batch_size=batch_size,
                student_steps=list(student_steps), teacher_steps=teacher_steps, cfg=cfg, repeats=repeats,
                warmup=warmup, threads=threads, at_step=at_step, sample_batch_size=sample_batch_size,
                overrides=list(overrides), no_sampling=no_sampling, json=json_path)
    if repeats < 1 or warmup < 0:
        raise ValueError(f"--repeats must be >= 1 and --warmup >= 0, got {repeats} and {warmup}")
    get_recipe_class(recipe)  # unknown recipe names fail here, before anything loads
    _check_model(model)
    if config is not None and not Path(config).is_file():
        raise FileNotFoundError(f"--config {config}: no such file; pass a run config YAML (see recipes/)")
    if student is not None:
        _check_model(student)
    if threads:
        torch.set_num_threads(int(threads))
    from .step import StepHarness

    cfg_run = _config(recipe, model, config, batch_size, list(overrides))
    data_factory = _data_factory(cfg_run)
    seed_everything(cfg_run.run.seed)
    rec = build_recipe(cfg_run)
    harness = StepHarness(cfg_run, rec, data_factory, at_step=at_step)
    try:
        train = measure_training_step(harness, repeats, warmup)
        device = harness.device
    finally:
        harness.close()
    options = cfg_run.recipe.options
    result = {
        "bench": "speed", "recipe": recipe, "variant": getattr(options, "variant", None),
        "fake_score": getattr(options, "fake_score", None), "config": config, "model": model,
        "overrides": list(overrides), "device": str(device), "device_name": _device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "batch_size": cfg_run.data.batch_size, "gradient_accumulation_steps": cfg_run.train.gradient_accumulation_steps,
        "mixed_precision": cfg_run.train.mixed_precision, "at_step": at_step, "repeats": repeats, "warmup": warmup,
        "unavoidable_definition": UNAVOIDABLE,
        "step_note": "one optimizer update through training.loop's own _update (forwards, backwards, clipping, "
                     "optimizer steps, target/evaluation EMA); batches pre-fetched, step counter pinned to at_step",
        **train,
    }
    try:
        import diffusers

        result["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    if not no_sampling:
        try:
            result["sampling"] = sampling_speed(
                rec, model, student_dir=student, student_steps=list(student_steps), teacher_steps=teacher_steps,
                cfg_scale=cfg, batch_size=sample_batch_size or cfg_run.data.batch_size, repeats=repeats,
                image_size=None if model.startswith("digits:") else cfg_run.data.resolution, device=device)
        except (FileNotFoundError, ValueError, TypeError) as exc:  # e.g. a pipeline that rejects `timesteps`
            if student is not None:  # the user's folder: their error to fix
                raise
            result["sampling"] = {"error": f"the fresh {recipe} student could not be sampled as a stock pipeline: "
                                           f"{exc}", "rows": []}
    result["command"] = speed_command(args)
    if json_path:
        import json

        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(result, indent=2) + "\n")
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()
