"""AGD (spec B.10): adapters at initialisation leave the base model's output exactly unchanged, the trajectory bank
holds the teacher's CFG sampling path (not forward-noised data), training cuts the eps error along fresh CFG
trajectories, adapters save/load (safetensors + config) and combine with other checkpoints of the same base, and
``stepdistill.agd.install_adapters`` makes a stock Diffusers pipeline run one UNet call per step in a fresh process."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.diffusion.solvers import ddim_step, trailing_timesteps
from stepdistill.models.guidance_adapters import (attach_adapters, build_unet_adapters, count_parameters,
                                                  install_adapters, load_adapters, save_adapters)
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.agd import AGDOptions, AGDRecipe, _conditions_from_tensor, _conditions_to_tensor
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

TINY = dict(hidden_dim=16, num_heads=2, fourier_dim=32, bank_trajectories=2, bank_steps=4,
            bank_conditions=["a cat", "a dog"], sample_conditions=["a cat"], guidance_min=1.0, guidance_max=6.0)


@pytest.fixture(scope="module")
def sd_dir():
    return tiny_pipeline_dir("sd")


def _sd_recipe(sd_dir, **kw):
    opts = {**TINY, **kw}
    return AGDRecipe(TeacherBundle.from_pipeline(load_pipeline(sd_dir)), AGDOptions(**opts))


def _randomize(module, seed=0, scale=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def test_unet_adapters_at_init_leave_the_base_output_exactly_unchanged(sd_dir):
    bundle = TeacherBundle.from_pipeline(load_pipeline(sd_dir))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, *bundle.sample_shape, generator=g)
    t = torch.tensor([999, 321])
    cond, _ = bundle.encode_conditions(["a cat", "a dog"], "cpu")
    with torch.no_grad():
        before = bundle.denoiser.native(x, t, cond)  # the plain base UNet, nothing attached
    r = AGDRecipe(bundle, AGDOptions(**TINY))
    assert bundle.denoiser.backbone.config.time_cond_proj_dim == 32  # the stock pipeline now passes w, no CFG batch
    assert all(not p.requires_grad for p in bundle.denoiser.backbone.parameters())  # the base is frozen
    attn2 = [n for n, _ in bundle.denoiser.backbone.named_modules() if n.endswith(".attn2")]
    assert sorted(r.adapters.config.blocks) == sorted(attn2)  # one adapter after every cross-attention...
    assert {n.split(".")[0] for n in attn2} == {"down_blocks", "mid_block", "up_blocks"}  # ...down, mid and up
    assert all(p.requires_grad for p in r.adapters.parameters())
    with torch.no_grad():
        for w in (1.0, 3.0, 6.0):
            out = bundle.denoiser.native(x, t, cond, guidance_input=torch.full((2,), w - 1.0))
            assert torch.equal(out, before), w
        agd = r.adapter_predict(x, t, cond, torch.tensor([2.0, 5.0]))["eps"]
        assert torch.equal(r.base_predict(x, t, cond)["eps"], agd)
        _randomize(r.adapters)
        moved = bundle.denoiser.native(x, t, cond, guidance_input=torch.full((2,), 2.0))
        assert (moved - before).abs().max() > 1e-3  # the adapters are really in the forward pass...
        with r.base_model():
            assert torch.equal(bundle.denoiser.native(x, t, cond, guidance_input=torch.zeros(2)), before)  # ...and off
    r.handle.remove()
    assert bundle.denoiser.backbone.config.time_cond_proj_dim is None
    with torch.no_grad():
        assert torch.equal(bundle.denoiser.native(x, t, cond), before)


def test_toy_additive_adapter_at_init_equals_the_base_and_the_bank_is_the_cfg_sampling_path():
    bundle = toy_teacher_bundle("ring8")
    r = AGDRecipe(bundle, AGDOptions(guidance_min=1.0, guidance_max=4.0, hidden_dim=32, bank_trajectories=8,
                                     bank_steps=20, bank_conditions=[0, 1, 2, 3]))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(16, 2, generator=g), torch.randint(0, 1000, (16,), generator=g)
    cond, uncond = bundle.encode_conditions(torch.arange(16) % 4, "cpu")
    with torch.no_grad():
        base = bundle.denoiser.predict(x, t, cond, want="eps")["eps"]
        assert torch.equal(r.adapter_predict(x, t, cond, torch.full((16,), 3.0))["eps"], base)
    bank = r.build_bank()
    assert bank.x.shape == (8, 20, 2) and bank.timesteps.tolist() == trailing_timesteps(1000, 20)
    assert bank.conditions == [0, 1, 2, 3, 0, 1, 2, 3] and torch.all((bank.w >= 1) & (bank.w <= 4))
    # every stored state is the previous one advanced by one CFG DDIM step (the teacher's own sampler), and every
    # target is the teacher's CFG eps there
    c, u = bundle.encode_conditions(torch.tensor(bank.conditions), "cpu")
    for i in range(19):
        out = bundle.denoiser.predict(bank.x[:, i], bank.timesteps[i], c, want=("x0", "eps"), cfg_scale=bank.w,
                                      uncond=u)
        assert torch.allclose(bank.eps[:, i], out["eps"], atol=1e-6)
        nxt = ddim_step(out["x0"], out["eps"], r.process.coefficients(bank.timesteps[i + 1], like=out["x0"]))
        assert torch.allclose(bank.x[:, i + 1], nxt, atol=1e-5)


def test_training_on_cfg_trajectories_cuts_the_eps_error(one_thread):
    """200 updates bring the single-pass eps well below the conditional-only error along fresh CFG trajectories
    (independent noise and labels), at two guidance scales."""
    torch.manual_seed(0)
    bundle = toy_teacher_bundle("ring8")
    r = AGDRecipe(bundle, AGDOptions(guidance_min=1.0, guidance_max=4.0, hidden_dim=64, bank_trajectories=256,
                                     bank_steps=50))
    opt = torch.optim.Adam(r.adapters.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for step in range(200):
        batch = {"conditions": torch.randint(0, 4, (256,), generator=gen)}
        out = r.training_step(batch, step, gen)
        opt.zero_grad()
        out.losses["adapters"].backward()
        opt.step()
    g = torch.Generator().manual_seed(7)
    for w in (2.0, 4.0):
        labels = torch.randint(0, 4, (64,), generator=g).tolist()
        res = r.trajectory_error(labels, w, torch.randn(64, 2, generator=g), 50)
        assert res["cond_only_rel_err"] > 0.1 and res["rel_err"] < 0.4 * res["cond_only_rel_err"], res


def test_save_load_round_trip_combine_with_another_checkpoint_and_clear_errors(sd_dir, tmp_path):
    r = _sd_recipe(sd_dir)
    _randomize(r.adapters)
    folder = save_adapters(r.adapters, tmp_path / "adapters")
    loaded = load_adapters(folder)
    assert loaded.config == r.adapters.config
    sa, sb = r.adapters.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    # the adapters combine with another checkpoint of the same base: a fine-tuned copy of the UNet
    other = TeacherBundle.from_pipeline(load_pipeline(sd_dir))
    unet = other.denoiser.backbone
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.01)
    x = torch.randn(1, *other.sample_shape, generator=torch.Generator().manual_seed(0))
    cond, _ = other.encode_conditions(["a cat"], "cpu")
    with torch.no_grad():
        plain = other.denoiser.native(x, torch.tensor([500]), cond)
        handle = attach_adapters(unet, loaded)
        with_adapters = other.denoiser.native(x, torch.tensor([500]), cond, guidance_input=torch.tensor([3.0]))
        handle.enabled = False
        off = other.denoiser.native(x, torch.tensor([500]), cond, guidance_input=torch.tensor([3.0]))
        assert torch.equal(off, plain)
    assert (with_adapters - plain).abs().max() > 1e-3
    handle.remove()
    with pytest.raises(ValueError, match="AGD adapters need the guidance scale"):
        attach_adapters(unet, loaded)
        other.denoiser.backbone(x, 500, encoder_hidden_states=cond.encoder_hidden_states)
    # a UNet of another architecture is refused with the mismatch named
    from diffusers import UNet2DConditionModel

    wider = UNet2DConditionModel.from_config({**dict(r.teacher.denoiser.backbone.config), "time_cond_proj_dim": None,
                                              "block_out_channels": (16, 48)})
    with pytest.raises(ValueError, match="widths do not match"):
        attach_adapters(wider, loaded)
    with pytest.raises(FileNotFoundError, match="agd_config.json"):
        load_adapters(tmp_path / "nothing")
    with pytest.raises(ValueError, match="guidance_min"):
        _sd_recipe(sd_dir, guidance_min=5.0, guidance_max=2.0)
    with pytest.raises(ValueError, match="family"):
        from stepdistill.models.denoiser import Denoiser
        from stepdistill.models.mlp import ToyMLP

        toy = toy_teacher_bundle("ring8")
        toy.denoiser = Denoiser(ToyMLP(num_classes=4), toy.denoiser.process, "v")
        AGDRecipe(toy, AGDOptions())


def test_sd15_adapter_size_is_about_one_to_two_percent():
    """Reference placement and width (320) on the SD1.5 UNet architecture (built on the meta device: no weights)."""
    from diffusers import UNet2DConditionModel

    cfg = dict(sample_size=64, down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
               up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, block_out_channels=(320, 640, 1280, 1280),
               layers_per_block=2, cross_attention_dim=768, attention_head_dim=8)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**cfg)
        adapters = build_unet_adapters(unet, hidden_dim=320)
    frac = count_parameters(adapters) / count_parameters(unet)
    assert len(adapters.blocks) == 16 and 0.01 < frac < 0.025, frac


def test_bank_conditions_survive_the_checkpoint():
    for conds in ([3, 1, 2], ["a cat", "a red dog, running"]):
        assert _conditions_from_tensor(_conditions_to_tensor(conds)) == conds
    bundle = toy_teacher_bundle("ring8")
    opts = dict(hidden_dim=16, bank_trajectories=6, bank_steps=5, guidance_min=1.0, guidance_max=4.0)
    r = AGDRecipe(bundle, AGDOptions(**opts))
    batch = {"conditions": torch.tensor([2, 0, 3])}
    r.training_step(batch, 0, torch.Generator().manual_seed(0))
    state = r.state_dict_for_checkpoint()
    r2 = AGDRecipe(toy_teacher_bundle("ring8"), AGDOptions(**opts))
    r2.load_state_dict_from_checkpoint(state)
    r2.training_step({"conditions": torch.tensor([1, 1, 1])}, 1, torch.Generator().manual_seed(0))  # another batch
    assert r2.bank.conditions == r.bank.conditions and torch.equal(r2.bank.x, r.bank.x)


_CHILD = textwrap.dedent("""
    import json, sys, torch
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file, save_file
    from stepdistill.agd import install_adapters, guidance_features
    teacher, adapters, io, w = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    pipe = DiffusionPipeline.from_pretrained(teacher, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    handle = install_adapters(pipe, adapters)
    inp = load_file(io + "/in.safetensors")
    with torch.no_grad():
        feats = guidance_features(torch.tensor([w]), handle.adapters.config.fourier_dim)
        eps = pipe.unet(inp["x"], inp["t"], encoder_hidden_states=inp["ehs"], timestep_cond=feats).sample
    save_file({"eps": eps.contiguous()}, io + "/out.safetensors")
    rows = []
    orig = pipe.unet.forward
    def counting(*a, **k):
        rows.append(int(a[0].shape[0]))
        return orig(*a, **k)
    pipe.unet.forward = counting
    img = pipe("a cat", guidance_scale=w, num_inference_steps=3, output_type="np", height=32, width=32,
               generator=torch.Generator().manual_seed(0)).images
    print(json.dumps({"rows": rows, "shape": list(img.shape), "finite": bool((img == img).all()),
                      "pipeline": type(pipe).__name__}))
""")


@pytest.mark.slow
def test_install_helper_on_a_stock_pipeline_in_a_fresh_process(sd_dir, tmp_path):
    """Export adapters, then a fresh Python process loads the *stock* teacher pipeline, calls
    ``install_adapters(pipe, folder)``: its UNet output equals ours at the same input and w, and
    ``pipe(prompt, guidance_scale=w)`` makes exactly one single-row UNet call per step (no CFG batch)."""
    from safetensors.torch import load_file, save_file

    r = _sd_recipe(sd_dir)
    _randomize(r.adapters, seed=3, scale=0.2)
    export = r.export(tmp_path / "export")
    assert (export / "agd_adapters.safetensors").is_file() and (export / "README.md").is_file()
    x = torch.randn(1, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([640])
    cond, _ = r.teacher.encode_conditions(["a cat"], "cpu")
    w = 4.0
    with torch.no_grad():
        ours = r.teacher.denoiser.native(x, t, cond, guidance_input=torch.tensor([w - 1.0]))
        base = r.base_predict(x, t, cond)["eps"]
    io = tmp_path / "io"
    io.mkdir()
    save_file({"x": x, "t": t, "ehs": cond.encoder_hidden_states.contiguous()}, str(io / "in.safetensors"))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(sd_dir), str(export), str(io), str(w)],
                          capture_output=True, text=True, timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin",
                                                                            "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    theirs = load_file(str(io / "out.safetensors"))["eps"]
    assert torch.allclose(theirs, ours, atol=1e-5) and (ours - base).abs().max() > 1e-3
    assert summary["rows"] == [1, 1, 1], summary  # one UNet call per step, batch 1: no CFG doubling
    assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]


@pytest.mark.slow
def test_tiny_sd_yaml_run_trains_and_exports_adapters(tmp_path):
    import yaml

    from stepdistill.config import config_from_dict
    from stepdistill.runner import run_training

    raw = yaml.safe_load(open("recipes/agd/tiny-sd.yaml"))
    raw["run"]["output_dir"] = str(tmp_path / "run")
    run_dir = run_training(config_from_dict(raw, source="tiny-sd.yaml"))
    loaded = load_adapters(run_dir / "export")
    assert loaded.config.kind == "cross_attention" and loaded.config.guidance_max == 6.0
    pipe = load_pipeline(tiny_pipeline_dir("sd"))
    install_adapters(pipe, run_dir / "export")
    img = pipe("a cat", guidance_scale=3.0, num_inference_steps=2, output_type="np", height=32, width=32).images
    assert img.shape == (1, 32, 32, 3)
    # `stepdistill eval` reads the export like any student: the spec names the base, the adapters go into it.
    from stepdistill.evaluation.pipeline_runs import count_nfe, load_student

    student, spec = load_student(run_dir / "export")
    assert spec.recipe == "agd" and spec.extra["adapters"] and spec.guidance_scale == 4.0
    assert Path(spec.extra["teacher"]).resolve() == Path(tiny_pipeline_dir("sd")).resolve()
    student.set_progress_bar_config(disable=True)
    with count_nfe(student) as counter:
        student(["a cat", "a dog"], guidance_scale=spec.guidance_scale, num_inference_steps=3, output_type="np",
                height=32, width=32)
    assert counter["evals"] == 6  # 2 images x 3 steps, one adapter-equipped pass each: half of CFG's 12
