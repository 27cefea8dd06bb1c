"""Shared pieces of the distribution-matching family (DMD2, spec B.8; VSD / SwiftBrush, spec B.7).

Math (x0 forms, ``x_t = alpha_t x0 + sigma_t eps``):

* DMD2 gradient (B.8 step 3): ``grad = nan_to_num((x0_fake - x0_real) / mean_CHW |x0_gen - x0_real|)`` in float64.
  It is the score difference ``s_fake - s_real = alpha/sigma^2 (x0_fake - x0_real)`` up to a per-sample positive
  factor: the normaliser replaces DMD's time weighting ``w_t``.
* VSD gradient (B.7 step 3): ``g = nan_to_num(w(t) (eps_teacher - eps_fake))`` with ``w(t) = sigma_t^2``; in x0 form
  ``sigma^2 (eps_T - eps_L) = alpha sigma (x0_L - x0_T)``.
* Both are applied through the surrogate ``L = 1/2 mean((x0 - sg(x0 - grad))^2)`` whose gradient with respect to
  the generator sample ``x0`` is ``grad / numel`` (B.7 step 4, B.8 step 4).
* Fake-score ("critic") denoising loss on *detached* generator samples: ``mean(lambda_t (eps_phi - eps)^2)`` with
  ``lambda_t = 1`` (DMD2 on SD), ``alpha_t^2`` (SwiftBrush) or ``1/alpha_t^2`` (v-MSE; toy teachers).

Also: networks built from the teacher (generator copy, fake score as a full copy or as LoRA on the teacher),
seeded integer timestep draws, per-sample prompt dropout, and the sample statistics the recipes log.
"""

from __future__ import annotations

import contextlib
from dataclasses import fields

import torch
from torch import Tensor, nn

from ..models.backbones import unwrap
from ..models.conditioning import Conditioning
from ..models.denoiser import Denoiser
from ..models.student import add_lora, adapters_disabled, copy_backbone, freeze
from .common import discrete_vp_process

__all__ = ["annealed_range", "dm_gradient", "vsd_gradient", "surrogate_loss", "draw_timesteps", "drop_conditions",
           "guided_predict", "fake_denoising_loss", "sample_stats", "generator_backbone", "FakeScore", "load_unet_from",
           "discrete_vp_process", "build_generator_and_fake_score"]


def dm_gradient(x0_gen: Tensor, x0_real: Tensor, x0_fake: Tensor) -> Tensor:
    """DMD2's normalised distribution-matching gradient (spec B.8 step 3), float64, NaN/inf -> finite."""
    x0_gen, x0_real, x0_fake = (v.detach().double() for v in (x0_gen, x0_real, x0_fake))
    dims = tuple(range(1, x0_gen.ndim))
    norm = (x0_gen - x0_real).abs().mean(dim=dims, keepdim=True)
    return torch.nan_to_num((x0_fake - x0_real) / norm)


def vsd_gradient(eps_teacher: Tensor, eps_fake: Tensor, sigma: Tensor) -> Tensor:
    """VSD's ``g = nan_to_num(sigma_t^2 (eps_teacher - eps_fake))`` (spec B.7 step 3), float32.
    ``sigma`` broadcasts against the eps tensors (shape (N, 1, ...))."""
    return torch.nan_to_num((sigma.float() ** 2) * (eps_teacher.detach().float() - eps_fake.detach().float()))


def surrogate_loss(x0: Tensor, grad: Tensor) -> Tensor:
    """``1/2 mean((x0 - sg(x0 - grad))^2)``: d/dx0 = grad / numel (spec B.7 step 4, B.8 step 4)."""
    x0 = x0.float()
    target = (x0 - grad.to(x0.dtype)).detach()
    return 0.5 * torch.mean((x0 - target) ** 2)


def draw_timesteps(n: int, low: int, high: int, generator: torch.Generator) -> Tensor:
    """n integer timesteps uniform on {low, ..., high} (inclusive), from the seeded CPU generator."""
    if not 0 <= low <= high:
        raise ValueError(f"timestep range [{low}, {high}] is empty or negative")
    return torch.randint(low, high + 1, (n,), generator=generator)


