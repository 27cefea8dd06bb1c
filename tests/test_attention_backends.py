"""Attention backends per run (stepdistill.models.attention_backends) and their wiring into the training loop."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from stepdistill.models.attention_backends import (
    AttentionBackendError,
    AttentionReport,
    check_backend_name,
    set_attention_backend,
)
from stepdistill.models.backbones import call_backbone, detect_family
from stepdistill.models.conditioning import Conditioning
from stepdistill.models.jvp_attention import enable_jvp_attention
from stepdistill.testing.tiny_pipelines import build_tiny_backbone


def _frozen(family: str):
    return build_tiny_backbone(family).eval().requires_grad_(False)


def _inputs(model):
    """A fixed batch of two for any tiny backbone family."""
    family = detect_family(model)
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 8, generator=g)
    ts = torch.tensor([10, 500])
    if family == "unet2d_condition":
        cond = Conditioning(encoder_hidden_states=torch.randn(2, 4, cfg.cross_attention_dim, generator=g))
    elif family == "dit":
        cond, ts = Conditioning(class_labels=torch.tensor([1, 2])), ts.float()
    elif family in ("pixart", "sana"):
        cond = Conditioning(encoder_hidden_states=torch.randn(2, 4, cfg.caption_channels, generator=g))
    elif family == "sd3":
        cond = Conditioning(encoder_hidden_states=torch.randn(2, 4, cfg.joint_attention_dim, generator=g),
                            pooled_projections=torch.randn(2, cfg.pooled_projection_dim, generator=g))
        ts = ts.float()
    else:
        raise AssertionError(family)
    return family, x, ts, cond


@torch.no_grad()
def _run(model, inputs):
    family, x, ts, cond = inputs
    return call_backbone(family, model, x, ts, cond)


def _flux_call(model):
    g = torch.Generator().manual_seed(0)
    kw = dict(hidden_states=torch.randn(1, 16, 64, generator=g), encoder_hidden_states=torch.randn(1, 4, 32, generator=g),
              pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]),
              guidance=torch.tensor([3.5]), img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(4, 3))
    with torch.no_grad():
        return model(**kw).sample


# ------------------------------------------------------------------------------------------------ sdpa vs math
@pytest.mark.parametrize("family", ["sd", "dit", "pixart", "sd3", "sana"])
def test_sdpa_and_math_agree_and_report_processors(family):
    base = _frozen(family)
    inputs = _inputs(base)
    sdpa_model, math_model = copy.deepcopy(base), copy.deepcopy(base)
    r_sdpa = set_attention_backend(sdpa_model, "sdpa")
    r_math = set_attention_backend(math_model, "math")
    torch.testing.assert_close(_run(math_model, inputs), _run(sdpa_model, inputs), atol=1e-5, rtol=1e-4)
    assert r_sdpa.layers and set(r_sdpa.layers) == set(r_math.layers)
    assert not r_sdpa.mismatched and not r_math.mismatched
    for name, label in r_math.layers.items():
        kind, proc = label.split("(", 1)
        assert proc.endswith(")") and len(proc) > 2, label  # the processor class is named
        assert kind in ("math", "linear"), (name, label)
    assert "math" in r_math.summary() and "sdpa" not in r_math.summary()
    if family == "sd":  # the classic unfused processor where Diffusers has one
        assert set(r_math.layers.values()) == {"math(AttnProcessor)"}
        assert set(r_sdpa.layers.values()) == {"sdpa(AttnProcessor2_0)"}
        assert r_sdpa.summary() == {"sdpa": 8}
    if family == "sana":  # linear self-attention has no softmax kernel to pick; reported as such, not as a failure
        assert r_math.summary() == {"linear": 2, "math": 2}


def test_flux_dispatcher_layers_follow_the_request():
    base = _frozen("flux")
    ref = _flux_call(base)
    m = copy.deepcopy(base)
    report = set_attention_backend(m, "math")
    assert set(report.layers.values()) == {"math(FluxAttnProcessor)"}
    assert all(layer.processor._attention_backend.value == "_native_math" for layer in
               (mod for _, mod in m.named_modules() if hasattr(mod, "processor")))
    torch.testing.assert_close(_flux_call(m), ref, atol=1e-5, rtol=1e-4)


# ------------------------------------------------------------------------------------------------ honesty
@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_dispatcher_backend_on_legacy_processors_is_reported_not_claimed(family):
    model = _frozen(family)
    report = set_attention_backend(model, "_native_efficient")
    assert report.mismatched and set(report.mismatched) == set(report.layers)
    assert all(label.startswith("sdpa(") for label in report.mismatched.values())
    assert report.summary().get("_native_efficient", 0) == 0
    assert any("do not run '_native_efficient'" in w and "dispatcher" in w for w in report.warnings)
    assert "NOT on _native_efficient" in report.summary_line()
    with pytest.raises(AttentionBackendError, match="do not run"):
        set_attention_backend(_frozen(family), "_native_efficient", strict=True)


def test_xformers_on_cpu_is_a_clear_error():
    with pytest.raises(AttentionBackendError, match=r"xformers.*CUDA only, but the model is on cpu.*sdpa"):
        set_attention_backend(_frozen("sd"), "xformers")


def test_unknown_and_hub_backend_names():
    assert check_backend_name("sdpa") is None and check_backend_name("flash") is None
    assert "did you mean 'xformers'" in check_backend_name("xfromers")
    assert "Hub" in check_backend_name("flash_hub")
    with pytest.raises(AttentionBackendError, match="unknown attention backend 'fash'"):
        set_attention_backend(_frozen("dit"), "fash")


def test_missing_dispatcher_package_is_a_clear_error():
    pytest.importorskip("diffusers")
    from diffusers.models.attention_dispatch import _CAN_USE_FLASH_ATTN

    if _CAN_USE_FLASH_ATTN:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(AttentionBackendError, match="'flash' is not usable here.*sdpa"):
        set_attention_backend(_frozen("flux"), "flash")


# ------------------------------------------------------------------------------------------------ fusion
@pytest.mark.parametrize("family", ["sd", "dit", "sd3"])
def test_fuse_qkv_keeps_outputs(family):
    base = _frozen(family)
    inputs = _inputs(base)
    fused = copy.deepcopy(base)
    report = set_attention_backend(fused, "sdpa", fuse_qkv=True)
    assert report.fused and set(report.fused) == set(report.layers)
    assert all("Fused" in label for label in report.layers.values())
    torch.testing.assert_close(_run(fused, inputs), _run(base, inputs), atol=1e-5, rtol=1e-4)
    assert not any(p.requires_grad for p in fused.parameters())  # the new fused weights stay frozen


def test_fuse_qkv_reports_layers_without_a_fused_variant():
    model = _frozen("sana")
    report = set_attention_backend(model, "sdpa", fuse_qkv=True)
    assert report.fused == []
    assert any("SanaLinearAttnProcessor2_0 have no fused variant" in w for w in report.warnings)
    assert "fused QKV on 0/4 layers" in report.summary_line()


def test_fuse_qkv_refuses_trainable_models():
    model = build_tiny_backbone("sd")  # trainable
    report = set_attention_backend(model, "sdpa", fuse_qkv=True)
    assert report.fused == [] and not hasattr(model.down_blocks[0].attentions[0].transformer_blocks[0].attn1, "to_qkv")
    assert any("trainable parameters" in w for w in report.warnings)


# ------------------------------------------------------------------------------------------------ jvp / sCM
def test_jvp_backend_and_recipe_installed_jvp_layers():
    model = _frozen("sd")
    report = set_attention_backend(model, "jvp")
    assert report.summary() == {"jvp": 8} and not report.mismatched

    student = build_tiny_backbone("sd")
    enable_jvp_attention(student)  # what sCM does to its student
    kept = set_attention_backend(student, "sdpa")  # the default must not undo it
    assert kept.summary() == {"jvp": 8} and not kept.mismatched
    assert any("keep the JVP-capable attention" in n for n in kept.notes) and not kept.warnings
    with pytest.raises(AttentionBackendError, match="forward-mode AD"):
        set_attention_backend(student, "_native_efficient")


def test_report_serialises():
    report = set_attention_backend(_frozen("sd"), "math")
    data = json.loads(report.to_json())
    assert data["summary"] == {"math": 8} and data["requested"] == "math"
    assert data["layers"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1"] == "math(AttnProcessor)"
    assert isinstance(report, AttentionReport) and "math x8" in str(report)


# ------------------------------------------------------------------------------------------------ training runs
def _train(tmp_path, config: str, *overrides: str):
    from pathlib import Path

    from stepdistill.config import load_config
    from stepdistill.runner import run_training

    repo = Path(__file__).resolve().parents[1]
    cfg = load_config(repo / "recipes" / config, [f"run.output_dir={tmp_path}", "train.max_steps=1",
                                                  "train.checkpoint_every=0", "train.trackers=[]", *overrides])
    run_dir = run_training(cfg, export=False)
    return json.loads((run_dir / "attention_backends.json").read_text())


def test_training_run_writes_the_attention_report(tmp_path, capsys):
    report = _train(tmp_path, "lcm/tiny-sd.yaml", "model.attention_backend=math", "model.fuse_qkv=true",
                    "train.gradient_checkpointing=true")
    assert set(report) == {"student", "teacher"}
    student, teacher = report["student"], report["teacher"]
    assert student["trainable"] and not teacher["trainable"]
    assert student["gradient_checkpointing"] and not teacher["gradient_checkpointing"]
    assert student["attention"]["summary"] == {"math": 8} and teacher["attention"]["summary"] == {"math": 8}
    assert all(v == "math(AttnProcessor)" for v in teacher["attention"]["layers"].values())
    assert any("trainable parameters" in w for w in student["attention"]["warnings"])  # never fuses a trained net
    assert any("no fused variant" in w for w in teacher["attention"]["warnings"])  # AttnProcessor has none
    assert not student["channels_last"]  # 'auto' is off on CPU
    out = capsys.readouterr().out
    assert "[stepdistill] student: UNet2DConditionModel: attention_backend=math -> math x8" in out


def test_scm_run_keeps_its_jvp_attention_under_the_default_backend(tmp_path):
    report = _train(tmp_path, "scm/tiny-sd.yaml")
    assert report["student"]["attention"]["summary"] == {"jvp": 8}
    assert report["student"]["attention"]["mismatched"] == {}
    assert any("JVP" in n for n in report["student"]["attention"]["notes"])
    assert report["teacher"]["attention"]["summary"] == {"sdpa": 8}


def test_compile_wraps_trained_and_frozen_networks_but_not_jvp_ones():
    from stepdistill.training.speed import NetworkSetup, maybe_compile

    net = torch.nn.Linear(2, 2)
    setup = NetworkSetup("student", True, AttentionReport("Linear", "sdpa"))
    compiled = maybe_compile(setup, net, backend="eager")
    assert compiled is not net and compiled._orig_mod is net and setup.compiled
    torch.testing.assert_close(compiled(torch.ones(1, 2)), net(torch.ones(1, 2)))
    jvp_setup = NetworkSetup("student", True, AttentionReport("UNet", "sdpa", layers={"a": "jvp(JVPAttnProcessor2_0)"}))
    assert maybe_compile(jvp_setup, net, backend="eager") is net and not jvp_setup.compiled
    assert "torch.func.jvp" in jvp_setup.notes[0]


def test_mixed_precision_on_cpu_warns():
    from stepdistill.training.speed import autocast_warning

    assert "several times slower" in autocast_warning("bf16", torch.device("cpu"))
    assert autocast_warning("no", torch.device("cpu")) is None
    assert autocast_warning("bf16", torch.device("cuda")) is None


def test_teacher_dtype_auto_is_fp32_on_cpu():
    from stepdistill.runner import teacher_dtype

    assert teacher_dtype("auto", "cpu") == torch.float32
    assert teacher_dtype("bf16", "cpu") == torch.bfloat16
