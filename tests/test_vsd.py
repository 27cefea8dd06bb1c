"""VSD / SwiftBrush (spec B.7): the VSD gradient (x0 form, exact zero when the fake score is the teacher), LoRA fake
score at init, fake-score loss and prompt dropout, SNOOPI random guidance, SwiftBrushV2 switches (clear error for
missing CLIP weights, clamped CLIP loss, weight merging), and stock-Diffusers export of the one-step student."""

import pytest
import torch

from stepdistill.benchmarks.toy2d.bundle import toy_teacher_bundle
from stepdistill.config import config_from_dict
from stepdistill.models.conditioning import Conditioning
from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
from stepdistill.recipes.clip_loss import clamped_alignment_loss
from stepdistill.recipes.score_distill import drop_conditions, fake_denoising_loss, vsd_gradient
from stepdistill.recipes.vsd import VSDOptions, VSDRecipe, merge_weights
from stepdistill.testing.stock_load import load_and_sample_in_fresh_process
from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir


@pytest.fixture(scope="module")
def sd_dir():
    return tiny_pipeline_dir("sd")


def _sd_recipe(sd_dir, **kw):
    kw.setdefault("sample_conditions", ["a cat"])
    kw.setdefault("fake_lora_rank", 4)
    kw.setdefault("fake_lora_alpha", 8.0)
    return VSDRecipe(TeacherBundle.from_pipeline(load_pipeline(sd_dir)), VSDOptions(**kw))


def test_vsd_gradient_x0_form():
    """sigma^2 (eps_T - eps_L) = alpha sigma (x0_L - x0_T) for the same x_t (spec B.7)."""
    g = torch.Generator().manual_seed(0)
    x_t, x0_t, x0_l = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    alpha, sigma = torch.tensor(0.6, dtype=torch.float64), torch.tensor(0.8, dtype=torch.float64)
    eps_t, eps_l = (x_t - alpha * x0_t) / sigma, (x_t - alpha * x0_l) / sigma
    assert torch.allclose(vsd_gradient(eps_t, eps_l, sigma).double(), alpha * sigma * (x0_l - x0_t), atol=1e-6)
    bad = torch.tensor([float("nan"), float("inf")])
    assert torch.isfinite(vsd_gradient(bad, torch.zeros(2), torch.tensor(1.0))).all()


@pytest.mark.parametrize("fake_score, w, fake_cfg", [("lora", 4.5, True), ("full", 1.0, False)])
def test_vsd_gradient_is_exactly_zero_when_fake_equals_teacher(sd_dir, fake_score, w, fake_cfg):
    r = _sd_recipe(sd_dir, fake_score=fake_score, guidance_scale=w, fake_cfg=fake_cfg)
    cond, uncond = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    x0 = torch.randn(2, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0), requires_grad=True)
    loss, logs = r.vsd_loss(x0, cond, uncond, torch.Generator().manual_seed(1))
    loss.backward()
    assert logs["vsd/grad_abs_mean"] == 0 and loss.item() == 0.0 and torch.count_nonzero(x0.grad) == 0


