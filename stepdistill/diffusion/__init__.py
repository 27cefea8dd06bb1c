"""Model-agnostic diffusion math: noise processes, parameterizations, guidance, solvers (pure functions)."""

from .guidance import apply_cfg, guidance_scale_embedding, imagen_w_from_lcm, lcm_omega_from_imagen
from .parameterization import KINDS, convert, from_x0_eps, to_x0_eps
from .processes import (
    EDM,
    CosineVP,
    DiscreteVP,
    NoiseProcess,
    PathCoefficients,
    RectifiedFlow,
    TrigFlow,
    prediction_kind_from_diffusers,
    process_from_scheduler_config,
)
from .solvers import (
    ddim_step,
    ddim_step_from_x0,
    dpmpp_2m_step,
    inverse_ddim_x0,
    renoise,
    sample_deterministic,
    trailing_timesteps,
)
