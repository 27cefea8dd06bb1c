"""FID / KID / CLIP-score code paths on randomly initialised networks of the real architectures (no downloads)."""

import json

import numpy as np
import pytest
import torch

from stepdistill.evaluation import fid as fidmod
from stepdistill.evaluation.clip_score import clip_score, load_clip
from conftest import TINY_CLIP_CFG

# random_inception_file and tiny_clip_dir come from conftest.py


@pytest.fixture(autouse=True)
def no_caches(tmp_path, monkeypatch):
    """Point every cache the lookup consults at empty folders, so only explicit paths are found."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv(fidmod.ENV_VAR, raising=False)


def test_missing_inception_weights_error_names_file_and_place():
    with pytest.raises(fidmod.InceptionWeightsNotFound) as err:
        fidmod.find_inception_weights()
    msg = str(err.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg
    assert "hub" in msg and "checkpoints" in msg and fidmod.ENV_VAR in msg


def test_explicit_missing_path_is_reported(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found at"):
        fidmod.find_inception_weights(tmp_path / "nope.pth")


def test_weights_found_in_torch_hub_and_env(random_inception_file, tmp_path, monkeypatch):
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    (hub / fidmod.INCEPTION_FILENAMES[1]).symlink_to(random_inception_file)
    assert fidmod.find_inception_weights() == hub / fidmod.INCEPTION_FILENAMES[1]
    monkeypatch.setenv(fidmod.ENV_VAR, str(random_inception_file.parent))
    assert fidmod.find_inception_weights() == random_inception_file


def test_to_uint8_rounds_and_repeats_grey():
    x = torch.tensor([0.0, 0.5, 1.0, 1.2]).reshape(1, 1, 2, 2)
    u = fidmod.to_uint8_rgb(x)
    assert u.dtype == torch.uint8 and u.shape == (1, 3, 2, 2)
    assert u[0, 0].flatten().tolist() == [0, 128, 255, 255]
    hwc = np.zeros((2, 4, 4, 3), dtype=np.uint8)
    assert fidmod.to_uint8_rgb(hwc).shape == (2, 3, 4, 4)


def test_fid_kid_with_random_inception(random_inception_file):
    # The distance uses the 64-d Inception block features: the 2048-d path is the same code, but torchmetrics'
    # eigvals of a 2048x2048 float64 matrix takes minutes on a shared CPU.
    ext = fidmod.load_inception(random_inception_file, features=64)
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(4, 3, 32, 32, generator=g)
    gen_other = torch.rand(3, 1, 32, 32, generator=g) * 0.3
    same = fidmod.compute_fid_kid(ref.clone(), ref, reference_name="random-4", extractor=ext, kid_subsets=5)
    other = fidmod.compute_fid_kid(gen_other, ref, reference_name="random-4", extractor=ext, kid_subsets=5)
    assert abs(same["fid"]) < 1e-3 * max(1.0, other["fid"])  # identical sets: FID ~ 0 (sqrtm round-off)
    assert other["fid"] > 0 and np.isfinite(other["kid_mean"])
    assert other["num_generated"] == 3 and other["num_reference"] == 4 and other["reference"] == "random-4"
    assert other["kid_subset_size"] == 3 and other["statistics_dtype"] == "float64"
    fe = other["feature_extractor"]
    assert fe["weights"] == str(random_inception_file) and fe["official_weights"] is False
    assert len(fe["weights_sha256"]) == 64

    # FID by hand (Heusel et al. eq. 6) from the same float64 features.
    fr, fg = ext(fidmod.to_uint8_rgb(ref)), ext(fidmod.to_uint8_rgb(gen_other))
    mr, mg = fr.mean(0), fg.mean(0)
    cr, cg = torch.cov(fr.T), torch.cov(fg.T)
    tr_sqrt = torch.linalg.eigvals(cr @ cg).sqrt().real.sum()
    expected = float((mr - mg).square().sum() + cr.trace() + cg.trace() - 2 * tr_sqrt)
    assert other["fid"] == pytest.approx(expected, rel=1e-6)

    # Reference features extracted once and passed in give the same FID and KID.
    pre = fidmod.compute_fid_kid(gen_other, ref, reference_name="random-4", extractor=ext, kid_subsets=5,
                                 reference_features=fidmod.inception_features(ref, ext))
    assert pre["fid"] == pytest.approx(other["fid"], rel=1e-9) and pre["kid_mean"] == pytest.approx(other["kid_mean"])
    with pytest.raises(ValueError, match="same extractor"):
        fidmod.compute_fid_kid(gen_other, ref, reference_name="x", extractor=ext,
                               reference_features=torch.zeros(4, 2048, dtype=torch.float64))


def test_pool_features_match_torch_fidelity(random_inception_file):
    """The 2048-d features are torch-fidelity's: same numbers as its own extractor on the same uint8 images."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_fe

    ext = fidmod.load_inception(random_inception_file)
    assert ext.describe()["features"] == "pool3 2048-d"
    ref_net = tf_fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                feature_extractor_weights_path=str(random_inception_file))
    u = fidmod.to_uint8_rgb(torch.rand(1, 3, 24, 24, generator=torch.Generator().manual_seed(2)))
    ours = ext(u)
    assert ours.dtype == torch.float64 and ours.shape == (1, 2048)
    assert torch.allclose(ours, ref_net(u)[0].double(), rtol=1e-4, atol=1e-5)


