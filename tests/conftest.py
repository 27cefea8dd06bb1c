"""Test-wide settings: no network, a bounded number of CPU threads (the machine is shared)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


# ---------------------------------------------------------------- randomly initialised metric networks (no downloads)
import json  # noqa: E402

import pytest  # noqa: E402

from stepdistill.evaluation.fid import INCEPTION_FILENAMES  # noqa: E402


@pytest.fixture(scope="session")
def random_inception_file(tmp_path_factory):
    """torch-fidelity's Inception-v3 with random weights, saved under the official file name."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    mp = pytest.MonkeyPatch()
    mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
    mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    try:
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
        state = {k: v.clone() for k, v in net.state_dict().items()}
    finally:
        mp.undo()
    folder = tmp_path_factory.mktemp("inception")
    path = folder / INCEPTION_FILENAMES[0]
    torch.save(state, path)
    return path


TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A randomly initialised open_clip CLIP (ViT image tower + transformer text tower, CLIP tokenizer) saved in
    open_clip's local-dir layout, built with pretrained=None."""
    import open_clip
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny-clip")
    (folder / "open_clip_config.json").write_text(json.dumps({
        "model_cfg": TINY_CLIP_CFG,
        "preprocess_cfg": {"mean": [0.48145466, 0.4578275, 0.40821073], "std": [0.26862954, 0.26130258, 0.27577711]},
    }))
    torch.manual_seed(0)
    model = open_clip.create_model(f"local-dir:{folder}", load_weights=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


@pytest.fixture
def one_thread():
    """Small-tensor training loops run much faster on one thread than on two contended ones."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
