"""Hostile and broken inputs (issue 9, item 4): each gives one clear message naming the problem and the fix, and the
tests assert that text. Also a hypothesis fuzz of the config loader: nothing but ConfigError may escape it.

Covered elsewhere (not repeated here): corrupt/missing checkpoint files (test_checkpoint.py), pickled checkpoint
files passed to load_safetensors (test_checkpoint.py), disk full while saving (test_crash_safety.py).
"""

from __future__ import annotations

import json
import shutil
import string
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stepdistill.config import ConfigError, DataSection, config_from_dict, load_config
from stepdistill.models.teacher_io import TeacherLoadError, load_pipeline
from stepdistill.training.checkpoint import CheckpointError, load_safetensors, resolve_checkpoint
from stepdistill.training.data import DataStart, build_data_factory

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ config
def test_unknown_key_suggests_the_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("recipe: {name: lcm, omega_mni: 3}\ntrain: {max_stpes: 5}\ndtaa: {}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, ["train.lrr=1e-4"])
    msg = str(info.value)
    assert "train.max_stpes: unknown key 'max_stpes' in section 'train'; did you mean 'max_steps'?" in msg
    assert "train.lrr: unknown key 'lrr' in section 'train' (from a command-line override); did you mean 'lr'?" in msg
    assert "recipe.omega_mni: unknown key 'omega_mni' in section 'recipe' (options of recipe 'lcm'); did you mean " \
           "'omega_min'?" in msg
    assert "dtaa: unknown section 'dtaa'; did you mean 'data'?" in msg
    assert len(info.value.problems) == 4  # every mistake at once


def test_wrong_types_name_key_value_and_expected_type():
    with pytest.raises(ConfigError) as info:
        config_from_dict({"recipe": {"name": "lcm", "omega": "high"},
                          "train": {"lr": "fast", "max_steps": 1.5, "ema_decay": True, "trackers": "tensorboard"},
                          "data": {"kind": "imagefolder"}})
    msg = str(info.value)
    assert "train.lr: expected float, got str 'fast'" in msg
    assert "train.max_steps: expected int, got float 1.5" in msg
    assert "train.ema_decay: expected float, got bool True" in msg
    assert "train.trackers: expected list[" in msg and "got str 'tensorboard'" in msg
    assert "recipe.omega: expected float | null, got str 'high'" in msg
    assert "data.kind: 'imagefolder' is not allowed" in msg and "did you mean 'image_folder'?" in msg
    with pytest.raises(ConfigError, match=r"recipe.name: 'lcm.v2' is not a recipe name .*did you mean 'lcm'\?"):
        config_from_dict({"recipe": {"name": "lcm.v2"}})


# ------------------------------------------------------------------------------------------------ teachers
@pytest.fixture(scope="module")
def tiny_sd() -> Path:
    from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

    return tiny_pipeline_dir("sd")


@pytest.fixture
def teacher_copy(tiny_sd, tmp_path) -> Path:
    dst = tmp_path / "teacher"
    shutil.copytree(tiny_sd, dst)
    return dst


def test_teacher_missing_a_component_folder(teacher_copy):
    shutil.rmtree(teacher_copy / "unet")
    with pytest.raises(TeacherLoadError) as info:
        load_pipeline(teacher_copy)
    msg = str(info.value)
    assert "lists component 'unet' (UNet2DConditionModel) in model_index.json" in msg
    assert f"the folder {teacher_copy / 'unet'} is missing" in msg


@pytest.mark.parametrize("missing, expected", [
    ("unet/diffusion_pytorch_model.safetensors", "teacher component 'unet' (UNet2DConditionModel) has no weights: "
                                                 "expected the file {dir}/unet/diffusion_pytorch_model.safetensors"),
    ("text_encoder/model.safetensors", "teacher component 'text_encoder' (CLIPTextModel) has no weights: expected "
                                       "the file {dir}/text_encoder/model.safetensors"),
    ("vae/config.json", "teacher component 'vae' (AutoencoderKL) is incomplete: expected the file "
                        "{dir}/vae/config.json, which is missing"),
    ("scheduler/scheduler_config.json", "teacher component 'scheduler' (PNDMScheduler) is incomplete: expected the "
                                        "file {dir}/scheduler/scheduler_config.json"),
])
def test_teacher_component_missing_a_file(teacher_copy, missing, expected):
    scheduler_class = json.loads((teacher_copy / "model_index.json").read_text())["scheduler"][1]
    (teacher_copy / missing).unlink()
    with pytest.raises(TeacherLoadError) as info:
        load_pipeline(teacher_copy)
    assert expected.format(dir=teacher_copy).replace("PNDMScheduler", scheduler_class) in str(info.value)


def test_teacher_with_truncated_or_garbage_weights(teacher_copy):
    weights = teacher_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(TeacherLoadError) as info:
        load_pipeline(teacher_copy)
    msg = str(info.value)
    assert f"teacher weights {weights} are unreadable: the header says {len(data)} bytes but the file has " \
           f"{len(data) // 2} bytes (truncated or corrupt)" in msg
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    with pytest.raises(TeacherLoadError, match="its header is not valid JSON"):
        load_pipeline(teacher_copy)


def test_teacher_with_pickled_weights_is_refused(teacher_copy):
    unet = teacher_copy / "unet"
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    torch.save({"w": torch.zeros(1)}, unet / "diffusion_pytorch_model.bin")
    with pytest.raises(TeacherLoadError) as info:
        load_pipeline(teacher_copy)
    msg = str(info.value)
    assert "refusing to load teacher component 'unet': its weights diffusion_pytorch_model.bin are Python " \
           "pickles" in msg
    assert "can run arbitrary code" in msg and "safe_serialization=True" in msg


def _teacher_cfg(teacher: Path, tmp_path: Path):
    return config_from_dict({"teacher": {"path": str(teacher)}, "run": {"output_dir": str(tmp_path / "run")},
                             "recipe": {"name": "lcm"}, "data": {"kind": "random_images", "resolution": 32}})


def test_teacher_prediction_type_the_recipe_cannot_use(teacher_copy, tmp_path):
    from stepdistill.runner import build_recipe

    sched = teacher_copy / "scheduler" / "scheduler_config.json"
    config = json.loads(sched.read_text())
    sched.write_text(json.dumps({**config, "prediction_type": "flow_prediction"}))
    with pytest.raises(ValueError) as info:
        build_recipe(_teacher_cfg(teacher_copy, tmp_path))
    assert "LCM needs a discrete VP teacher (DDPM-style scheduler); this teacher's process is" in str(info.value)
    assert "Use the sCM recipe for flow/TrigFlow teachers" in str(info.value)

    sched.write_text(json.dumps({**config, "prediction_type": "velocity"}))
    with pytest.raises(TeacherLoadError) as info:
        build_recipe(_teacher_cfg(teacher_copy, tmp_path))
    msg = str(info.value)
    assert "scheduler/scheduler_config.json) is not usable: unknown Diffusers prediction_type 'velocity'" in msg
    assert "v_prediction" in msg  # the allowed values are listed


def test_pickle_resume_target_is_refused(tmp_path):
    path = tmp_path / "last.ckpt"
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as info:
        resolve_checkpoint(path)
    msg = str(info.value)
    assert f"refusing to load {path}: .ckpt files are Python pickles" in msg and "arbitrary code" in msg


def test_garbage_safetensors_file(tmp_path):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path)
    msg = str(info.value)
    assert f"cannot read {path}: its header claims" in msg and "the file is truncated or corrupt" in msg
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="it has 0 bytes, fewer than the 8-byte header length"):
        load_safetensors(path)


