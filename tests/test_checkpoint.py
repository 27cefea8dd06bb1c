"""Checkpoint files: atomic writes, manifests, corruption detection, safe (pickle-free) state round trips."""

from __future__ import annotations

import random
import warnings

import numpy as np
import pytest
import torch

from stepdistill.training import checkpoint as ck
from stepdistill.training.checkpoint import (
    CheckpointError,
    capture_rng_state,
    flatten_state,
    latest_checkpoint,
    list_checkpoints,
    load_safetensors,
    prune_checkpoints,
    read_checkpoint,
    resolve_checkpoint,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
)


def _contents(value: float):
    return ({"recipe_state": {"student.w": torch.full((3, 4), value), "student.b": torch.arange(4.0)}},
            {"trainer": {"step": int(value)}})


def _save(run_dir, step):
    tensors, js = _contents(float(step))
    return save_checkpoint(run_dir / ck.CHECKPOINTS_DIR, step, tensors, js)


def test_round_trip_and_manifest(tmp_path):
    path = _save(tmp_path, 5)
    assert path.name == "step-0000005"
    loaded = read_checkpoint(path)
    assert loaded.step == 5
    assert set(loaded.files) == {"recipe_state.safetensors", "trainer.json"}
    assert torch.equal(loaded.tensors("recipe_state")["student.w"], torch.full((3, 4), 5.0))
    assert loaded.json("trainer") == {"step": 5}
    assert latest_checkpoint(tmp_path) == path


def test_optimizer_state_round_trip_is_exact_and_pickle_free(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 3))
    for _ in range(3):
        net(torch.randn(4, 3)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    tensors, skeleton = flatten_state({"opt": opt.state_dict(), "sched": sched.state_dict()})
    path = save_checkpoint(tmp_path, 3, {"optimizers": tensors}, {"optimizers": skeleton})
    loaded = read_checkpoint(path)
    state = unflatten_state(loaded.json("optimizers"), loaded.tensors("optimizers"))
    assert state["opt"]["param_groups"][0]["betas"] == (0.8, 0.95)  # tuples survive JSON
    assert set(state["opt"]["state"]) == {0, 1}  # int keys survive JSON

    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.AdamW(net2.parameters(), lr=1e-3)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda s: min(1.0, (s + 1) / 3))
    opt2.load_state_dict(state["opt"])
    sched2.load_state_dict(state["sched"])
    for key in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(opt2.state_dict()["state"][0][key], opt.state_dict()["state"][0][key])
    assert sched2.get_last_lr() == sched.get_last_lr() and sched2.last_epoch == sched.last_epoch
    # no pickles anywhere: every file is JSON or safetensors
    assert {p.suffix for p in path.iterdir()} == {".json", ".safetensors"}


def test_flatten_rejects_unsafe_values():
    with pytest.raises(TypeError, match="cannot store a object at 'x'"):
        flatten_state({"x": object()})


def test_crash_inside_a_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)
    calls = {"n": 0}
    real_save_file = ck.save_file

    def failing_save_file(tensors, filename, *a, **kw):
        calls["n"] += 1
        real_save_file(tensors, filename, *a, **kw)
        with open(filename, "r+b") as f:  # half-written file, then the "crash"
            f.truncate(10)
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ck, "save_file", failing_save_file)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2)
    assert calls["n"] == 1
    assert list_checkpoints(tmp_path / ck.CHECKPOINTS_DIR) == [first]
    assert latest_checkpoint(tmp_path) == first
    assert torch.equal(read_checkpoint(first).tensors("recipe_state")["student.w"], torch.full((3, 4), 1.0))
    assert (tmp_path / ck.CHECKPOINTS_DIR / ".tmp-step-0000002").is_dir()  # debris, ignored

    monkeypatch.setattr(ck, "save_file", real_save_file)
    third = _save(tmp_path, 3)  # the next save clears the debris
    assert not (tmp_path / ck.CHECKPOINTS_DIR / ".tmp-step-0000002").exists()
    assert latest_checkpoint(tmp_path) == third


def test_crash_before_the_rename_leaves_previous_checkpoint(tmp_path, monkeypatch):
    first = _save(tmp_path, 1)

    def no_rename(src, dst):
        raise OSError("killed before rename (simulated)")

    monkeypatch.setattr(ck.os, "replace", no_rename)
    with pytest.raises(OSError, match="simulated"):
        _save(tmp_path, 2)
    monkeypatch.undo()
    assert latest_checkpoint(tmp_path) == first


