"""JVP-capable attention (spec B.6 pitfall, C.5 item 7): the explicit SDPA tangent against unfused math attention and
against central finite differences in float64 on every backbone family's tiny model."""

import pytest
import torch
from torch.func import jvp

from stepdistill.models.backbones import call_backbone, detect_family
from stepdistill.models.conditioning import Conditioning
from stepdistill.models.jvp_attention import (UnsupportedAttentionProcessor,
                                              enable_jvp_attention, jvp_attention, jvp_scaled_dot_product_attention,
                                              math_attention, restore_attention)
from stepdistill.testing.tiny_pipelines import build_tiny_backbone

D = torch.float64


def _qkv(lq=5, lk=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 2, lq, 8, generator=g, dtype=D)
    k, v = (torch.randn(2, 2, lk, 8, generator=g, dtype=D) for _ in range(2))
    return (q, k, v), tuple(torch.randn(x.shape, generator=g, dtype=D) for x in (q, k, v))


@pytest.mark.parametrize("mask_kind", ["none", "bool", "float", "causal", "masked_row"])
def test_sdpa_tangent_matches_math_attention_jvp(mask_kind):
    primals, tangents = _qkv(lq=5, lk=5 if mask_kind == "causal" else 7)
    lk = primals[1].shape[-2]
    mask, causal = None, mask_kind == "causal"
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, lk, generator=torch.Generator().manual_seed(1)) > 0.3
        mask[..., 0] = True
    elif mask_kind == "masked_row":  # a query row that attends to nothing: SDPA returns 0 / NaN; tangent must be finite
        mask = torch.ones(2, 1, 5, lk, dtype=torch.bool)
        mask[:, :, 2] = False
    elif mask_kind == "float":
        mask = torch.randn(2, 1, 1, lk, dtype=D)
    o1, d1 = jvp(lambda q, k, v: jvp_scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal),
                 primals, tangents)
    o2, d2 = jvp(lambda q, k, v: math_attention(q, k, v, attn_mask=mask, is_causal=causal), primals, tangents)
    keep = slice(None) if mask_kind != "masked_row" else [0, 1, 3, 4]
    assert torch.allclose(o1[..., keep, :], o2[..., keep, :], atol=1e-12)
    assert torch.allclose(d1[..., keep, :], d2[..., keep, :], atol=1e-12)
    assert torch.isfinite(d1).all()


def test_partial_tangents_and_block_size(monkeypatch):
    """Only some inputs carry a tangent (cross attention: keys/values from the text encoder) and queries split in
    several blocks give the same tangent."""
    import stepdistill.models.jvp_attention as ja

    primals, tangents = _qkv(lq=9, lk=6)
    full = jvp(lambda q: jvp_scaled_dot_product_attention(q, *primals[1:]), primals[:1], tangents[:1])[1]
    ref = jvp(lambda q: math_attention(q, *primals[1:]), primals[:1], tangents[:1])[1]
    monkeypatch.setattr(ja.attention_tangent, "__defaults__", (2,))
    blocked = jvp(lambda q: jvp_scaled_dot_product_attention(q, *primals[1:]), primals[:1], tangents[:1])[1]
    assert torch.allclose(full, ref, atol=1e-12) and torch.allclose(blocked, ref, atol=1e-12)


def test_backward_matches_sdpa_and_stock_sdpa_has_no_jvp():
    primals, _ = _qkv()
    a = [x.clone().requires_grad_() for x in primals]
    b = [x.clone().requires_grad_() for x in primals]
    weight = torch.randn(2, 2, 5, 8, dtype=D)
    ga = torch.autograd.grad((jvp_scaled_dot_product_attention(*a) * weight).sum(), a)
    gb = torch.autograd.grad((torch.nn.functional.scaled_dot_product_attention(*b) * weight).sum(), b)
    assert all(torch.allclose(x, y, atol=1e-12) for x, y in zip(ga, gb))
    with pytest.raises((NotImplementedError, RuntimeError)):
        jvp(torch.nn.functional.scaled_dot_product_attention, primals, primals)


# ------------------------------------------------------------------------------------------------ backbones


def _unet2d():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                       norm_num_groups=8, layers_per_block=1, attention_head_dim=8, num_class_embeds=4)