def test_vsd_gradient_nonzero_when_only_the_teacher_is_guided(sd_dir):
    r = _sd_recipe(sd_dir, guidance_scale=4.5, fake_cfg=False)
    cond, uncond = r.teacher.encode_conditions(["a cat", "a dog"], "cpu")
    x0 = torch.randn(2, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    _, logs = r.vsd_loss(x0, cond, uncond, torch.Generator().manual_seed(1))
    assert logs["vsd/grad_abs_mean"] > 0


def test_lora_fake_score_equals_base_at_init_and_trains_only_adapters(sd_dir):
    r = _sd_recipe(sd_dir)
    cond, _ = r.teacher.encode_conditions(["a cat"], "cpu")
    x = torch.randn(1, *r.teacher.sample_shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fake = r.fake.denoiser.native(x, torch.tensor([321]), cond)
        with r.fake.teacher_context():
            base = r.teacher.denoiser.native(x, torch.tensor([321]), cond)
    assert torch.equal(fake, base)
    names = [n for n, p in r.fake.denoiser.backbone.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and (".to_q." in n or ".to_v." in n) for n in names)
    assert not any("lora_" in n for n, _ in r.student.backbone.named_parameters())  # the student is a plain copy
    batch = {"conditions": ["a cat", "a dog"]}
    out = r.training_step(batch, 0, torch.Generator().manual_seed(0))
    assert list(out.losses) == ["student", "fake_score"]
    assert {"sample/mean", "sample/std", "loss_vsd", "loss_fake_denoise"} <= set(out.logs)
    out.losses["fake_score"].backward()
    assert all(p.grad is None for p in r.optimizer_params()["student"])  # detached student samples
    assert all(p.grad is None for n, p in r.teacher.denoiser.backbone.named_parameters() if "lora_" not in n)


def test_fake_loss_alpha2_weighting_and_prompt_dropout():
    bundle = toy_teacher_bundle("ring8")
    r = VSDRecipe(bundle, VSDOptions(fake_score="full", guidance_scale=2.0))
    den = r.fake.denoiser
    x0 = torch.randn(8, 2, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(8, 2, generator=torch.Generator().manual_seed(1))
    t = torch.arange(8) * 120 + 10
    cond = Conditioning(class_labels=torch.arange(8) % 4)
    with torch.no_grad():
        eps = den.predict(den.process.add_noise(x0, noise, t), t, cond, want="eps")["eps"]
        alpha = den.process.coefficients(t, like=eps).alpha
        want = ((alpha * (eps - noise)) ** 2).mean()
        got = fake_denoising_loss(den, x0, cond, t, noise, "alpha2")
    assert torch.allclose(got, want, rtol=1e-6)
    uncond = Conditioning(class_labels=torch.full((8,), -1))
    mixed = drop_conditions(cond, uncond, 0.5, torch.Generator().manual_seed(0))
    drop = torch.rand(8, generator=torch.Generator().manual_seed(0)) < 0.5
    assert torch.equal(mixed.class_labels, torch.where(drop, -1, cond.class_labels)) and 0 < drop.sum() < 8


def test_vsd_timestep_range_and_annealing():
    r = VSDRecipe(toy_teacher_bundle("ring8"), VSDOptions(fake_score="full", guidance_scale=2.0))
    assert r.t_range() == (20, 980) and r.t_range(10**6) == (20, 980)
    r = VSDRecipe(toy_teacher_bundle("ring8"), VSDOptions(fake_score="full", guidance_scale=2.0, t_max_late=350,
                                                          t_anneal_step=50))
    assert r.t_range(None) == (20, 980) and r.t_range(49) == (20, 980) and r.t_range(50) == (20, 350)
    with pytest.raises(ValueError, match="t_max_late"):
        VSDOptions(t_max_late=5).validate()
    with pytest.raises(ValueError, match="below the teacher"):
        VSDRecipe(toy_teacher_bundle("ring8"), VSDOptions(fake_score="full", t_max_late=1000))


def test_snoopi_random_guidance_per_sample():
    r = VSDRecipe(toy_teacher_bundle("ring8"), VSDOptions(fake_score="full", random_guidance=True, guidance_min=2.0,
                                                          guidance_max=6.0))
    w = r._guidance(1000, torch.Generator().manual_seed(0))
    assert w.shape == (1000,) and w.min() >= 2.0 and w.max() <= 6.0 and w.std() > 0.5
    cond, uncond = r.teacher.encode_conditions(torch.tensor([0, 1]), "cpu")
    _, logs = r.vsd_loss(torch.randn(2, 2), cond, uncond, torch.Generator().manual_seed(0))
    assert 2.0 <= logs["vsd/guidance_mean"] <= 6.0


def test_swiftbrushv2_switches(sd_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="clip_weights_path"):
        _sd_recipe(sd_dir, clip_weight=0.1)
    missing = tmp_path / "open_clip_vit_b32.bin"
    with pytest.raises(FileNotFoundError, match="open_clip_vit_b32.bin"):
        _sd_recipe(sd_dir, clip_weight=0.1, clip_weights_path=str(missing))
    with pytest.raises(FileNotFoundError, match="student_init_path"):
        _sd_recipe(sd_dir, student_init_path=str(tmp_path / "sd-turbo"))
    # clamped CLIP loss: zero (and no push) once the cosine similarity exceeds the margin
    img = torch.tensor([[1.0, 0.0], [1.0, 1.0]], requires_grad=True)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    loss = clamped_alignment_loss(img, txt, margin=0.9)  # cos = 1 (clamped) and 0.707 (pushed)
    loss.backward()
    assert abs(loss.item() - (0.9 - 2**-0.5) / 2) < 1e-6 and torch.count_nonzero(img.grad[0]) == 0
    a, b = {"w": torch.zeros(3), "n": torch.tensor([1])}, {"w": torch.ones(3), "n": torch.tensor([5])}
    merged = merge_weights(a, b, 0.25)
    assert torch.allclose(merged["w"], torch.full((3,), 0.25)) and merged["n"].item() == 1
    with pytest.raises(ValueError, match="different parameters"):
        merge_weights(a, {"w": torch.ones(3)}, 0.5)


def test_student_init_from_a_few_step_model_folder(sd_dir, tmp_path):
    """SwiftBrushV2 starts from another model (SD-Turbo): any local Diffusers folder with a unet/."""
    from stepdistill.models.backbones import unwrap

    r0 = _sd_recipe(sd_dir)
    other = unwrap(r0.student.backbone)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    other.save_pretrained(tmp_path / "turbo" / "unet")
    r = _sd_recipe(sd_dir, student_init_path=str(tmp_path / "turbo"), merge_path=str(tmp_path / "turbo"),
                   merge_weight=1.0)
    w = dict(unwrap(r.student.backbone).named_parameters())["conv_in.weight"]
    assert torch.equal(w, dict(other.named_parameters())["conv_in.weight"])
    assert torch.equal(r.export_state()["conv_in.weight"], w)


@pytest.mark.slow
def test_train_export_and_load_in_stock_diffusers(tmp_path):
    import yaml

    from stepdistill.runner import run_training

    raw = yaml.safe_load(open("recipes/vsd/tiny-sd.yaml"))
    raw["run"]["output_dir"] = str(tmp_path / "run")
    run_dir = run_training(config_from_dict(raw, source="tiny-sd.yaml"))
    summary = load_and_sample_in_fresh_process(run_dir / "export", {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False and summary["scheduler"] == "LCMScheduler"
    assert summary["pipeline"] == "StableDiffusionPipeline"
    assert summary["timesteps"] == [999], summary  # one evaluation, no CFG batch
    assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]