@pytest.mark.parametrize("damage", ["flip", "truncate", "no_manifest", "delete"])
def test_corrupt_checkpoints_are_detected_and_skipped(tmp_path, damage):
    good = _save(tmp_path, 1)
    bad = _save(tmp_path, 2)
    target = bad / "recipe_state.safetensors"
    if damage == "flip":
        data = bytearray(target.read_bytes())
        data[-1] ^= 0xFF
        target.write_bytes(bytes(data))
        expected = "does not match its sha256"
    elif damage == "truncate":
        target.write_bytes(target.read_bytes()[:-7])
        expected = "the manifest says"
    elif damage == "no_manifest":
        (bad / ck.MANIFEST).unlink()
        expected = "manifest.json is missing"
    else:
        target.unlink()
        expected = "recipe_state.safetensors is missing"
    with pytest.warns(UserWarning, match="skipping checkpoint") as rec:
        assert latest_checkpoint(tmp_path) == good
    assert expected in str(rec[0].message)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(bad)
    assert expected in str(info.value)
    if damage != "no_manifest":
        assert "recipe_state.safetensors" in str(info.value)


def test_truncated_safetensors_file_names_the_file(tmp_path):
    path = _save(tmp_path, 1) / "recipe_state.safetensors"
    copy = tmp_path / "weights.safetensors"
    copy.write_bytes(path.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=r"cannot read .*weights\.safetensors.*truncated or corrupt"):
        load_safetensors(copy)


@pytest.mark.parametrize("name", ["model.pt", "model.bin", "state.pkl", "last.ckpt"])
def test_pickles_are_refused_with_the_reason(tmp_path, name):
    path = tmp_path / name
    torch.save({"w": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError) as info:
        load_safetensors(path)
    msg = str(info.value)
    assert "refusing to load" in msg and "pickle" in msg and "arbitrary code" in msg and "safetensors" in msg
    with pytest.raises(CheckpointError, match="refusing to load"):
        resolve_checkpoint(path)


def test_resolve_checkpoint_accepts_run_dir_or_folder(tmp_path):
    _save(tmp_path, 1)
    second = _save(tmp_path, 2)
    assert resolve_checkpoint(tmp_path) == second
    assert resolve_checkpoint(second) == second
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path / "missing")


def test_prune_keeps_newest(tmp_path):
    for step in (1, 2, 3, 4):
        _save(tmp_path, step)
    root = tmp_path / ck.CHECKPOINTS_DIR
    deleted = prune_checkpoints(root, keep=2)
    assert [p.name for p in deleted] == ["step-0000001", "step-0000002"]
    assert [p.name for p in list_checkpoints(root)] == ["step-0000003", "step-0000004"]
    assert prune_checkpoints(root, keep=0) == []


def test_resaving_the_same_step_replaces_it(tmp_path):
    _save(tmp_path, 1)
    tensors, js = _contents(9.0)
    path = save_checkpoint(tmp_path / ck.CHECKPOINTS_DIR, 1, tensors, js)
    assert read_checkpoint(path).json("trainer") == {"step": 9}


def test_rng_state_round_trip_through_files(tmp_path):
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    tensors, meta = capture_rng_state()
    path = save_checkpoint(tmp_path, 1, {"rng": tensors}, {"rng": meta})
    expected = (torch.rand(5), np.random.rand(5), np.random.randn(), [random.random() for _ in range(5)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = read_checkpoint(path)
        restore_rng_state(loaded.tensors("rng"), loaded.json("rng"))
    again = (torch.rand(5), np.random.rand(5), np.random.randn(), [random.random() for _ in range(5)])
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1]) and expected[2] == again[2]
    assert expected[3] == again[3]


def test_shared_and_strided_tensors_are_saved(tmp_path):
    base = torch.arange(12.0).reshape(3, 4)
    tensors = {"a": base, "tied": base, "t": base.t()}
    path = save_checkpoint(tmp_path, 1, {"x": tensors}, {})
    loaded = read_checkpoint(path).tensors("x")
    assert torch.equal(loaded["tied"], base) and torch.equal(loaded["t"], base.t())
