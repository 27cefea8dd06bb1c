"""Adapter guidance distillation (AGD; Jensen & Sadat 2025, "Efficient distillation of classifier-free guidance
using adapters"); spec B.10.

The base model stays frozen. Small guidance-conditioned adapters (:mod:`stepdistill.models.guidance_adapters`: a
cross-attention adapter after every UNet ``attn2``, or an additive MLP for the toy teacher) learn to reproduce the
classifier-free-guided output ``eps_cfg = eps_u + w (eps_c - eps_u)`` (Imagen w, spec A.3) in ONE conditional forward
pass. Disabling the adapters restores the base model (and ordinary CFG).

Training data: a **trajectory bank** (spec B.10 [code]). For each bank trajectory a condition (prompt or class label)
and ``w ~ U[guidance_min, guidance_max]`` are drawn; the teacher's own CFG DDIM sampler runs from pure noise over
``bank_steps`` trailing timesteps (the full schedule by default), and every visited state is stored with its target:
``(x_t, t, eps_cfg(x_t, t, c, w), c, w)``. Training on states *along the CFG sampling path*, not forward-noised data,
removes the train/inference mismatch (the paper's point). The bank is built once, deterministically from
``bank_seed`` and the bank conditions (``bank_conditions``, or the first training batch's conditions, which are kept
in the checkpoint so a resumed run rebuilds the same bank). Loss: ``MSE(eps_adapter(x_t, t, c; w), eps_cfg)`` over
random (trajectory, step) pairs.

Sampling: DDIM with one adapter-equipped conditional forward per step. Export: the adapters alone
(``agd_adapters.safetensors`` + ``agd_config.json``); ``stepdistill.agd.install_adapters(pipe, folder)`` puts them
into a stock pipeline of the same base, after which ``pipe(prompt, guidance_scale=w)`` makes one UNet call per step.

Limitation: the adapters run inside the base model's forward (hooks), never through the prepared (DDP-wrapped)
adapter module, so multi-process runs are not supported yet (single process, CPU or one GPU, is).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..diffusion.solvers import ddim_step, sample_deterministic, trailing_timesteps
from ..models.backbones import unwrap
from ..models.guidance_adapters import (AdapterConfig, AdditiveGuidanceAdapter, attach_adapters, build_unet_adapters,
                                        count_parameters, guidance_features, save_adapters)
from ..models.student import freeze
from ..models.teacher_io import TeacherBundle
from .base import Recipe, StepOutput, register_recipe
from .common import discrete_vp_process
from .progressive import pd_grid

__all__ = ["AGDOptions", "AGDRecipe", "TrajectoryBank", "relative_eps_error"]


@dataclass
class AGDOptions:
    """Options of the ``agd`` recipe (``recipe.*`` keys). Defaults: the reference code's SD settings [code]."""

    guidance_min: float = 1.0
    """Lower end of the trained guidance range (Imagen w; SD reference U[1, 12], DiT U[1, 6])."""
    guidance_max: float = 12.0
    """Upper end of the trained guidance range."""
    bank_trajectories: int = 256
    """CFG trajectories in the bank (one condition and one w each)."""
    bank_steps: int = 999
    """Teacher DDIM steps per trajectory (trailing grid; the reference uses the full 999/1000-step schedule)."""
    bank_seed: int = 0
    """Seed of the bank's noise and w draws."""
    bank_conditions: list = field(default_factory=list)
    """Prompts (or class labels) of the bank, cycled; empty = the first training batch's conditions."""
    bank_chunk: int = 1024
    """Trajectories generated together while building the bank (memory knob)."""
    hidden_dim: int = 320
    """Adapter width (SD reference 320, DiT 256)."""
    num_heads: int = 4
    """Heads of each cross-attention adapter."""
    fourier_dim: int = 256
    """Fourier encoding size of w (becomes the UNet's time_cond_proj_dim when installed)."""
    timestep_token: bool = True
    """Give the adapters a timestep token (projected from the base time embedding)."""
    adapter_depth: int = 3
    """Depth of the toy additive adapter MLP."""
    sample_guidance_scale: float = 7.5
    """w of sample grids and the default of sample()."""
    sample_steps: int = 50
    """DDIM steps of sample grids and the default of sample()."""
    sample_conditions: list = field(default_factory=list)
    """Prompts (or class labels) for the periodic sample grids; empty = taken from the first batch."""

    def validate(self) -> None:
        if not 0 <= self.guidance_min <= self.guidance_max:
            raise ValueError(f"need 0 <= recipe.guidance_min <= recipe.guidance_max, got {self.guidance_min}, "
                             f"{self.guidance_max}")
        for key in ("bank_trajectories", "bank_steps", "bank_chunk", "hidden_dim", "fourier_dim", "sample_steps"):
            if getattr(self, key) < 1:
                raise ValueError(f"recipe.{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class TrajectoryBank:
    """States of the teacher's CFG sampling trajectories: ``x[m, i]`` at ``timesteps[i]`` with target ``eps[m, i]``,
    trajectory m conditioned on ``conditions[m]`` at scale ``w[m]``."""

    x: Tensor
    eps: Tensor
    timesteps: Tensor
    w: Tensor
    conditions: list

    def draw(self, n: int, generator: torch.Generator):
        m = torch.randint(0, self.x.shape[0], (n,), generator=generator)
        i = torch.randint(0, self.x.shape[1], (n,), generator=generator)
        return self.x[m, i], self.eps[m, i], self.timesteps[i], self.w[m], [self.conditions[j] for j in m.tolist()]


def relative_eps_error(eps: Tensor, eps_cfg: Tensor) -> dict[str, float]:
    """``E||eps - eps_cfg|| / E||eps_cfg||`` (headline) and the mean per-state ratio, over all given states."""
    err = (eps.double() - eps_cfg.double()).flatten(1).norm(dim=1)
    ref = eps_cfg.double().flatten(1).norm(dim=1)
    return {"rel_err": (err.mean() / ref.mean()).item(),
            "rel_err_per_state": (err / ref.clamp_min(1e-12)).mean().item()}


def _conditions_to_tensor(conds: list) -> dict[str, Tensor]:
    if conds and isinstance(conds[0], int):
        return {"labels": torch.tensor(conds, dtype=torch.long)}
    blob = "\n".join(str(c) for c in conds).encode("utf-8")
    return {"prompts_utf8": torch.tensor(list(blob), dtype=torch.uint8), "num": torch.tensor([len(conds)])}


def _conditions_from_tensor(state: dict[str, Tensor]) -> list:
    if "labels" in state:
        return state["labels"].tolist()
    text = bytes(state["prompts_utf8"].tolist()).decode("utf-8")
    return text.split("\n") if int(state["num"].item()) > 0 else []


@register_recipe("agd")
class AGDRecipe(Recipe):
    name = "agd"
    options_class = AGDOptions

    def __init__(self, teacher: TeacherBundle, options: AGDOptions, device: torch.device | str = "cpu"):
        options.validate()
        self.options, self.teacher, self.device = options, teacher, torch.device(device)
        self.process = discrete_vp_process(teacher, "AGD", "it samples the teacher's trajectories on a DDIM grid")
        freeze(teacher.denoiser.backbone)
        teacher.denoiser.to(self.device)
        family = teacher.denoiser.family
        self.handle = None
        if family == "unet2d_condition":
            self.adapters = build_unet_adapters(teacher.denoiser.backbone, options.hidden_dim, options.fourier_dim,
                                                options.num_heads, options.timestep_token, options.guidance_min,
                                                options.guidance_max).to(self.device)
            self.handle = attach_adapters(teacher.denoiser.backbone, self.adapters)
            base_params = count_parameters(unwrap(teacher.denoiser.backbone))
        elif family == "analytic" and len(teacher.sample_shape) == 1:
            seed = teacher.student_seed()
            cfg = AdapterConfig(kind="additive", hidden_dim=options.hidden_dim, fourier_dim=options.fourier_dim,
                                data_dim=int(teacher.sample_shape[0]), num_classes=int(getattr(seed, "num_classes", 0)),
                                depth=options.adapter_depth, base_class=type(teacher.denoiser.backbone).__name__,
                                guidance_min=options.guidance_min, guidance_max=options.guidance_max)
            self.adapters = AdditiveGuidanceAdapter(cfg).to(self.device)
            base_params = 0
        else:
            raise ValueError(f"AGD adapters are implemented for UNet2DConditionModel teachers (cross-attention "
                             f"adapters) and the toy2d teacher (additive); this teacher's backbone family is "
                             f"{family!r}")
        self.adapter_parameters = count_parameters(self.adapters)
        self.parameter_fraction = self.adapter_parameters / base_params if base_params else None
        self.bank: TrajectoryBank | None = None
        self._bank_conditions: list = list(options.bank_conditions)
        self._sample_conditions = list(options.sample_conditions)

    # ------------------------------------------------------------------ protocol
    def trainable_modules(self):
        return {"adapters": self.adapters}

    def set_prepared(self, name, module):
        self._prepared = module  # the hooks call the bare adapters; gradients land on the same parameters

    def state_dict_for_checkpoint(self):
        state = {"adapters": self.adapters.state_dict()}
        if self._bank_conditions:  # the bank's conditions: a resumed run rebuilds the identical bank from them
            state["bank"] = _conditions_to_tensor(self._bank_conditions)
        return state

    def load_state_dict_from_checkpoint(self, state):
        self.adapters.load_state_dict(state["adapters"])
        if "bank" in state:
            self._bank_conditions = _conditions_from_tensor(state["bank"])
            self.bank = None  # rebuilt lazily from the same conditions and seed

    # ------------------------------------------------------------------ models
    @contextlib.contextmanager
    def base_model(self):
        """The frozen base model (adapters off)."""
        if self.handle is None:
            yield
            return
        prev, self.handle.enabled = self.handle.enabled, False
        try:
            yield
        finally:
            self.handle.enabled = prev

    def _t(self, t: Tensor, n: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device).long()
        return t.expand(n) if t.ndim == 0 else t

    def adapter_predict(self, x: Tensor, t: Tensor, cond, w: Tensor) -> dict[str, Tensor]:
        """One conditional forward with the adapters at guidance ``w`` (per-sample tensor): ``{"x0", "eps"}``."""
        n = x.shape[0]
        t = self._t(t, n)
        w = torch.as_tensor(w, dtype=torch.float32, device=self.device).expand(n)
        den = self.teacher.denoiser
        if self.handle is not None:
            return den.predict(x, t, cond, want=("x0", "eps"), guidance_input=w - 1.0)
        eps = den.predict(x, t, cond, want="eps")["eps"]
        feats = guidance_features(w, self.adapters.config.fourier_dim).to(x.device)
        eps = eps + self.adapters(x, t, cond.class_labels, feats)
        c = self.process.coefficients(t, like=eps)
        return {"x0": (x.float() - c.sigma * eps) / c.alpha, "eps": eps}

    def base_predict(self, x: Tensor, t: Tensor, cond) -> dict[str, Tensor]:
        """The frozen base model's conditional output (what the adapters start from)."""
        n = x.shape[0]
        with torch.no_grad(), self.base_model():
            kw = {"guidance_input": torch.zeros(n, device=self.device)} if self.handle is not None else {}
            return self.teacher.denoiser.predict(x, self._t(t, n), cond, want=("x0", "eps"), **kw)

    @torch.no_grad()
    def teacher_cfg(self, x: Tensor, t: Tensor, cond, uncond, w: Tensor) -> dict[str, Tensor]:
        """The base model with batched CFG at per-sample Imagen ``w``: ``{"x0", "eps"}`` (x0 and eps from the same
        guided output, spec A.3)."""
        n = x.shape[0]
        w = torch.as_tensor(w, dtype=torch.float32, device=self.device).expand(n)
        with self.base_model():
            kw = {"guidance_input": torch.zeros(n, device=self.device)} if self.handle is not None else {}
            return self.teacher.denoiser.predict(x, self._t(t, n), cond, want=("x0", "eps"), cfg_scale=w,
                                                 uncond=uncond, convention="imagen", **kw)

    # ------------------------------------------------------------------ trajectory bank
    def _encode(self, conditions: list):
        conds = torch.tensor(conditions, dtype=torch.long) if isinstance(conditions[0], int) else list(conditions)
        return self.teacher.encode_conditions(conds, self.device)

    @torch.no_grad()
    def cfg_trajectories(self, conditions: list, w: Tensor, noise: Tensor, steps: int):
        """Run the teacher's CFG DDIM sampler from ``noise`` (x_T) over ``steps`` trailing timesteps; returns
        ``(x, eps_cfg, timesteps)`` with ``x[:, i]`` the state at ``timesteps[i]`` and ``eps_cfg[:, i]`` its target."""
        ts = trailing_timesteps(self.process.num_train_timesteps, steps)
        cond, uncond = self._encode(conditions)
        x = noise.to(self.device).float()
        xs, es = [], []
        for i, t in enumerate(ts):
            out = self.teacher_cfg(x, torch.tensor(t), cond, uncond, w)
            xs.append(x.cpu())
            es.append(out["eps"].cpu())
            if i + 1 < len(ts):
                x = ddim_step(out["x0"], out["eps"], self.process.coefficients(torch.tensor(ts[i + 1]), like=x))
        return torch.stack(xs, 1), torch.stack(es, 1), torch.tensor(ts, dtype=torch.long)

    def build_bank(self) -> TrajectoryBank:
        o = self.options
        base = self._bank_conditions or list(self._sample_conditions)
        if not base:
            raise ValueError("the AGD trajectory bank needs conditions: set recipe.bank_conditions, or train with a "
                             "data source that yields conditions")
        self._bank_conditions = list(base)
        conds = (list(base) * (o.bank_trajectories // len(base) + 1))[:o.bank_trajectories]
        g = torch.Generator().manual_seed(o.bank_seed)
        w = o.guidance_min + (o.guidance_max - o.guidance_min) * torch.rand(o.bank_trajectories, generator=g)
        noise = torch.randn((o.bank_trajectories, *self.teacher.sample_shape), generator=g)
        xs, es, ts = [], [], None
        for a in range(0, o.bank_trajectories, o.bank_chunk):
            b = min(a + o.bank_chunk, o.bank_trajectories)
            x, e, ts = self.cfg_trajectories(conds[a:b], w[a:b], noise[a:b], o.bank_steps)
            xs.append(x)
            es.append(e)
        return TrajectoryBank(torch.cat(xs), torch.cat(es), ts, w, conds)

    # ------------------------------------------------------------------ training
    def training_step(self, batch, step, generator):
        if self.bank is None:
            self.remember_conditions(batch)
            self.bank = self.build_bank()
        n = len(batch["conditions"])
        x, eps_cfg, t, w, conds = self.bank.draw(n, generator)
        cond, _ = self._encode(conds)
        pred = self.adapter_predict(x.to(self.device), t, cond, w)["eps"]
        loss = ((pred - eps_cfg.to(self.device)) ** 2).mean()
        return StepOutput(losses={"adapters": loss}, logs={"loss": loss.detach(), "w_mean": w.mean()})

    # ------------------------------------------------------------------ sampling, diagnostics, export
    @torch.no_grad()
    def sample(self, num, generator, conditions=None, steps: int | None = None, guidance_scale: float | None = None):
        """DDIM on the trailing grid with ONE adapter-equipped conditional forward per step at guidance ``w``;
        ``randn((num, *sample_shape))`` (x_T) is the first draw from ``generator``."""
        noise = torch.randn((num, *self.teacher.sample_shape), generator=generator).to(self.device)
        steps = int(steps or self.options.sample_steps)
        w = float(self.options.sample_guidance_scale if guidance_scale is None else guidance_scale)
        conditions = self.default_conditions(num) if conditions is None else conditions
        cond, _ = self.teacher.encode_conditions(conditions, self.device)
        grid = pd_grid(self.process, steps)
        ts = [grid[k].long() for k in range(steps, 0, -1)]
        wt = torch.full((num,), w)

        def predict(x, t):
            out = self.adapter_predict(x, t, cond, wt)
            return out["x0"], out["eps"]

        return self.teacher.codec.decode(sample_deterministic(predict, self.process, ts, noise, "ddim"))

    @torch.no_grad()
    def trajectory_error(self, conditions: list, w: float, noise: Tensor, steps: int) -> dict[str, float]:
        """Spec C.4's AGD criterion on fresh CFG trajectories: ``E||eps_agd - eps_cfg|| / E||eps_cfg||`` over every
        state of the teacher's CFG DDIM path (uniform over trajectories and steps), plus the same error of the plain
        conditional base model (what one pass gives without adapters)."""
        x, eps_cfg, ts = self.cfg_trajectories(conditions, torch.full((len(conditions),), float(w)), noise, steps)
        cond, _ = self._encode(conditions)
        agd, base = [], []
        for i in range(len(ts)):
            xi = x[:, i].to(self.device)
            agd.append(self.adapter_predict(xi, ts[i], cond, torch.full((len(conditions),), float(w)))["eps"].cpu())
            base.append(self.base_predict(xi, ts[i], cond)["eps"].cpu())
        flat = lambda v: v.reshape(-1, *v.shape[2:])  # noqa: E731
        ours = relative_eps_error(flat(torch.stack(agd, 1)), flat(eps_cfg))
        cond_only = relative_eps_error(flat(torch.stack(base, 1)), flat(eps_cfg))
        return {"w": float(w), "rel_err": ours["rel_err"], "rel_err_per_state": ours["rel_err_per_state"],
                "cond_only_rel_err": cond_only["rel_err"], "states": int(x.shape[0] * x.shape[1])}

    def toy2d_metrics(self, mixture, w: float, seed: int, trajectories: int = 500, steps: int = 1000) -> dict:
        """AGD's toy2d criterion (spec C.4: eps error along CFG trajectories <= 5% of ||eps_cfg||) at several w."""
        o = self.options
        ws = sorted({float(w)} | {v for v in (1.5, 2.0, 3.0, 4.0) if o.guidance_min <= v <= o.guidance_max})
        rows = []
        for k, wv in enumerate(ws):
            g = torch.Generator().manual_seed(10_000 + 97 * seed + k)
            labels = torch.randint(0, max(1, mixture.num_classes), (trajectories,), generator=g).tolist()
            noise = torch.randn((trajectories, *self.teacher.sample_shape), generator=g)
            rows.append(self.trajectory_error(labels, wv, noise, steps))
        worst = max(r["rel_err"] for r in rows)
        return {"metric": "AGD eps error along fresh CFG trajectories: E||eps_agd - eps_cfg|| / E||eps_cfg|| over "
                          "every "
                          f"state of {trajectories} teacher CFG DDIM trajectories x {steps} steps per w (uniform "
                          "labels, independent seeds); cond_only_rel_err = the same for the plain conditional pass",
                "rows": rows, "worst_rel_err": worst, "passes_5pct": bool(worst <= 0.05),
                "adapter_parameters": self.adapter_parameters}

    def export(self, out_dir):
        from pathlib import Path

        from ..evaluation.teacher_ref import teacher_reference
        from ..export import SamplingSpec, _write_folder, write_sampling_spec

        if self.handle is None:
            raise NotImplementedError("toy2d AGD adapters have no Diffusers export; their weights are in the run's "
                                      "checkpoints")
        o = self.options
        card = f"""---
library_name: diffusers
tags: [stepdistill, agd, adapter-guidance-distillation]
---
# AGD adapters exported by stepdistill

Adapter guidance distillation (spec B.10): {self.adapter_parameters:,} adapter parameters
({100 * (self.parameter_fraction or 0):.2f}% of the base UNet) that reproduce classifier-free guidance in one UNet call
per step. Trained for guidance_scale in [{o.guidance_min}, {o.guidance_max}]. The base model is unchanged: install the
adapters into a pipeline of the same base model.

```python
from diffusers import DiffusionPipeline
from stepdistill.agd import install_adapters

pipe = DiffusionPipeline.from_pretrained("PATH/TO/THE/BASE/PIPELINE")
handle = install_adapters(pipe, "PATH/TO/THIS/FOLDER")
image = pipe("your prompt", guidance_scale={o.sample_guidance_scale}, num_inference_steps={o.sample_steps}).images[0]
handle.remove()  # back to the plain base model (and ordinary CFG)
```
"""

        spec = SamplingSpec(recipe="agd", variant="adapters", num_inference_steps=int(o.sample_steps),
                            guidance_scale=float(o.sample_guidance_scale),
                            scheduler=type(self.teacher.pipeline.scheduler).__name__,
                            notes="adapters only: install them into the base pipeline named by extra.teacher "
                                  "(stepdistill.agd.install_adapters); one UNet call per step at guidance_scale",
                            extra={"teacher": teacher_reference(self.teacher.pipeline), "adapters": True,
                                   "guidance_range": [o.guidance_min, o.guidance_max]})

        def write(tmp: Path) -> None:
            save_adapters(self.adapters, tmp)
            (tmp / "README.md").write_text(card)
            write_sampling_spec(tmp, spec)

        return _write_folder(out_dir, write)
