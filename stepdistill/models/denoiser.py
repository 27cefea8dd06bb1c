"""``Denoiser``: a backbone + its noise process + its prediction type, answering in any parameterization.

``predict(x_t, t, cond, want=("x0", "eps"))`` runs the backbone once (or once on a doubled batch when
classifier-free guidance is asked for: conditional and unconditional halves are concatenated into a single
forward pass), applies guidance to the native output (valid in any parameterization, spec A.3), and converts the
result in float32 with the exact formulas of ``stepdistill.diffusion.parameterization`` (spec A.2).
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor, nn

from ..diffusion.guidance import apply_cfg
from ..diffusion.parameterization import KINDS, from_x0_eps, to_x0_eps
from ..diffusion.processes import NoiseProcess
from .backbones import call_backbone, detect_family, unwrap
from .conditioning import Conditioning

__all__ = ["Denoiser"]


class Denoiser(nn.Module):
    """Wraps ``backbone`` (any supported family) whose output is ``prediction`` on ``process``.

    Args:
        backbone: a Diffusers model, a ``ToyMLP``, or an analytic toy teacher.
        process: the noise process the backbone was trained on.
        prediction: the backbone's native output kind, one of ``parameterization.KINDS``.
        sigma_data: TrigFlow's sigma_d (needed for the ``trigflow`` kind).
        input_scale: the backbone sees ``input_scale * x_t`` (sCM feeds x_t / sigma_d).
    """

    def __init__(self, backbone: nn.Module, process: NoiseProcess, prediction: str, *, family: str | None = None,
                 sigma_data: float | None = None, input_scale: float = 1.0):
        super().__init__()
        if prediction not in KINDS:
            raise ValueError(f"unknown prediction kind {prediction!r}; expected one of {KINDS}")
        self.backbone = backbone
        self.process = process
        self.prediction = prediction
        self.family = family or detect_family(backbone)
        if self.family == "analytic" and prediction != "x0":
            raise ValueError("the analytic toy teacher predicts x0")
        self.sigma_data = sigma_data if sigma_data is not None else getattr(process, "sigma_data", None)
        self.input_scale = input_scale

    # ------------------------------------------------------------------ raw calls
    @property
    def config(self):
        return getattr(unwrap(self.backbone), "config", None)

    @property
    def dtype(self) -> torch.dtype:
        for p in self.backbone.parameters():
            return p.dtype
        return torch.float32

    def native(self, x_t: Tensor, t, cond: Conditioning | None = None, guidance_input: Tensor | float | None = None) -> Tensor:
        """The backbone's own output at (x_t, t), in float32."""
        cond = cond or Conditioning()
        t = torch.as_tensor(t, device=x_t.device)
        if self.family == "analytic":
            c = self.process.coefficients(t, like=x_t)
            return self.backbone(x_t, c.alpha, c.sigma, cond.class_labels).float()
        dtype = self.dtype
        x_in = (x_t * self.input_scale).to(dtype)
        ts = self.process.model_timestep(t)
        out = call_backbone(self.family, self.backbone, x_in, ts, cond.to(dtype=dtype), guidance_input)
        return out.float()

    # ------------------------------------------------------------------ predictions
    def predict(self, x_t: Tensor, t, cond: Conditioning | None = None, *, want: Iterable[str] | str = ("x0", "eps"),
                cfg_scale: Tensor | float | None = None, uncond: Conditioning | None = None, convention: str = "imagen",
                guidance_input: Tensor | float | None = None) -> dict[str, Tensor]:
        """Predictions of the requested kinds (float32), with optional batched CFG.

        ``cfg_scale`` (float or per-sample tensor, in ``convention``) needs ``uncond``; ``guidance_input`` is the
        student's own guidance embedding input (LCM omega), independent of teacher-side CFG.
        """
        want = (want,) if isinstance(want, str) else tuple(want)
        for k in want:
            if k not in KINDS + ("native",):
                raise ValueError(f"unknown prediction kind {k!r}; expected one of {KINDS}")
        t = torch.as_tensor(t, device=x_t.device)
        if cfg_scale is None:
            out = self.native(x_t, t, cond, guidance_input)
        else:
            if uncond is None:
                raise ValueError("classifier-free guidance needs an unconditional Conditioning (uncond=...)")
            cond = cond or Conditioning()
            n = x_t.shape[0]
            t2 = torch.cat([t.expand(n), t.expand(n)]) if t.ndim <= 1 else t
            g2 = None
            if guidance_input is not None:
                g = torch.as_tensor(guidance_input, device=x_t.device, dtype=torch.float32)
                g2 = torch.cat([g.expand(n), g.expand(n)])
            both = self.native(torch.cat([x_t, x_t]), t2, cond.cat(uncond), g2)
            out = apply_cfg(both[:n], both[n:], cfg_scale, convention)
        return self.convert_output(out, x_t, t, want)

    def convert_output(self, out: Tensor, x_t: Tensor, t, want: Iterable[str]) -> dict[str, Tensor]:
        """Express a native output ``out`` at (x_t, t) as each kind in ``want`` (float32)."""
        want = tuple(want)
        x_t32 = x_t.float()
        needs_d = self.prediction in ("flow", "trigflow") or any(k in ("flow", "trigflow") for k in want)
        c = self.process.coefficients(torch.as_tensor(t, device=x_t.device), like=x_t32, derivatives=needs_d)
        x0, eps = to_x0_eps(out, self.prediction, x_t32, c, self.sigma_data)
        result = {}
        for k in want:
            if k == "native" or k == self.prediction:
                result[k] = out
            elif k == "x0":
                result[k] = x0
            elif k == "eps":
                result[k] = eps
            else:
                result[k] = from_x0_eps(x0, eps, k, c, self.sigma_data)
        return result