def _inputs(family: str, model, n=2):
    """(x, call) for the tiny backbone of ``family``: call(x) runs the model at fixed t and conditioning."""
    g = torch.Generator().manual_seed(3)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=D)  # noqa: E731
    cfg = model.config
    if family == "flux":
        x = rnd(n, 16, 64)
        txt, pooled = rnd(n, 5, 32), rnd(n, 32)
        img_ids = torch.zeros(16, 3, dtype=D)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
        txt_ids = torch.zeros(5, 3, dtype=D)

        def call(x):
            return model(hidden_states=x, encoder_hidden_states=txt, pooled_projections=pooled,
                         timestep=torch.full((n,), 0.4, dtype=D), img_ids=img_ids, txt_ids=txt_ids,
                         guidance=torch.full((n,), 3.5, dtype=D)).sample

        return x, call
    fam = detect_family(model)
    size = cfg.sample_size
    x = rnd(n, cfg.in_channels, size, size)
    cond = Conditioning()
    if fam == "unet2d":
        cond = Conditioning(class_labels=torch.tensor([1, 2]))
    elif fam == "unet2d_condition":
        added = None
        if cfg.addition_embed_type == "text_time":
            added = {"text_embeds": rnd(n, 32), "time_ids": rnd(n, 6)}
        cond = Conditioning(encoder_hidden_states=rnd(n, 6, cfg.cross_attention_dim), added_cond_kwargs=added)
    elif fam == "dit":
        cond = Conditioning(class_labels=torch.tensor([1, 7]))
    elif fam in ("pixart", "sana"):
        mask = torch.ones(n, 6)
        mask[1, 4:] = 0  # padded prompt tokens exercise the attention mask
        cond = Conditioning(encoder_hidden_states=rnd(n, 6, cfg.caption_channels), encoder_attention_mask=mask)
    elif fam == "sd3":
        cond = Conditioning(encoder_hidden_states=rnd(n, 6, cfg.joint_attention_dim),
                            pooled_projections=rnd(n, cfg.pooled_projection_dim))
    ts = torch.tensor([0.3, 0.7], dtype=D) * (1000 if fam != "sana" else 1)

    def call(x):
        return call_backbone(fam, model, x, ts, cond)

    return x, call


FAMILIES = ["sd", "unet2d", "dit", "pixart", "sd3", "sana", "flux"]
# Sana's linear attention casts q, k, v to float32 inside the Diffusers processor, and FLUX computes parts of its
# blocks in float32, so their float64 checks are limited by float32 rounding: a larger finite-difference step and a
# looser tolerance for those families only (the comparison with the math-attention JVP stays tight for all).
FD_STEP = {"sana": 1e-3, "flux": 1e-3}
FD_RTOL = {"sana": 2e-3, "flux": 2e-3}


def _model(family):
    model = _unet2d() if family == "unet2d" else build_tiny_backbone(family)
    return model.to(D).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_backbone_jvp_matches_finite_differences_and_math_attention(family):
    model = _model(family)
    x, call = _inputs(family, model)
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(5), dtype=D)
    calls = []

    def counting_sdpa(*args, **kw):
        calls.append(1)
        return jvp_scaled_dot_product_attention(*args, **kw)

    with torch.no_grad():
        if family not in ("sana",):  # the stock fused processors cannot be differentiated forward
            with pytest.raises((NotImplementedError, RuntimeError)):
                jvp(call, (x,), (v,))
        plain = call(x)
        with jvp_attention(model, sdpa=counting_sdpa):
            out, tangent = jvp(call, (x,), (v,))
        assert calls, f"{family}: no attention call went through the JVP-capable SDPA"
        assert torch.allclose(out, plain, atol=1e-12), "swapping processors must not change the forward"
        h = FD_STEP.get(family, 1e-5)
        fd = (call(x + h * v) - call(x - h * v)) / (2 * h)
        with jvp_attention(model, sdpa=math_attention):
            _, ref = jvp(call, (x,), (v,))
    scale = tangent.abs().max()
    assert scale > 0
    rtol = FD_RTOL.get(family, 1e-6)
    assert (tangent - fd).abs().max() <= rtol * scale, f"{family}: JVP vs central differences"
    assert (tangent - ref).abs().max() <= 1e-9 * scale, f"{family}: JVP vs math-attention JVP"


@pytest.mark.parametrize("family", ["sd", "sd3", "sana"])
def test_enable_returns_replaced_processors_and_restores(family):
    model = _model(family)
    before = {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")}
    replaced = enable_jvp_attention(model)
    assert replaced and set(replaced) <= set(before)
    for name, m in model.named_modules():
        if name in replaced:
            assert isinstance(m.processor, before[name]) and m.processor.jvp_capable
    if family == "sana":  # linear self-attention is JVP-native and left alone; only the SDPA cross attention swaps
        assert all(type(p).__name__ == "SanaAttnProcessor2_0" for p in replaced.values())
    assert enable_jvp_attention(model) == {}, "idempotent"
    restore_attention(model, replaced)
    assert {n: type(m.processor) for n, m in model.named_modules() if hasattr(m, "processor")} == before


def test_unknown_processor_is_named():
    model = _model("sd")

    class FancyFlashProcessor:
        def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kw):
            return hidden_states

    name = next(n for n, m in model.named_modules() if hasattr(m, "processor"))
    dict(model.named_modules())[name].set_processor(FancyFlashProcessor())
    with pytest.raises(UnsupportedAttentionProcessor, match="FancyFlashProcessor"):
        enable_jvp_attention(model)
    assert not any(getattr(m.processor, "jvp_capable", False) for m in model.modules() if hasattr(m, "processor")), \
        "nothing may be swapped when one processor is unsupported"


def test_function_trains_inside_a_model():
    """Gradients through the swapped processors (recomputing backward) equal those of the stock fused processors."""
    model = _model("dit")  # eval mode: DiT's label embedding drops class labels at random in train mode
    x, call = _inputs("dit", model)

    def grads():
        model.zero_grad()
        call(x).square().mean().backward()
        return [p.grad.clone() for p in model.parameters() if p.grad is not None]

    stock = grads()
    with jvp_attention(model):
        ours = grads()
    assert len(ours) == len(stock) > 0
    worst = max(((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item() for a, b in zip(ours, stock))
    assert worst < 1e-9, worst