def annealed_range(low: int, high: int, high_late: int | None, anneal_step: int, step: int | None) -> tuple[int, int]:
    """Loss timestep range ``(low, high)`` with the upper end annealed (ProlificDreamer-style, spec B.7): from update
    ``anneal_step`` on it is ``(low, high_late)``; ``high_late=None`` or an unknown ``step`` keeps ``(low, high)``."""
    if high_late is not None and step is not None and step >= anneal_step:
        return low, high_late
    return low, high


def _where(mask: Tensor, a, b):
    if a is None:
        return None
    if torch.is_tensor(a):
        m = mask.to(a.device).reshape(-1, *([1] * (a.ndim - 1)))
        return torch.where(m, b, a)
    return {k: _where(mask, a[k], b[k]) for k in a}


def drop_conditions(cond: Conditioning, uncond: Conditioning, prob: float, generator: torch.Generator) -> Conditioning:
    """Replace each sample's conditioning by the unconditional one with probability ``prob`` (CFG dropout)."""
    n = cond.batch_size
    if prob <= 0 or n is None:
        return cond
    drop = torch.rand(n, generator=generator) < prob
    return Conditioning(**{f.name: _where(drop, getattr(cond, f.name), getattr(uncond, f.name))
                           for f in fields(Conditioning) if f.name != "extra"})


def guided_predict(den: Denoiser, x_t: Tensor, t: Tensor, cond: Conditioning, uncond: Conditioning, w,
                   want=("x0", "eps")) -> dict[str, Tensor]:
    """``den`` with Imagen-convention CFG ``w`` (float or per-sample tensor); ``w == 1`` (a float) runs the
    conditional branch alone, so a fake score identical to the teacher gives bit-identical outputs."""
    if not torch.is_tensor(w) and float(w) == 1.0:
        return den.predict(x_t, t, cond, want=want)
    return den.predict(x_t, t, cond, want=want, cfg_scale=w, uncond=uncond, convention="imagen")


def fake_denoising_loss(fake: Denoiser, x0: Tensor, cond: Conditioning, t: Tensor, noise: Tensor,
                        weighting: str = "eps") -> Tensor:
    """Denoising loss of the fake score on detached generator samples: ``mean(lambda_t (eps_phi - eps)^2)`` with
    ``lambda_t = 1`` ("eps", DMD2 on SD), ``alpha_t^2`` ("alpha2", SwiftBrush) or ``1 / alpha_t^2`` ("v": the v-MSE
    on a VP path, i.e. x0-MSE weighted by ``1/sigma_t^2 + 1``, the balanced weighting DMD2 uses for its EDM teacher,
    ``1/sigma^2 + 1/sigma_d^2``). With "eps" the x0 estimate ``(x_t - sigma eps)/alpha`` of a fake score is barely
    constrained where alpha_t is tiny (the toy2d schedule has alpha_999 = 0.006): use "v" there."""
    x0 = x0.detach()
    x_t = fake.process.add_noise(x0, noise, t)
    eps = fake.predict(x_t, t, cond, want="eps")["eps"]
    err = (eps - noise.float()) ** 2
    if weighting == "alpha2":
        err = err * fake.process.coefficients(t, like=err).alpha ** 2
    elif weighting == "v":
        err = err / fake.process.coefficients(t, like=err).alpha ** 2
    elif weighting != "eps":
        raise ValueError(f"unknown fake-score loss weighting {weighting!r}; expected 'eps', 'alpha2' or 'v'")
    return err.mean()


@torch.no_grad()
def sample_stats(x: Tensor) -> dict[str, Tensor]:
    """Mean and std of a batch of generator samples (latents or points): mode collapse shows here first."""
    x = x.detach().float()
    return {"sample/mean": x.mean(), "sample/std": x.std()}


