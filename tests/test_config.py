"""Run-config loading, overrides and validation messages (stepdistill/config.py)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from stepdistill.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    flatten_config,
    load_config,
    parse_override,
    register_recipe_options,
    save_config,
)


@dataclass
class _CfgTestOptions:
    """Options of the test-only recipe 'cfg_test'."""

    w_range: tuple[float, float] = (2.0, 8.0)
    num_steps: int = 4
    mode: Literal["fast", "slow"] = "fast"
    targets: list[str] | None = None


register_recipe_options("cfg_test", _CfgTestOptions)

BASE_YAML = """
run:
  output_dir: runs/x
  seed: 3
recipe:
  name: cfg_test
  w_range: [1, 5]
data:
  kind: digits
  batch_size: 16
train:
  lr: 1e-4
  max_steps: 100
"""


def _errors(raw=None, overrides=(), tmp_path=None) -> str:
    with pytest.raises(ConfigError) as info:
        if tmp_path is not None:
            path = tmp_path / "c.yaml"
            path.write_text(BASE_YAML)
            load_config(path, list(overrides))
        else:
            config_from_dict(raw)
    return str(info.value)


def test_yaml_plus_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE_YAML)
    cfg = load_config(path, ["train.lr=3e-5", "recipe.w_range=[2,8]", "recipe.mode=slow", "train.trackers=[]",
                             "run.name=my:run", "teacher.variant="])
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.recipe.name == "cfg_test"
    assert cfg.recipe.options.w_range == (2.0, 8.0) and isinstance(cfg.recipe.options.w_range[0], float)
    assert cfg.recipe.options.mode == "slow"
    assert cfg.train.trackers == []
    assert cfg.run.name == "my:run" and cfg.run.seed == 3
    assert cfg.teacher.variant is None
    assert cfg.data.batch_size == 16 and cfg.train.max_steps == 100
    assert cfg.train.mixed_precision == "no"  # default


def test_yaml_floats_without_dot_are_floats(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(BASE_YAML)
    assert load_config(path).train.lr == 1e-4  # plain YAML 1.1 would read "1e-4" as a string


def test_parse_override():
    assert parse_override("train.lr=1e-4") == ("train.lr", 1e-4)
    assert parse_override("recipe.w_range=[2, 8]") == ("recipe.w_range", [2, 8])
    assert parse_override("run.name=a=b") == ("run.name", "a=b")
    assert parse_override("teacher.path=/x/y z") == ("teacher.path", "/x/y z")
    assert parse_override("train.ema_decay=") == ("train.ema_decay", None)
    for bad in ("train.lr", "=3", "train..lr=1"):
        with pytest.raises(ConfigError, match="must look like section.key=value"):
            parse_override(bad)


def test_unknown_key_names_section_allowed_keys_and_closest_match(tmp_path):
    msg = _errors(overrides=["train.lrr=1e-3"], tmp_path=tmp_path)
    assert "train.lrr: unknown key 'lrr' in section 'train'" in msg
    assert "(from a command-line override)" in msg
    assert "did you mean 'lr'?" in msg
    assert "Allowed keys: max_steps, lr, lr_scheduler" in msg


def test_unknown_section_and_recipe_option():
    msg = _errors({"trian": {"lr": 1}, "recipe": {"name": "cfg_test", "w_rnage": [1, 2]}})
    assert "trian: unknown section 'trian'; did you mean 'train'?" in msg
    assert "recipe.w_rnage: unknown key 'w_rnage' in section 'recipe' (options of recipe 'cfg_test')" in msg
    assert "did you mean 'w_range'?" in msg
    assert "Allowed keys: w_range, num_steps, mode, targets" in msg


def test_unknown_key_without_close_match_lists_allowed():
    msg = _errors({"recipe": {"name": "cfg_test"}, "data": {"zzzzzz": 1}})
    assert "data.zzzzzz: unknown key 'zzzzzz' in section 'data'." in msg
    assert "did you mean" not in msg
    assert "Allowed keys: kind, path, batch_size" in msg


def test_wrong_types_name_key_value_and_expected_type(tmp_path):
    msg = _errors(overrides=["train.max_steps=abc", "train.lr=fast", "train.allow_tf32=3", "run.name=2024",
                             "recipe.w_range=[1]", "recipe.num_steps=2.5"], tmp_path=tmp_path)
    assert "train.max_steps: expected int, got str 'abc'" in msg
    assert "train.lr: expected float, got str 'fast'" in msg
    assert "train.allow_tf32: expected bool (true/false), got int 3" in msg
    assert "run.name: expected str, got int 2024; quote it" in msg
    assert "recipe.w_range: expected 2 items (tuple[float, float]), got 1: [1]" in msg
    assert "recipe.num_steps: expected int, got float 2.5" in msg
    assert msg.count("\n  - ") == 6  # every problem reported at once


def test_bad_enum_lists_allowed_values():
    msg = _errors({"recipe": {"name": "cfg_test", "mode": "fsat"}, "train": {"mixed_precision": "fp8"}})
    assert "train.mixed_precision: 'fp8' is not allowed; allowed values: 'no', 'fp16', 'bf16'" in msg
    assert "recipe.mode: 'fsat' is not allowed; allowed values: 'fast', 'slow'; did you mean 'fast'?" in msg
    msg = _errors({"recipe": {"name": "cfg_test"}, "train": {"trackers": ["tensorbord"]}})
    assert "train.trackers[0]" in msg and "did you mean 'tensorboard'?" in msg


def test_range_and_cross_field_checks():
    msg = _errors({"recipe": {"name": "cfg_test"}, "train": {"lr": -1, "ema_decay": 1.0},
                   "data": {"kind": "image_folder"}})
    assert "train.lr: must be > 0, got -1.0" in msg
    assert "train.ema_decay: must be in [0, 1) (0 = off), got 1.0" in msg
    assert "data.path: required when data.kind is 'image_folder'" in msg
    assert "data.resolution: required when data.kind is 'image_folder'" in msg


def test_recipe_name_missing_or_unknown():
    assert "recipe.name: required" in _errors({"train": {}})
    msg = _errors({"recipe": {"name": "cfg_tset"}})
    assert "recipe.name: unknown recipe 'cfg_tset'; did you mean 'cfg_test'?" in msg
    assert "Registered recipes:" in msg and "cfg_test" in msg


def test_missing_file_and_yaml_syntax_error(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope\.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: [1, 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value) and "YAML syntax error" in str(info.value)
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_override_into_a_value_is_an_error():
    with pytest.raises(ConfigError, match=r"train.lr is a value \(0.0001\), not a section"):
        load_config(None, ["train.lr=1e-4", "train.lr.x=1"])


def test_save_and_reload_round_trip(tmp_path):
    cfg = config_from_dict({"recipe": {"name": "cfg_test", "w_range": [3, 4], "targets": ["a", "b"]},
                            "train": {"lr": 2e-5, "trackers": []}})
    save_config(cfg, tmp_path / "run" / "config.yaml")
    again = load_config(tmp_path / "run" / "config.yaml")
    assert again == cfg
    assert config_to_dict(cfg)["recipe"] == {"name": "cfg_test", "w_range": [3.0, 4.0], "num_steps": 4,
                                             "mode": "fast", "targets": ["a", "b"]}
    flat = flatten_config(cfg)
    assert flat["train.lr"] == 2e-5 and flat["recipe.mode"] == "fast"


def test_model_section_and_speed_switches_validate():
    cfg = config_from_dict({"recipe": {"name": "cfg_test"},
                            "model": {"attention_backend": "math", "fuse_qkv": True},
                            "teacher": {"dtype": "auto"},
                            "train": {"compile": True, "gradient_checkpointing": True, "channels_last": False}})
    assert (cfg.model.attention_backend, cfg.model.fuse_qkv, cfg.teacher.dtype) == ("math", True, "auto")
    assert cfg.train.compile and cfg.train.gradient_checkpointing and cfg.train.channels_last is False
    defaults = config_from_dict({"recipe": {"name": "cfg_test"}})
    assert (defaults.model.attention_backend, defaults.model.fuse_qkv) == ("sdpa", False)
    assert defaults.train.channels_last == "auto" and not defaults.train.compile
    assert flatten_config(cfg)["model.attention_backend"] == "math"
    assert config_from_dict(config_to_dict(cfg)) == cfg


def test_model_section_mistakes_are_named():
    msg = _errors({"recipe": {"name": "cfg_test"}, "model": {"attention_backend": "xfromers"}})
    assert "model.attention_backend: unknown attention backend 'xfromers'; did you mean 'xformers'?" in msg
    msg = _errors({"recipe": {"name": "cfg_test"}, "model": {"fuse_qvk": True}, "train": {"channels_last": "sometimes"}})
    assert "model.fuse_qvk: unknown key 'fuse_qvk' in section 'model'; did you mean 'fuse_qkv'?" in msg
    assert "train.channels_last: expected bool | 'auto'" in msg
    assert "model.attention_backend: 'flash_hub' downloads its kernel" in _errors(
        {"recipe": {"name": "cfg_test"}, "model": {"attention_backend": "flash_hub"}})