def test_inception_file_with_wrong_content_is_rejected(tmp_path):
    bad = tmp_path / fidmod.INCEPTION_FILENAMES[0]
    torch.save({"fc.weight": torch.zeros(2, 2)}, bad)
    with pytest.raises(ValueError, match="not an Inception-v3 state dict"):
        fidmod.load_inception(bad)


# ------------------------------------------------------------------------------------------------- CLIP score


def test_clip_score_from_local_folder_and_long_prompts(tiny_clip_dir):
    scorer = load_clip(tiny_clip_dir)
    long_prompt = " ".join(["a very long prompt about a handwritten digit"] * 40)
    tokens, truncated = scorer.tokenize(["a cat", long_prompt])
    assert tokens.shape == (2, 77) and truncated == 1
    eot = scorer.tokenizer.eot_token_id
    assert int(tokens[1, -1]) == eot  # EOT kept last after truncation
    assert tokens[1, 1:76].tolist() == scorer.tokenizer.encode(long_prompt)[:75]
    images = torch.rand(3, 3, 40, 48, generator=torch.Generator().manual_seed(1))
    res = clip_score(images, ["a cat", long_prompt, "a dog"], scorer, batch_size=2)
    assert 0.0 <= res["clip_score"] <= 100.0 and res["num_pairs"] == 3 and res["truncated_prompts"] == 1
    assert res["scale"].startswith("100") and res["context_length"] == 77 and res["weights"] == str(tiny_clip_dir)

    # Reference computation of one pair by hand: 100 * max(cos, 0).
    from PIL import Image

    u = fidmod.to_uint8_rgb(images[:1])
    pixel = scorer.preprocess(Image.fromarray(u[0].permute(1, 2, 0).numpy()))[None]
    with torch.no_grad():
        a = scorer.model.encode_image(pixel).double()
        b = scorer.model.encode_text(scorer.tokenizer(["a cat"])).double()
    cos = torch.nn.functional.cosine_similarity(a, b).item()
    single = clip_score(images[:1], ["a cat"], scorer)
    assert single["clip_score"] == pytest.approx(100 * max(cos, 0.0), rel=1e-6, abs=1e-9)


def test_clip_checkpoint_file_with_builtin_backbone_name(tiny_clip_dir, tmp_path):
    import open_clip

    cfg = tmp_path / "stepdistill-test-tiny.json"
    cfg.write_text(json.dumps(TINY_CLIP_CFG))
    open_clip.add_model_config(cfg)
    scorer = load_clip(tiny_clip_dir / "open_clip_model.safetensors", backbone="stepdistill-test-tiny")
    res = clip_score(torch.rand(2, 1, 16, 16), ["handwritten 3", "the number four"], scorer)
    assert res["backbone"] == "stepdistill-test-tiny" and res["num_pairs"] == 2
    with pytest.raises(ValueError, match="backbone"):
        load_clip(tiny_clip_dir / "open_clip_model.safetensors")
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_clip(tmp_path / "missing.safetensors", backbone="ViT-B-32")


def test_class_pipeline_rows_do_not_depend_on_the_global_rng():
    """DiTPipeline does not hand its generator to scheduler.step, so an LCMScheduler (which re-noises between steps)
    used to draw from the global RNG and the same eval command gave different multistep FIDs. A row must depend only
    on its seed, and sampling must leave the caller's global RNG state alone."""
    from diffusers import LCMScheduler

    from stepdistill.evaluation.pipeline_runs import _call_pipe
    from stepdistill.models.teacher_io import load_pipeline
    from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

    pipe = load_pipeline(tiny_pipeline_dir("dit"))
    pipe.scheduler = LCMScheduler.from_config(pipe.scheduler.config)
    labels = torch.tensor([0, 1, 2, 3])
    kw = {"num_inference_steps": 4, "guidance_scale": 1.0}
    torch.manual_seed(1)
    first = _call_pipe(pipe, "class", labels, None, kw, seed=7, image_size=None)
    torch.manual_seed(2)
    state = torch.get_rng_state()
    second = _call_pipe(pipe, "class", labels, None, kw, seed=7, image_size=None)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first, second)
    other_seed = _call_pipe(pipe, "class", labels, None, kw, seed=8, image_size=None)
    assert not torch.equal(first, other_seed)