# ------------------------------------------------------------------------------------------------ prompt files
def _prompts(path: Path):
    return build_data_factory(DataSection(kind="prompts", path=str(path), batch_size=2))


@pytest.mark.parametrize("content, what", [(b"", "is empty"), (b"\n  \n\t\n", "has only blank lines")])
def test_empty_prompt_file(tmp_path, content, what):
    path = tmp_path / "prompts.txt"
    path.write_bytes(content)
    with pytest.raises(ValueError) as info:
        _prompts(path)
    assert f"prompt file {path} {what}: give one prompt per line" in str(info.value)


def test_non_utf8_prompt_file_names_line_and_byte(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_bytes("a cat\na dog\n".encode() + b"caf\xe9 au lait\n")  # latin-1 e-acute on line 3
    with pytest.raises(ValueError) as info:
        _prompts(path)
    msg = str(info.value)
    assert f"prompt file {path} is not valid UTF-8: line 3, byte offset 15 (byte 0xe9" in msg
    assert "re-save it as UTF-8" in msg and "iconv" in msg
    path.write_bytes("\ufeffa cat\n\nun café\n".encode())  # a BOM and real UTF-8 are fine
    batch = next(iter(_prompts(path)(DataStart(0))))
    assert set(batch["conditions"]) <= {"a cat", "un café"}


def test_missing_prompt_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"data.path .*nope.txt does not exist; give a text file"):
        _prompts(tmp_path / "nope.txt")


