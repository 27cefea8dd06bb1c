"""Find the networks a recipe owns (student, teacher, targets, fake scores, heads, text encoder, VAE), by name.

A *network* here is an ``nn.Module`` whose calls the speed bench records and replays one by one. They are found by
walking the recipe's attributes (its trainable modules first, so they get the recipe's own names), then the teacher
pipeline's components. Thin wrappers (``Denoiser``, ``TrigFlowNetwork``: every parameter belongs to a network
inside them) are replaced by what they wrap, so each backbone is timed once, without the wrapper's conversion math
(that math is overhead by definition). A module that lies inside another network (a stored reference to a UNet's
mid block) is dropped in favour of the enclosing network.

VAEs are called through ``encode``/``decode``, not ``forward``; :func:`hooked_methods` says which methods to record.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ...models.backbones import unwrap

__all__ = ["find_networks", "hooked_methods"]

_PIPELINE_ROLES = {"unet": "teacher", "transformer": "teacher", "text_encoder": "text_encoder",
                   "text_encoder_2": "text_encoder_2", "text_encoder_3": "text_encoder_3", "vae": "vae"}


def hooked_methods(module: nn.Module) -> tuple[str, ...]:
    """``("encode", "decode")`` for autoencoders (the codec calls those), ``("forward",)`` otherwise."""
    if type(module).__name__.startswith("Autoencoder") and hasattr(module, "encode") and hasattr(module, "decode"):
        return ("encode", "decode")
    return ("forward",)


def _walk(obj: Any, prefix: str, out: list[tuple[str, nn.Module]], seen: set[int], depth: int) -> None:
    """Collect ``(dotted name, module)`` for every nn.Module reachable through stepdistill objects, dicts and lists."""
    if depth > 4 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, nn.Module):
        out.append((prefix, obj))
        # stepdistill wrappers (Denoiser, TrigFlowNetwork, ...) hold their backbone as an attribute: descend once
        if type(obj).__module__.startswith("stepdistill"):
            for key, child in obj.named_children():
                _walk(child, f"{prefix}.{key}", out, seen, depth + 1)
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            _walk(value, f"{prefix}.{key}", out, seen, depth + 1)
        return
    if isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            _walk(value, f"{prefix}.{i}", out, seen, depth + 1)
        return
    if type(obj).__module__.startswith("stepdistill") and hasattr(obj, "__dict__"):
        for key, value in vars(obj).items():
            if key != "pipeline":  # the pipeline is walked through its components, with role names
                _walk(value, f"{prefix}.{key}" if prefix else key, out, seen, depth + 1)


def _params(m: nn.Module) -> set[int]:
    return {id(p) for p in m.parameters()}


def find_networks(recipe, trainable: dict[str, nn.Module]) -> dict[str, nn.Module]:
    """``{name: module}`` of the distinct networks the recipe calls (see module doc); names are unique."""
    found: list[tuple[str, nn.Module]] = [(name, unwrap(m)) for name, m in trainable.items()]
    seen: set[int] = set()
    _walk(recipe, "", found, seen, 0)
    pipe = getattr(getattr(recipe, "teacher", None), "pipeline", None)
    components = getattr(pipe, "components", None) or {}
    for key, role in _PIPELINE_ROLES.items():
        if isinstance(components.get(key), nn.Module):
            found.append((role, components[key]))
    # first name wins (trainable names, then recipe attributes, then pipeline roles); drop parameter-less modules
    names: dict[int, str] = {}
    mods: dict[int, nn.Module] = {}
    for name, m in found:
        m = unwrap(m)
        if id(m) not in mods and any(True for _ in m.parameters()):
            names[id(m)], mods[id(m)] = name.lstrip(".") or type(m).__name__, m
    pipeline_named = {id(components[k]): role for k, role in _PIPELINE_ROLES.items()
                      if isinstance(components.get(k), nn.Module)}
    for key, role in pipeline_named.items():  # the teacher's unet: say "teacher" unless the recipe trains it (LoRA)
        if key in names and names[key] not in trainable:
            names[key] = role
    keep = set(mods)
    for a in list(mods):
        inner = [b for b in mods if b != a and any(x is mods[b] for x in mods[a].modules())]
        if not inner:
            continue
        covered = set().union(*(_params(mods[b]) for b in inner))
        if _params(mods[a]) <= covered:  # a pure wrapper: time what it wraps (under the wrapper's plain name)
            keep.discard(a)
            if len(inner) == 1 and "." in names[inner[0]] and "." not in names[a]:
                names[inner[0]] = names[a]
        else:  # a reference into a bigger network: time the whole network
            keep -= set(inner)
    out: dict[str, nn.Module] = {}
    for key in mods:
        if key in keep:
            name = names[key]
            out[name if name not in out else f"{name}#{len(out)}"] = mods[key]
    return out
