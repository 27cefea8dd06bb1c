"""Gaussian noise processes ``x_t = alpha(t) * x0 + sigma(t) * eps`` (spec A.1).

Every process answers in its own time variable:

=================  ==========================  =================  ===================  ===================
process            time ``t``                  ``alpha(t)``       ``sigma(t)``         model timestep
=================  ==========================  =================  ===================  ===================
``DiscreteVP``     integer index 0..T-1        sqrt(abar_t)       sqrt(1 - abar_t)     ``t``
``CosineVP``       u in [0, 1]                 cos(a u + b)       sin(a u + b)         ``1000 u``
``RectifiedFlow``  s in [0, 1]                 1 - s              s                    ``1000 s``
``TrigFlow``       t in [0, pi/2]              cos t              sigma_d sin t        ``t``
``EDM``            sigma in [s_min, s_max]     1                  sigma                ``ln(sigma) / 4``
=================  ==========================  =================  ===================  ===================

The cosine VP schedule of progressive distillation (Salimans & Ho 2022) is
``logSNR(u) = -2 log tan(a u + b)``; with alpha^2 + sigma^2 = 1 this is exactly
``alpha = cos(a u + b)``, ``sigma = sin(a u + b)``.

All coefficient math runs in float64 and is cast to the caller's dtype at the end.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import Tensor

__all__ = [
    "PathCoefficients",
    "NoiseProcess",
    "DiscreteVP",
    "CosineVP",
    "RectifiedFlow",
    "TrigFlow",
    "EDM",
    "process_from_scheduler_config",
    "prediction_kind_from_diffusers",
    "diffusers_prediction_type",
]


@dataclass(frozen=True)
class PathCoefficients:
    """alpha, sigma and their time derivatives at a batch of times, shaped to broadcast against x_t."""

    alpha: Tensor
    sigma: Tensor
    d_alpha: Tensor | None = None
    d_sigma: Tensor | None = None

    def to(self, dtype: torch.dtype) -> "PathCoefficients":
        cast = lambda v: None if v is None else v.to(dtype)  # noqa: E731
        return PathCoefficients(cast(self.alpha), cast(self.sigma), cast(self.d_alpha), cast(self.d_sigma))


def _as_time(t: Tensor | float | int, device: torch.device | None = None) -> Tensor:
    if not torch.is_tensor(t):
        t = torch.tensor(t)
    return t.to(device=device) if device is not None else t


def _version_of(t: Tensor) -> int | None:
    """The in-place version counter of ``t`` (None for inference-mode tensors, which have none)."""
    try:
        return t._version
    except RuntimeError:
        return None


def _bcast(v: Tensor, like: Tensor | None) -> Tensor:
    """Shape a per-sample (N,) or scalar coefficient so it broadcasts against ``like`` (N, ...)."""
    if like is None:
        return v
    v = v.to(device=like.device)
    if v.ndim == 0:
        return v.reshape((1,) * like.ndim)
    return v.reshape(v.shape + (1,) * (like.ndim - v.ndim))


class NoiseProcess(ABC):
    """A Gaussian path. Subclasses define alpha, sigma (float64) and optionally their derivatives."""

    kind: str = "abstract"
    t_min: float
    t_max: float

    @abstractmethod
    def _alpha(self, t: Tensor) -> Tensor: ...

    @abstractmethod
    def _sigma(self, t: Tensor) -> Tensor: ...

    def _d_alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no continuous time derivative")

    def _d_sigma(self, t: Tensor) -> Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no continuous time derivative")

    has_derivatives: bool = True

    def alpha(self, t, like: Tensor | None = None) -> Tensor:
        t = _as_time(t)
        out = self._alpha(t)
        return _bcast(out, like).to(like.dtype) if like is not None else out

    def sigma(self, t, like: Tensor | None = None) -> Tensor:
        t = _as_time(t)
        out = self._sigma(t)
        return _bcast(out, like).to(like.dtype) if like is not None else out

    def coefficients(self, t, like: Tensor | None = None, derivatives: bool = False) -> PathCoefficients:
        """alpha, sigma (and d/dt when asked) at ``t``, float64 unless ``like`` gives shape/dtype/device."""
        t = _as_time(t)
        a, s = self._alpha(t), self._sigma(t)
        da = ds = None
        if derivatives:
            da, ds = self._d_alpha(t), self._d_sigma(t)
        coeffs = PathCoefficients(*(None if v is None else _bcast(v, like) for v in (a, s, da, ds)))
        return coeffs.to(like.dtype) if like is not None else coeffs

    def eta(self, t) -> Tensor:
        """Half log-SNR ``eta_t = log(alpha_t / sigma_t)``; grows toward the data."""
        t = _as_time(t)
        return torch.log(self._alpha(t)) - torch.log(self._sigma(t))

    def add_noise(self, x0: Tensor, eps: Tensor, t) -> Tensor:
        c = self.coefficients(_as_time(t, x0.device), like=x0)
        return c.alpha * x0 + c.sigma * eps

    @abstractmethod
    def model_timestep(self, t: Tensor) -> Tensor:
        """The timestep value the backbone was trained to receive at time ``t``."""

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind}


class DiscreteVP(NoiseProcess):
    """Discrete variance-preserving DDPM process read from a Diffusers scheduler (``alphas_cumprod``).

    ``t`` is an integer index; the model sees ``t`` itself. Fractional indices are refused (spec A.1:
    never feed fractional indices to a model trained on integer timesteps).
    """

    kind = "discrete_vp"
    has_derivatives = False

    def __init__(self, alphas_cumprod: Tensor, scheduler_config: Mapping[str, Any] | None = None):
        acp = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if acp.ndim != 1 or acp.numel() < 2:
            raise ValueError("alphas_cumprod must be a 1-D table with at least two entries")
        if not torch.all((acp > 0) & (acp <= 1)):
            raise ValueError("alphas_cumprod must lie in (0, 1]; a zero-terminal-SNR table needs its last entry clamped")
        self.alphas_cumprod = acp
        self.num_train_timesteps = acp.numel()
        self.t_min, self.t_max = 0, self.num_train_timesteps - 1
        self.scheduler_config = dict(scheduler_config or {})

    @classmethod
    def from_scheduler_config(cls, config: Mapping[str, Any]) -> "DiscreteVP":
        """Build from any Diffusers discrete scheduler config by letting DDPMScheduler compute the betas."""
        import inspect

        from diffusers import DDPMScheduler

        allowed = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in dict(config).items() if k in allowed and not k.startswith("_")}
        sched = DDPMScheduler(**kwargs)
        acp = sched.alphas_cumprod.to(torch.float64)
        if bool(kwargs.get("rescale_betas_zero_snr", False)):
            # Zero terminal SNR makes alpha_T = 0 exactly; clamp like Diffusers does for its conversions.
            acp = acp.clamp(min=2**-24)
        return cls(acp, scheduler_config=dict(config))

    def _index(self, t: Tensor) -> Tensor:
        """Validated integer indices of ``t``. One host read per distinct tensor (both checks are read together, and
        the result for the tensor last seen is reused while it is unmodified: ``coefficients`` asks for alpha and
        sigma of the same ``t``), so a training step on a GPU does not stall on a sync per coefficient."""
        last = getattr(self, "_last_index", None)
        version = _version_of(t)
        if last is not None and last[0] is t and version is not None and last[1] == version:
            return last[2]
        frac = t.is_floating_point()
        idx = t.round().long() if frac else t.long()
        bad_range = ((idx < 0) | (idx >= self.num_train_timesteps)).any()
        bad_frac = (t != torch.round(t)).any() if frac else torch.zeros_like(bad_range)
        bad_frac, bad_range = torch.stack([bad_frac, bad_range]).tolist()  # the single host sync
        if bad_frac:
            raise ValueError(
                "DiscreteVP got a fractional timestep; pass integer indices in [0, "
                f"{self.num_train_timesteps - 1}] (the teacher was trained on integer timesteps)"
            )
        if bad_range:
            raise ValueError(f"DiscreteVP timestep out of range [0, {self.num_train_timesteps - 1}]: {idx.tolist()}")
        if version is not None:
            self._last_index = (t, version, idx)
        return idx

    def _table(self, device: torch.device) -> Tensor:
        """``alphas_cumprod`` on ``device``, copied there once (not on every call)."""
        cache = self.__dict__.setdefault("_table_cache", {})
        key = (device, id(self.alphas_cumprod))
        if key not in cache:
            cache.clear() if len(cache) > 4 else None
            cache[key] = self.alphas_cumprod.to(device)
        return cache[key]

    def _alpha(self, t: Tensor) -> Tensor:
        idx = self._index(t)
        return self._table(idx.device)[idx].sqrt()

    def _sigma(self, t: Tensor) -> Tensor:
        idx = self._index(t)
        return (1.0 - self._table(idx.device)[idx]).sqrt()

    def model_timestep(self, t: Tensor) -> Tensor:
        return self._index(_as_time(t))

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "num_train_timesteps": self.num_train_timesteps}


class CosineVP(NoiseProcess):
    """Continuous cosine VP schedule of progressive distillation, logSNR clipped to [logsnr_min, logsnr_max]."""

    kind = "cosine_vp"

    def __init__(self, logsnr_min: float = -20.0, logsnr_max: float = 20.0):
        self.b = math.atan(math.exp(-0.5 * logsnr_max))
        self.a = math.atan(math.exp(-0.5 * logsnr_min)) - self.b
        self.t_min, self.t_max = 0.0, 1.0

    def _phi(self, t: Tensor) -> Tensor:
        return self.a * t.to(torch.float64) + self.b

    def _alpha(self, t):
        return torch.cos(self._phi(t))

    def _sigma(self, t):
        return torch.sin(self._phi(t))

    def _d_alpha(self, t):
        return -self.a * torch.sin(self._phi(t))

    def _d_sigma(self, t):
        return self.a * torch.cos(self._phi(t))

    def model_timestep(self, t):
        return 1000.0 * _as_time(t).to(torch.float32)


class RectifiedFlow(NoiseProcess):
    """Rectified flow ``x_s = (1 - s) x0 + s eps``; Diffusers models receive ``1000 s``."""

    kind = "rectified_flow"

    def __init__(self, num_train_timesteps: int = 1000):
        self.num_train_timesteps = num_train_timesteps
        self.t_min, self.t_max = 0.0, 1.0

    def _alpha(self, t):
        return 1.0 - t.to(torch.float64)

    def _sigma(self, t):
        return t.to(torch.float64)

    def _d_alpha(self, t):
        return -torch.ones_like(t, dtype=torch.float64)

    def _d_sigma(self, t):
        return torch.ones_like(t, dtype=torch.float64)

    def model_timestep(self, t):
        return self.num_train_timesteps * _as_time(t).to(torch.float32)


class TrigFlow(NoiseProcess):
    """TrigFlow (Lu & Song 2024): ``x_t = cos t x0 + sin t z``, z ~ N(0, sigma_d^2 I), i.e. sigma(t) = sigma_d sin t."""

    kind = "trigflow"

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = float(sigma_data)
        self.t_min, self.t_max = 0.0, math.pi / 2

    def _alpha(self, t):
        return torch.cos(t.to(torch.float64))

    def _sigma(self, t):
        return self.sigma_data * torch.sin(t.to(torch.float64))

    def _d_alpha(self, t):
        return -torch.sin(t.to(torch.float64))

    def _d_sigma(self, t):
        return self.sigma_data * torch.cos(t.to(torch.float64))

    def model_timestep(self, t):
        return _as_time(t).to(torch.float32)

    def describe(self):
        return {"kind": self.kind, "sigma_data": self.sigma_data}


class EDM(NoiseProcess):
    """Variance exploding EDM path (Karras et al. 2022): alpha = 1, sigma = t; c_noise = ln(sigma)/4."""

    kind = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, sigma_data: float = 0.5):
        self.t_min, self.t_max, self.sigma_data = sigma_min, sigma_max, sigma_data

    def _alpha(self, t):
        return torch.ones_like(t, dtype=torch.float64)

    def _sigma(self, t):
        return t.to(torch.float64)

    def _d_alpha(self, t):
        return torch.zeros_like(t, dtype=torch.float64)

    def _d_sigma(self, t):
        return torch.ones_like(t, dtype=torch.float64)

    def model_timestep(self, t):
        return 0.25 * torch.log(_as_time(t).to(torch.float32))


_DIFFUSERS_PREDICTION = {"epsilon": "eps", "v_prediction": "v", "sample": "x0", "flow_prediction": "flow"}


def prediction_kind_from_diffusers(name: str) -> str:
    """Map a Diffusers ``prediction_type`` to our parameterization name (see ``parameterization.KINDS``)."""
    if name not in _DIFFUSERS_PREDICTION:
        raise ValueError(f"unknown Diffusers prediction_type {name!r}; expected one of {sorted(_DIFFUSERS_PREDICTION)}")
    return _DIFFUSERS_PREDICTION[name]


def diffusers_prediction_type(kind: str) -> str:
    """Our parameterization name -> the Diffusers ``prediction_type`` string."""
    inverse = {v: k for k, v in _DIFFUSERS_PREDICTION.items()}
    if kind not in inverse:
        raise ValueError(f"parameterization {kind!r} has no Diffusers prediction_type (have {sorted(inverse)})")
    return inverse[kind]


_FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler", "FlowMatchLCMScheduler"}


def process_from_scheduler_config(config: Mapping[str, Any]) -> tuple[NoiseProcess, str]:
    """(process, prediction kind) for a Diffusers scheduler config dict (``scheduler_config.json``).

    Flow-matching schedulers give a ``RectifiedFlow`` with flow prediction; SCMScheduler a ``TrigFlow``;
    every other discrete scheduler a ``DiscreteVP`` with the config's ``prediction_type``.
    """
    cls_name = config.get("_class_name", "")
    if cls_name in _FLOW_SCHEDULERS or config.get("use_flow_sigmas") or config.get("prediction_type") == "flow_prediction":
        return RectifiedFlow(int(config.get("num_train_timesteps", 1000))), "flow"
    if cls_name == "SCMScheduler":
        return TrigFlow(float(config.get("sigma_data", 0.5))), "trigflow"
    pred = prediction_kind_from_diffusers(config.get("prediction_type", "epsilon"))
    return DiscreteVP.from_scheduler_config(config), pred