# ------------------------------------------------------------------------------------------------ image folders
def test_image_folder_converts_resizes_and_skips_unreadable_files(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    Image.new("RGB", (40, 12), (200, 10, 10)).save(folder / "wide.png")
    Image.new("L", (5, 7), 128).save(folder / "tiny_grey.png")  # smaller than the resolution: upscaled
    Image.new("RGBA", (64, 64), (0, 0, 255, 80)).save(folder / "alpha.png")
    palette = Image.new("P", (16, 16), 3)
    palette.putpalette([10, 20, 30] * 256)
    palette.save(folder / "sub" / "palette.png", transparency=3)  # palette with a transparent index
    Image.new("CMYK", (20, 20), (0, 255, 0, 0)).save(folder / "cmyk.jpg")
    (folder / "broken.png").write_bytes(b"definitely not a png")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.md").write_text("ignored: not an image suffix")

    with pytest.warns(UserWarning) as rec:
        factory = build_data_factory(DataSection(kind="image_folder", path=str(folder), resolution=8, batch_size=5))
    msg = str(rec[0].message)
    assert msg.startswith(f"data.path {folder}: skipped 2 of 7 files that are not readable images: broken.png (")
    assert "empty.jpg (" in msg and "cannot identify image file" in msg
    batch = next(iter(factory(DataStart(0))))
    assert batch["images"].shape == (5, 3, 8, 8) and batch["images"].dtype == torch.float32
    assert batch["images"].min() >= -1 and batch["images"].max() <= 1
    grey = build_data_factory(DataSection(kind="image_folder", path=str(folder), resolution=4, batch_size=5,
                                          channels=1))
    assert next(iter(grey(DataStart(0))))["images"].shape == (5, 1, 4, 4)


def test_image_folder_with_no_readable_image(tmp_path):
    (tmp_path / "a.png").write_bytes(b"\x89PNG junk")
    with pytest.raises(ValueError) as info:
        build_data_factory(DataSection(kind="image_folder", path=str(tmp_path), resolution=8, batch_size=1))
    msg = str(info.value)
    assert "skipped 1 of 1 files that are not readable images: a.png (" in msg and "No readable image is left" in msg


def test_image_with_truncated_pixel_data_names_the_file(tmp_path):
    from PIL import Image

    for i in range(2):
        noise = torch.randint(0, 256, (32, 32, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(noise.numpy()).save(tmp_path / f"{i}.png")
    data = (tmp_path / "1.png").read_bytes()
    (tmp_path / "1.png").write_bytes(data[: len(data) // 2])  # header intact, pixel data cut off
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the header reads fine: not skipped at start
        factory = build_data_factory(DataSection(kind="image_folder", path=str(tmp_path), resolution=8, batch_size=2))
    with pytest.raises(ValueError) as info:
        next(iter(factory(DataStart(0))))
    msg = str(info.value)
    assert f"image {tmp_path / '1.png'} could not be decoded" in msg and "truncated or corrupt" in msg


# ------------------------------------------------------------------------------------------------ fuzzing
_KEYS = ["run", "teacher", "recipe", "data", "train", "export", "name", "lcm", "lr", "max_steps", "kind", "path",
         "batch_size", "seed", "output_dir", "resume", "omega", "omega_min", "variant", "ema_decay", "trackers",
         "on_nan", "mixed_precision", "resolution", "channels", "dtype", "use_ema", "x", "", "__dict__", "1"]
_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
            | st.text(string.printable, max_size=12) | st.sampled_from(["lcm", "toy2d", "prompts", "auto", "fp16",
                                                                      "rollback", "1e-4", "../x", "lcm.v2"]))
_keys = st.sampled_from(_KEYS) | st.text(max_size=6) | st.integers(-3, 3) | st.booleans() | st.none()
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5),
                       max_leaves=25)
_configs = st.dictionaries(_keys, _values, max_size=7)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw=_configs | _values)
def test_fuzz_config_from_dict_raises_only_config_errors(raw):
    try:
        config_from_dict(raw)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and p for p in exc.problems)


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(text=st.text(string.printable + "é\u2028{}[]:-&*!|>'\"#", max_size=120) | _configs.map(
    lambda d: yaml.safe_dump(d, default_flow_style=True) if _yaml_ok(d) else "{"),
       overrides=st.lists(st.text(string.printable, max_size=20), max_size=3))
def test_fuzz_load_config_from_yaml_text_and_overrides(tmp_path_factory, text, overrides):
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, overrides)
    except ConfigError as exc:
        assert exc.problems


def _yaml_ok(d) -> bool:
    try:
        yaml.safe_dump(d)
        return True
    except yaml.YAMLError:
        return False
