"""The Denoiser on every backbone family: shapes, parameterization consistency, batched CFG == two passes."""

import pytest
import torch

from stepdistill.diffusion import DiscreteVP, RectifiedFlow, apply_cfg
from stepdistill.models import Conditioning, Denoiser, ToyMLP
from stepdistill.testing.tiny_pipelines import build_tiny_backbone

SD_SCHED = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}


def _cond(family, n, gen):
    """A conditional and an unconditional Conditioning of the right shapes for each tiny backbone."""
    m = build_tiny_backbone(family)
    cfg = m.config
    if family == "dit":
        return m, Conditioning(class_labels=torch.randint(0, 10, (n,), generator=gen)), \
            Conditioning(class_labels=torch.full((n,), cfg.num_embeds_ada_norm))
    if family == "sd":
        d = cfg.cross_attention_dim
        mk = lambda: Conditioning(encoder_hidden_states=torch.randn(n, 7, d, generator=gen))  # noqa: E731
        return m, mk(), mk()
    if family == "sdxl":
        d = cfg.cross_attention_dim
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        mk = lambda: Conditioning(encoder_hidden_states=torch.randn(n, 7, d, generator=gen),  # noqa: E731
                                  added_cond_kwargs={"text_embeds": torch.randn(n, pooled, generator=gen),
                                                     "time_ids": torch.tensor([[32., 32, 0, 0, 32, 32]]).repeat(n, 1)})
        return m, mk(), mk()
    if family in ("pixart", "sana"):
        d = cfg.caption_channels
        mk = lambda: Conditioning(encoder_hidden_states=torch.randn(n, 6, d, generator=gen),  # noqa: E731
                                  encoder_attention_mask=torch.ones(n, 6))
        return m, mk(), mk()
    if family == "sd3":
        mk = lambda: Conditioning(encoder_hidden_states=torch.randn(n, 6, cfg.joint_attention_dim, generator=gen),  # noqa: E731
                                  pooled_projections=torch.randn(n, cfg.pooled_projection_dim, generator=gen))
        return m, mk(), mk()
    raise AssertionError(family)


FAMILIES = {"sd": ("eps", "vp"), "sdxl": ("v", "vp"), "dit": ("eps", "vp"), "pixart": ("eps", "vp"),
            "sd3": ("flow", "rf"), "sana": ("flow", "rf")}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_denoiser_on_backbone_family(family):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    pred, proc_kind = FAMILIES[family]
    n = 2
    model, cond, uncond = _cond(family, n, gen)
    model.eval()
    process = DiscreteVP.from_scheduler_config(SD_SCHED) if proc_kind == "vp" else RectifiedFlow()
    den = Denoiser(model, process, pred)
    cfg = model.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.randn(n, cfg.in_channels, size, size, generator=gen)
    t = torch.tensor([500, 100]) if proc_kind == "vp" else torch.tensor([0.7, 0.2])
    with torch.no_grad():
        out = den.predict(x, t, cond, want=("native", "x0", "eps", "v"))
        # shapes: learned-sigma channels are stripped, every kind has x's shape
        for k, v in out.items():
            assert v.shape == x.shape, (k, v.shape)
        c = process.coefficients(t, like=x)
        # parameterization consistency: x_t = alpha x0 + sigma eps, and v = alpha eps - sigma x0
        assert torch.allclose(c.alpha * out["x0"] + c.sigma * out["eps"], x, atol=1e-4)
        assert torch.allclose(out["v"], c.alpha * out["eps"] - c.sigma * out["x0"], atol=1e-4)
        # batched CFG (one forward on [cond; uncond]) equals the guided combination of two separate passes
        w = torch.tensor([3.0, 1.5])
        guided = den.predict(x, t, cond, want="x0", cfg_scale=w, uncond=uncond)["x0"]
        xc = den.predict(x, t, cond, want="x0")["x0"]
        xu = den.predict(x, t, uncond, want="x0")["x0"]
        assert torch.allclose(guided, apply_cfg(xc, xu, w), atol=1e-4)
        assert not torch.allclose(xc, xu, atol=1e-4), "conditioning must change the output"


def test_unet2d_condition_guidance_embedding_required_and_used():
    m = build_tiny_backbone("sd", time_cond_proj_dim=256).eval()
    den = Denoiser(m, DiscreteVP.from_scheduler_config(SD_SCHED), "eps")
    d = m.config.cross_attention_dim
    cond = Conditioning(encoder_hidden_states=torch.randn(1, 7, d))
    x = torch.randn(1, 4, m.config.sample_size, m.config.sample_size)
    with pytest.raises(ValueError, match="guidance embedding"):
        den.native(x, torch.tensor(10), cond)
    torch.nn.init.normal_(m.time_embedding.cond_proj.weight)
    with torch.no_grad():
        a = den.native(x, torch.tensor(10), cond, guidance_input=2.0)
        b = den.native(x, torch.tensor(10), cond, guidance_input=7.0)
    assert not torch.allclose(a, b)


def test_mlp_denoiser_and_bad_kind():
    mlp = ToyMLP(num_classes=2)
    den = Denoiser(mlp, RectifiedFlow(), "flow")
    x = torch.randn(5, 2)
    out = den.predict(x, torch.tensor(0.5), Conditioning(class_labels=torch.zeros(5, dtype=torch.long)), want=("x0", "flow"))
    assert out["x0"].shape == (5, 2)
    with pytest.raises(ValueError, match="unknown prediction kind 'score'"):
        den.predict(x, torch.tensor(0.5), want="score")
    with pytest.raises(ValueError, match="needs an unconditional"):
        den.predict(x, torch.tensor(0.5), cfg_scale=2.0)
