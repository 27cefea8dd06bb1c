"""Adapter guidance distillation (AGD, Jensen & Sadat 2025; spec B.10): small guidance-conditioned adapters on a
frozen base model, and how they attach to it, save, load and install into a stock Diffusers pipeline.

Two adapter kinds:

* ``"cross_attention"`` (UNet2DConditionModel; the reference code's SD placement): one adapter after the
  cross-attention ``attn2`` of every transformer block (down, mid and up). The query is the block's normalised hidden
  states (``attn2``'s own input); the keys and values come from a small token set: the guidance token
  ``LayerNorm(MLP(fourier(w)))`` and (optionally) a timestep token projected from the base model's time embedding,
  each with a learned positional embedding. The output projection is zero-initialised (weight and bias), and the
  adapter output is *added* to ``attn2``'s output, so at initialisation the model is exactly the base model.
* ``"additive"`` (the toy MLP, like the reference code's DiT default): ``eps_base + A(x_t, t, c, w)`` with a small MLP
  ``A`` whose last layer is zero-initialised.

The Fourier encoding of w is the sinusoidal embedding of ``1000 (w - 1)`` that stock Diffusers pipelines build for
UNets with ``time_cond_proj_dim`` (``get_guidance_scale_embedding(guidance_scale - 1)``, spec A.3). Installing the
adapters sets ``unet.config.time_cond_proj_dim`` to the Fourier size: the stock pipeline then passes
``timestep_cond = fourier(w)`` to every UNet call *and skips the CFG doubling* (one UNet call per step). A forward
pre-hook takes ``timestep_cond`` out of the call (the frozen base model never sees it: it has no ``cond_proj``) and
hands it to the adapters; forward hooks add the adapter outputs; nothing in Diffusers is copied or patched. Every UNet
call carries its own w and t (spec B.10 pitfall: stale adapter kwargs), and the state is cleared after the call.

Files: ``agd_adapters.safetensors`` (weights) + ``agd_config.json`` (architecture, attachment points, training range).
The adapters fit any model of the same architecture (another checkpoint of the same base, a LoRA-equipped one):
installation checks module names and widths and names the mismatch.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..diffusion.guidance import guidance_scale_embedding

__all__ = ["ADAPTER_FILE", "ADAPTER_CONFIG_FILE", "AdapterConfig", "GuidanceTokenizer", "CrossAttentionAdapter",
           "UNetGuidanceAdapters", "AdditiveGuidanceAdapter", "AdapterHandle", "build_unet_adapters", "attach_adapters",
           "save_adapters", "load_adapters", "install_adapters", "count_parameters", "guidance_features"]

ADAPTER_FILE = "agd_adapters.safetensors"
ADAPTER_CONFIG_FILE = "agd_config.json"
FORMAT_VERSION = 1


@dataclass
class AdapterConfig:
    """Everything needed to rebuild the adapters (written to ``agd_config.json``)."""

    kind: str
    """"cross_attention" (UNet) or "additive" (toy MLP)."""
    hidden_dim: int = 320
    """Adapter width (SD reference: 320)."""
    fourier_dim: int = 256
    """Size of the Fourier encoding of w (= the UNet's ``time_cond_proj_dim`` once installed)."""
    num_heads: int = 4
    """Attention heads of each cross-attention adapter (hidden_dim must be divisible by it)."""
    timestep_token: bool = True
    """Add a timestep token (projected from the base time embedding) to the guidance token."""
    time_embed_dim: int | None = None
    """Width of the base UNet's time embedding (input of the timestep-token projection)."""
    blocks: dict[str, int] = field(default_factory=dict)
    """Cross-attention kind: attn2 module name -> its query width (the hidden size of that transformer block)."""
    data_dim: int = 2
    """Additive kind: dimension of x_t."""
    num_classes: int = 0
    """Additive kind: class labels (the null label is ``num_classes``)."""
    depth: int = 3
    """Additive kind: MLP depth."""
    base_class: str = ""
    """Class name of the base model the adapters were trained on."""
    guidance_min: float = 1.0
    """Lower end of the trained guidance range (Imagen w); outside it the adapters extrapolate (spec B.10)."""
    guidance_max: float = 12.0
    """Upper end of the trained guidance range."""
    format_version: int = FORMAT_VERSION

    def validate(self) -> None:
        if self.kind not in ("cross_attention", "additive"):
            raise ValueError(f"AGD adapter kind must be 'cross_attention' or 'additive', got {self.kind!r}")
        if self.hidden_dim < 1 or self.fourier_dim < 2:
            raise ValueError(f"AGD hidden_dim ({self.hidden_dim}) must be >= 1 and fourier_dim ({self.fourier_dim}) "
                             f"must be >= 2")
        if self.kind == "cross_attention" and self.hidden_dim % self.num_heads:
            raise ValueError(f"AGD hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})")


def guidance_features(w: Tensor, dim: int) -> Tensor:
    """The Fourier encoding of the Imagen scale ``w``: ``guidance_scale_embedding(w - 1, dim)``, bit-identical to what
    a stock Diffusers pipeline passes as ``timestep_cond`` for ``guidance_scale = w``."""
    return guidance_scale_embedding(torch.as_tensor(w).flatten() - 1.0, dim)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class GuidanceTokenizer(nn.Module):
    """Guidance token: Fourier(w) -> Linear -> SiLU -> Linear -> LayerNorm."""

    def __init__(self, fourier_dim: int, hidden_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(fourier_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, hidden_dim))
        self.norm = nn.LayerNorm(hidden_dim)

    def forward(self, features: Tensor) -> Tensor:
        return self.norm(self.mlp(features))


class CrossAttentionAdapter(nn.Module):
    """Attention from a block's hidden states (queries) to the guidance/timestep tokens; zero-initialised output."""

    def __init__(self, query_dim: int, hidden_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(query_dim, hidden_dim, bias=False)
        self.to_k = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.to_v = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.to_out = nn.Linear(hidden_dim, query_dim)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def forward(self, hidden: Tensor, tokens: Tensor) -> Tensor:
        b, n, _ = hidden.shape
        h = self.num_heads
        q = self.to_q(hidden).view(b, n, h, -1).transpose(1, 2)
        k = self.to_k(tokens).view(b, tokens.shape[1], h, -1).transpose(1, 2)
        v = self.to_v(tokens).view(b, tokens.shape[1], h, -1).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, -1)
        return self.to_out(out)


def _safe(name: str) -> str:
    return name.replace(".", "__")


class UNetGuidanceAdapters(nn.Module):
    """All cross-attention adapters of one UNet plus the shared token builders."""

    def __init__(self, config: AdapterConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.guidance = GuidanceTokenizer(config.fourier_dim, config.hidden_dim)
        num_tokens = 1
        self.time_proj = None
        if config.timestep_token:
            if not config.time_embed_dim:
                raise ValueError("AGD timestep_token needs the base model's time_embed_dim")
            self.time_proj = nn.Linear(config.time_embed_dim, config.hidden_dim)
            num_tokens = 2
        self.pos = nn.Parameter(torch.randn(num_tokens, config.hidden_dim) * 0.02)
        self.blocks = nn.ModuleDict({_safe(name): CrossAttentionAdapter(dim, config.hidden_dim, config.num_heads)
                                     for name, dim in config.blocks.items()})

    def tokens(self, features: Tensor, time_emb: Tensor | None) -> Tensor:
        """(B, M, hidden) keys/values source: the guidance token (+ the timestep token), plus positions."""
        dtype = self.pos.dtype
        toks = [self.guidance(features.to(dtype))]
        if self.time_proj is not None:
            if time_emb is None:
                raise RuntimeError("AGD timestep token: the base model's time embedding was not observed in this call")
            toks.append(self.time_proj(time_emb.to(dtype)))
        return torch.stack(toks, dim=1) + self.pos

    def block(self, name: str) -> CrossAttentionAdapter:
        return self.blocks[_safe(name)]


class AdditiveGuidanceAdapter(nn.Module):
    """Toy "additive" adapter: ``A(x_t, t, c, w)``, an MLP on [x_t, time embedding + class embedding + guidance
    token] whose last layer is zero-initialised (so ``eps_base + A`` starts equal to the base)."""

    def __init__(self, config: AdapterConfig, emb_dim: int = 64):
        super().__init__()
        config.validate()
        self.config, self.emb_dim = config, emb_dim
        hid = config.hidden_dim
        self.time_mlp = nn.Sequential(nn.Linear(emb_dim, hid), nn.SiLU(), nn.Linear(hid, hid))
        self.class_emb = nn.Embedding(config.num_classes + 1, hid) if config.num_classes > 0 else None
        self.guidance = GuidanceTokenizer(config.fourier_dim, hid)
        layers: list[nn.Module] = [nn.Linear(config.data_dim + hid, hid), nn.SiLU()]
        for _ in range(config.depth - 1):
            layers += [nn.Linear(hid, hid), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.out = nn.Linear(hid, config.data_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, timestep: Tensor, class_labels: Tensor | None, features: Tensor) -> Tensor:
        from .mlp import sinusoidal_embedding

        n = x.shape[0]
        t = torch.as_tensor(timestep, device=x.device).float().expand(n)
        h = self.time_mlp(sinusoidal_embedding(t, self.emb_dim)) + self.guidance(features.float())
        if self.class_emb is not None and class_labels is not None:
            labels = torch.where(class_labels.long() < 0, self.config.num_classes, class_labels.long())
            h = h + self.class_emb(labels)
        return self.out(self.net(torch.cat([x.float(), h], dim=1)))


# ---------------------------------------------------------------------------------------------- UNet attachment


def _attn2_modules(unet: nn.Module) -> dict[str, nn.Module]:
    """Every transformer block's cross-attention (``...transformer_blocks.N.attn2``) of a UNet2DConditionModel."""
    return {name: m for name, m in unet.named_modules() if name.endswith(".attn2") and ".transformer_blocks." in name}


def _query_dim(attn: nn.Module) -> int:
    return int(attn.to_q.in_features)


def build_unet_adapters(unet: nn.Module, hidden_dim: int = 320, fourier_dim: int = 256, num_heads: int = 4,
                        timestep_token: bool = True, guidance_min: float = 1.0,
                        guidance_max: float = 12.0) -> UNetGuidanceAdapters:
    """Fresh (zero-output) adapters for every cross-attention block of ``unet``."""
    from .backbones import unwrap

    base = unwrap(unet)
    if type(base).__name__ != "UNet2DConditionModel":
        raise TypeError(f"AGD cross-attention adapters need a UNet2DConditionModel, got {type(base).__name__}")
    if base.config.time_cond_proj_dim is not None:
        raise ValueError("this UNet already has a guidance embedding (time_cond_proj_dim is set): it is a guidance-"
                         "distilled or LCM model, not a CFG base model; AGD adapters need the base model")
    blocks = {name: _query_dim(m) for name, m in _attn2_modules(base).items()}
    if not blocks:
        raise ValueError("this UNet has no transformer blocks with cross-attention (attn2): nowhere to put the AGD "
                         "adapters")
    cfg = AdapterConfig(kind="cross_attention", hidden_dim=hidden_dim, fourier_dim=fourier_dim, num_heads=num_heads,
                        timestep_token=timestep_token, time_embed_dim=int(base.time_embedding.linear_2.out_features),
                        blocks=blocks, base_class=type(base).__name__, guidance_min=guidance_min,
                        guidance_max=guidance_max)
    return UNetGuidanceAdapters(cfg)


class _CallState:
    def __init__(self):
        self.features: Tensor | None = None
        self.time_emb: Tensor | None = None
        self.tokens: Tensor | None = None

    def clear(self):
        self.features = self.time_emb = self.tokens = None


class AdapterHandle:
    """Adapters attached to a UNet through hooks. ``enabled`` False runs the bare base model (the frozen teacher);
    ``remove()`` detaches everything and restores ``time_cond_proj_dim``."""

    def __init__(self, unet: nn.Module, adapters: UNetGuidanceAdapters):
        self.unet, self.adapters = unet, adapters
        self.enabled = True
        self.state = _CallState()
        self._old_proj_dim = unet.config.time_cond_proj_dim
        self._hooks = [
            unet.register_forward_pre_hook(self._pre_unet, with_kwargs=True),
            unet.register_forward_hook(self._post_unet),
            unet.time_embedding.register_forward_hook(self._time_embedding),
        ]
        for name, attn in _attn2_modules(unet).items():
            self._hooks.append(attn.register_forward_hook(self._make_attn_hook(name)))
        unet.register_to_config(time_cond_proj_dim=adapters.config.fourier_dim)

    # -- hooks
    def _pre_unet(self, module, args, kwargs):
        feats = kwargs.pop("timestep_cond", None)
        if len(args) > 4:  # positional (sample, timestep, encoder_hidden_states, class_labels, timestep_cond, ...)
            raise TypeError("call the UNet with timestep_cond as a keyword argument when AGD adapters are installed")
        kwargs["timestep_cond"] = None  # the frozen base model has no cond_proj: w goes to the adapters only
        self.state.clear()
        if self.enabled:
            if feats is None:
                raise ValueError("AGD adapters need the guidance scale: call the pipeline with guidance_scale=w (the "
                                 "stock pipeline passes it as timestep_cond), or pass timestep_cond="
                                 "guidance_features(w, fourier_dim) to the UNet")
            self.state.features = feats
        return args, kwargs

    def _time_embedding(self, module, args, output):
        if self.enabled:
            self.state.time_emb = output
        return output

    def _post_unet(self, module, args, output):
        self.state.clear()
        return output

    def _make_attn_hook(self, name: str):
        def hook(module, args, output):
            if not self.enabled or self.state.features is None:
                return output
            hidden = args[0]
            if self.state.tokens is None:
                tm = self.state.time_emb if self.adapters.time_proj is not None else None
                self.state.tokens = self.adapters.tokens(self.state.features.to(hidden.device), tm)
            delta = self.adapters.block(name)(hidden.to(self.adapters.pos.dtype), self.state.tokens)
            return output + delta.to(output.dtype)

        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self.unet.register_to_config(time_cond_proj_dim=self._old_proj_dim)


def _check_fits(unet: nn.Module, config: AdapterConfig) -> None:
    found = {name: _query_dim(m) for name, m in _attn2_modules(unet).items()}
    missing = sorted(set(config.blocks) - set(found))
    extra = sorted(set(found) - set(config.blocks))
    if missing or extra:
        raise ValueError(f"these AGD adapters do not fit this UNet: adapter blocks missing from the model "
                         f"{missing[:4]}, model blocks without an adapter {extra[:4]}; adapters only combine with "
                         f"models of the architecture they were trained on ({config.base_class})")
    wrong = [(n, config.blocks[n], found[n]) for n in config.blocks if config.blocks[n] != found[n]]
    if wrong:
        raise ValueError(f"AGD adapter widths do not match this UNet (block, adapter width, model width): {wrong[:4]}")
    if config.timestep_token and int(unet.time_embedding.linear_2.out_features) != config.time_embed_dim:
        raise ValueError(f"AGD timestep token expects a time embedding of width {config.time_embed_dim}, this UNet has "
                         f"{unet.time_embedding.linear_2.out_features}")
    if unet.config.time_cond_proj_dim is not None:
        raise ValueError("this UNet already has time_cond_proj_dim set (a guidance embedding, or AGD adapters already "
                         "installed): remove them first (handle.remove()) or use the CFG base model")


def attach_adapters(unet: nn.Module, adapters: UNetGuidanceAdapters) -> AdapterHandle:
    """Hook ``adapters`` into ``unet`` (in place; see the module docstring). Returns the handle."""
    from .backbones import unwrap

    base = unwrap(unet)
    _check_fits(base, adapters.config)
    return AdapterHandle(base, adapters)


# ---------------------------------------------------------------------------------------------- files


def save_adapters(adapters: nn.Module, folder: str | os.PathLike) -> Path:
    """Write ``agd_adapters.safetensors`` + ``agd_config.json`` into ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapters.state_dict().items()}
    save_file(state, str(folder / ADAPTER_FILE))
    (folder / ADAPTER_CONFIG_FILE).write_text(json.dumps(asdict(adapters.config), indent=2))
    return folder


def load_adapters(folder: str | os.PathLike) -> nn.Module:
    """Rebuild the adapters saved in ``folder`` (safetensors only; nothing is unpickled)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_file, weights = folder / ADAPTER_CONFIG_FILE, folder / ADAPTER_FILE
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} is missing: an AGD adapter folder holds {ADAPTER_FILE} and "
                                    f"{ADAPTER_CONFIG_FILE} (written by `stepdistill export` of an agd run)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_file} is not valid JSON ({exc})") from None
    known = set(AdapterConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ValueError(f"{cfg_file} has unknown keys {unknown}; it was written by a newer stepdistill")
    if raw.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ValueError(f"{cfg_file} has format_version {raw['format_version']}; this stepdistill reads "
                         f"{FORMAT_VERSION}")
    cfg = AdapterConfig(**raw)
    module = UNetGuidanceAdapters(cfg) if cfg.kind == "cross_attention" else AdditiveGuidanceAdapter(cfg)
    module.load_state_dict(load_file(str(weights)), strict=True)
    return module


def install_adapters(pipe, path: str | os.PathLike) -> AdapterHandle:
    """Install the AGD adapters saved in ``path`` into a stock Diffusers pipeline's UNet, in one call.

    Afterwards ``pipe(prompt, guidance_scale=w)`` makes one UNet call per step (the pipeline passes w as
    ``timestep_cond`` and skips its CFG batch doubling) and the adapters reproduce the CFG output. The adapters
    follow the UNet's device and dtype. ``handle.enabled = False`` gives the base model back (then call the pipeline
    with guidance_scale=1 or remove the handle to get CFG again); ``handle.remove()`` uninstalls them.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise TypeError(f"{type(pipe).__name__} has no unet: AGD cross-attention adapters install into UNet pipelines")
    adapters = load_adapters(path)
    if not isinstance(adapters, UNetGuidanceAdapters):
        raise ValueError(f"the adapters in {path} are of kind {adapters.config.kind!r}, not UNet cross-attention ones")
    adapters.to(device=unet.device, dtype=unet.dtype)
    adapters.requires_grad_(False)
    adapters.eval()
    handle = attach_adapters(unet, adapters)
    pipe._agd_handle = handle  # keep the adapters alive with the pipeline
    return handle