def load_unet_from(path: str, like: nn.Module) -> nn.Module:
    """A student backbone of the teacher's class loaded from a local Diffusers folder: a pipeline folder (its
    ``unet``/``transformer`` subfolder) or a model folder (SwiftBrushV2: initialise from a few-step model)."""
    from pathlib import Path

    folder = Path(path).expanduser()
    cls = type(unwrap(like))
    if not folder.is_dir():
        raise FileNotFoundError(f"recipe.student_init_path {str(folder)!r} does not exist; point it at a local "
                                f"Diffusers pipeline folder (with unet/ or transformer/) or a {cls.__name__} folder "
                                f"(with config.json), e.g. a downloaded SD-Turbo")
    for sub in ("unet", "transformer", "."):
        if (folder / sub / "config.json").is_file():
            return cls.from_pretrained(folder / sub, local_files_only=True).to(torch.float32)
    raise FileNotFoundError(f"{folder} holds no {cls.__name__} (no unet/config.json, transformer/config.json or "
                            f"config.json); point recipe.student_init_path at a Diffusers pipeline or model folder")


def generator_backbone(teacher, init_path: str | None = None) -> nn.Module:
    """The trainable generator: a float32 copy of the teacher (or of ``init_path``), or a fresh toy student when the
    teacher cannot seed one (the analytic toy2d teacher; ``teacher.make_student``)."""
    net = load_unet_from(init_path, teacher.denoiser.backbone) if init_path else teacher.student_seed()
    return copy_backbone(net)


class FakeScore:
    """The trainable fake score next to the frozen teacher (real score).

    ``mode``: "full" = a float32 copy of the teacher (a fresh toy MLP for the analytic teacher); "lora" = peft LoRA
    adapters on the teacher's own backbone (B = 0 at init, so it equals the teacher), the teacher being the same
    module with the adapters disabled: one backbone in memory.
    """

    def __init__(self, teacher, mode: str = "full", rank: int = 64, alpha: float = 64.0, targets=("to_q", "to_v")):
        if mode not in ("full", "lora"):
            raise ValueError(f"recipe.fake_score must be 'full' or 'lora', got {mode!r}")
        self.mode, self.teacher = mode, teacher
        freeze(teacher.denoiser.backbone)
        if mode == "lora":
            if teacher.make_student is not None:
                raise ValueError("recipe.fake_score=lora needs a Diffusers teacher (LoRA on the teacher's own weights); "
                                 "the analytic toy teacher has none: use recipe.fake_score=full")
            backbone = add_lora(teacher.denoiser.backbone, rank, alpha, targets)
            prediction = teacher.denoiser.prediction
        else:
            seed = teacher.make_student() if teacher.make_student is not None else teacher.denoiser.backbone
            backbone = copy_backbone(seed)
            prediction = teacher.student_prediction
        self.denoiser = Denoiser(backbone, teacher.denoiser.process, prediction)

    def teacher_context(self):
        """Context in which ``teacher.denoiser`` is the frozen teacher (LoRA adapters switched off)."""
        return adapters_disabled(self.denoiser.backbone) if self.mode == "lora" else contextlib.nullcontext()

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.denoiser.backbone.parameters() if p.requires_grad]

    def state_dict(self) -> dict[str, Tensor]:
        sd = unwrap(self.denoiser.backbone).state_dict()
        return {k: v for k, v in sd.items() if "lora_" in k} if self.mode == "lora" else sd

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        net = unwrap(self.denoiser.backbone)
        if self.mode == "lora":
            missing, unexpected = net.load_state_dict(state, strict=False)
            if unexpected or any("lora_" in k for k in missing):
                raise RuntimeError(f"fake-score LoRA checkpoint does not match: unexpected={unexpected[:5]}")
        else:
            net.load_state_dict(state)


def build_generator_and_fake_score(teacher, options, device: torch.device) -> tuple[Denoiser, "FakeScore"]:
    """The generator (:func:`generator_backbone` on ``device``) and the :class:`FakeScore` from the recipe's
    ``student_init_path`` and ``fake_*`` options. The generator is built first: a LoRA fake score is added to the
    teacher's own backbone, which the generator copy must not carry."""
    student = Denoiser(generator_backbone(teacher, options.student_init_path).to(device), teacher.denoiser.process,
                       teacher.student_prediction)
    fake = FakeScore(teacher, options.fake_score, options.fake_lora_rank, options.fake_lora_alpha,
                     options.fake_lora_targets)
    fake.denoiser.to(device)
    return student, fake
