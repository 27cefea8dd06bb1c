"""The digits benchmark: data split, committed classifier + domain FID, committed teachers (stock loading and
stepdistill's TeacherBundle path), and the error that names the build command when an asset is missing."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from stepdistill.benchmarks.digits import paths
from stepdistill.benchmarks.digits.classifier import evaluate_accuracy, load_classifier, load_classifier_metrics
from stepdistill.benchmarks.digits.data import load_split, sample_batch
from stepdistill.benchmarks.digits.domain_fid import class_accuracy, domain_fid

TEACHERS = ("sd", "dit", "unet")


def test_split_sizes_disjoint_and_deterministic():
    train, test = load_split("train"), load_split("test")
    assert (len(train), len(test)) == (1437, 360)
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    assert len(set(train.indices.tolist()) | set(test.indices.tolist())) == 1797
    assert train.images.shape == (1437, 1, 16, 16) and train.images.min() >= -1 and train.images.max() <= 1
    # stratified: every class is in the test split with 35 or 36 images
    counts = torch.bincount(test.labels, minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37
    again = load_split("train")
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    a, b, c = sample_batch(train, 7, 16, seed=3), sample_batch(train, 7, 16, seed=3), sample_batch(train, 8, 16, seed=3)
    assert torch.equal(a.positions, b.positions) and a.prompts == b.prompts
    assert not torch.equal(a.positions, c.positions)


def test_digits_data_kind_carries_prompts_and_classes():
    from stepdistill.config import DataSection
    from stepdistill.training.data import DataStart, build_data_factory

    for conditioning in ("prompt", "class"):
        it = build_data_factory(DataSection(kind="digits", batch_size=4, conditioning=conditioning))(DataStart(seed=1))
        batch = next(iter(it))
        assert batch["images"].shape == (4, 1, 16, 16)
        assert batch["labels"].dtype == torch.long and len(batch["prompts"]) == 4
        if conditioning == "prompt":
            assert batch["conditions"] == batch["prompts"]
            assert all(isinstance(p, str) and p for p in batch["conditions"])
        else:
            assert torch.equal(batch["conditions"], batch["labels"])


def test_classifier_reload_gives_recorded_accuracy():
    test = load_split("test")
    model = load_classifier()
    recorded = load_classifier_metrics()
    acc = evaluate_accuracy(model, test.images, test.labels)
    assert acc == pytest.approx(recorded["test_accuracy"], abs=1e-9)
    assert acc >= 0.95


def test_domain_fid_real_is_small_noise_is_large():
    recorded = load_classifier_metrics()
    floor = domain_fid(load_split("train").images)
    assert floor == pytest.approx(recorded["domain_fid_train_vs_test"], rel=1e-6)
    noise = torch.rand(500, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert domain_fid(noise) > 20 * floor
    # the pipeline convention ([0, 1] images) gives the same number as [-1, 1]
    test = load_split("test").images
    assert domain_fid(test[:200], test[200:]) == pytest.approx(
        domain_fid((test[:200] + 1) / 2, test[200:], value_range=(0, 1)), rel=1e-9)
    assert class_accuracy(test, load_split("test").labels) > 0.95


def test_missing_asset_error_names_the_build_command(tmp_path, monkeypatch):
    monkeypatch.setattr(paths, "ASSETS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match=r"scripts/build_digits_assets\.py --what sd"):
        paths.load_digits_teacher("sd")
    with pytest.raises(FileNotFoundError, match=r"build_digits_assets\.py --what classifier"):
        load_classifier(tmp_path / "classifier")
    with pytest.raises(ValueError, match="choose one of"):
        paths.load_digits_teacher("sdxl")


@pytest.mark.parametrize("name", TEACHERS)
def test_teacher_loads_in_stock_diffusers_and_samples(name):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(paths.load_digits_teacher(name), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    g = torch.Generator().manual_seed(0)
    if name == "sd":
        assert type(pipe).__name__ == "StableDiffusionPipeline" and pipe.safety_checker is None
        out = pipe(["a handwritten digit 3", "the number seven"], num_inference_steps=2, guidance_scale=3.0,
                   generator=g, output_type="pt").images
    elif name == "dit":
        assert type(pipe).__name__ == "DiTPipeline" and pipe.transformer.config.num_embeds_ada_norm == 1000
        out = torch.from_numpy(pipe(class_labels=[3, 7], num_inference_steps=2, generator=g, output_type="np").images)
        out = out.permute(0, 3, 1, 2)
    else:
        from stepdistill.benchmarks.digits.sampling import sample_with_scheduler

        assert type(pipe).__name__ == "DDPMPipeline" and pipe.unet.config.num_class_embeds == 11
        out = sample_with_scheduler(pipe, [3, 7], num_inference_steps=2)
    assert out.shape == (2, 1, 16, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", TEACHERS)
def test_resolve_teacher_gives_a_working_bundle(name):
    from stepdistill.benchmarks.digits.sampling import sample_bundle
    from stepdistill.runner import resolve_teacher

    cfg = SimpleNamespace(teacher=SimpleNamespace(path=f"digits:{name}", dtype="fp32", variant=None),
                          data=SimpleNamespace(resolution=None))
    bundle = resolve_teacher(cfg)
    assert bundle.denoiser.prediction == "eps"
    assert bundle.sample_shape == ((4, 8, 8) if name in ("sd", "dit") else (1, 16, 16))
    conds = ["a handwritten digit 3", ""] if name == "sd" else torch.tensor([3, 7])
    cond, uncond = bundle.encode_conditions(conds, "cpu")
    if name == "sd":
        # the unconditional input is the encoding of "" (what the teacher was trained with for CFG)
        torch.testing.assert_close(uncond.encoder_hidden_states[1], cond.encoder_hidden_states[1])
    else:
        assert uncond.class_labels.tolist() == [1000, 1000] if name == "dit" else [10, 10]
    images = sample_bundle(bundle, conds, steps=2, cfg_scale=3.0)
    assert images.shape == (2, 1, 16, 16) and torch.isfinite(images).all()
    assert images.min() >= -1 and images.max() <= 1


def test_teacher_guidance_lookup():
    assert paths.teacher_guidance("digits:sd") == 3.0
    assert paths.teacher_guidance("digits:dit") == paths.TEACHER_GUIDANCE["dit"] < 3.0
    assert paths.teacher_guidance("/some/folder", default=7.5) == 7.5 and paths.teacher_guidance(None) == 3.0


@pytest.mark.parametrize("name", TEACHERS)
def test_recorded_teacher_quality_at_its_benchmark_guidance(name):
    """The build record (metrics.json, written by scripts/build_digits_assets.py) was measured at the teacher's
    benchmark guidance, and it shows what the benchmark needs of a teacher: at full NFE the domain FID is at most half
    of the same sampler's at 1 and 2 steps, with class accuracy above 90%."""
    import json

    record = json.loads((paths.asset_path(f"teacher_{name}") / "metrics.json").read_text())["eval"]
    rows = {r["steps"]: r for r in record["results"] if r["solver"] == "ddim"}
    assert {r["cfg_scale"] for r in rows.values()} == {paths.TEACHER_GUIDANCE[name]}
    full = rows[max(rows)]
    assert full["class_accuracy"] > 0.9
    assert full["domain_fid"] <= 0.5 * min(rows[1]["domain_fid"], rows[2]["domain_fid"]), rows
