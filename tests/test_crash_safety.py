"""Crash safety (issue 9, items 2 and 3): SIGKILL inside a checkpoint write and during training, disk full while
saving, every trained network in every checkpoint, and the NaN/inf guard's skip / rollback / stop.

The SIGKILLs are deterministic: ``STEPDISTILL_FAULT`` names the point where the child kills itself
(stepdistill.training.checkpoint.fault_point), e.g. right after ``optimizers.safetensors`` of checkpoint 4 is written.
"""

from __future__ import annotations

import copy
import errno
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from stepdistill.config import config_from_dict, load_config
from stepdistill.recipes.base import Recipe, StepOutput, register_recipe
from stepdistill.recipes.common import update_target_ema
from stepdistill.runner import run_training
from stepdistill.training import NonFiniteLossError, read_checkpoint, seed_everything, step_indexed, train
from stepdistill.training import checkpoint as ck
from stepdistill.training.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints

SEED = 11
TOY_LCM = {
    "run": {"seed": SEED},
    "teacher": {"path": "toy2d:ring8"},
    "recipe": {"name": "lcm", "variant": "full", "omega": 1.0, "num_ddim_timesteps": 50},
    "data": {"kind": "toy2d", "batch_size": 16},
    "train": {"max_steps": 6, "lr": 1.0e-3, "checkpoint_every": 2, "keep_checkpoints": 2, "log_every": 1,
              "trackers": [], "ema_decay": 0.9, "gradient_accumulation_steps": 2},
}


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(path)
    return {f"{stem}:{k}": v for stem in ("recipe_state", "ema", "optimizers") for k, v in ckpt.tensors(stem).items()}


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


# ------------------------------------------------------------------------------------- SIGKILL, real LCM recipe
def _cli_killed(cfg_file: Path, run_dir: Path, fault: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", STEPDISTILL_FAULT=fault)
    return subprocess.run([sys.executable, "-m", "stepdistill", "train", str(cfg_file), f"run.output_dir={run_dir}",
                           "--no-export"], env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow  # two CLI subprocesses: ~15 s of CPU, 60-80 s wall on a loaded 2-core machine
def test_sigkill_inside_a_checkpoint_write_and_during_training_then_resume_is_exact(tmp_path):
    cfg_file = tmp_path / "toy-lcm.yaml"
    cfg_file.write_text(yaml.safe_dump(TOY_LCM))
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"

    # 1. killed half-way through writing checkpoint 4 (optimizer tensors on disk, trainer.json and manifest not)
    proc = _cli_killed(cfg_file, run_dir, "write:step-0000004/optimizers.safetensors")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert [p.name for p in list_checkpoints(root)] == ["step-0000002"]
    partial = {p.name for p in (root / ".tmp-step-0000004").iterdir()}
    assert "optimizers.safetensors" in partial and "manifest.json" not in partial
    assert latest_checkpoint(run_dir).name == "step-0000002"

    # 2. resumed from checkpoint 2; checkpoint 4 completes; killed in the middle of update 5 (after a backward).
    # (A kill after the manifest but before the rename is covered in-process by test_checkpoint.py.)
    proc = _cli_killed(cfg_file, run_dir, "backward:step-0000005")
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest_checkpoint(run_dir).name == "step-0000004"
    assert not (root / ".tmp-step-0000004").exists()

    # 3. the last resume (in this process) ends exactly where an uninterrupted run ends
    run_training(load_config(cfg_file, [f"run.output_dir={run_dir}"]), export=False)
    run_training(load_config(cfg_file, [f"run.output_dir={tmp_path / 'reference'}"]), export=False)
    final, reference = _tensors(root / "step-0000006"), _tensors(tmp_path / "reference/checkpoints/step-0000006")
    assert any(k.startswith("ema:") for k in final) and any(k.startswith("recipe_state:target.") for k in final)
    _assert_identical(final, reference)
    assert [p.name for p in list_checkpoints(root)] == ["step-0000004", "step-0000006"]  # keep_checkpoints=2


# ------------------------------------------------------------------------------------------- a tiny recipe
@register_recipe("crash_safety_test")
class TinyGAN(Recipe):
    """A student regressor with a target EMA plus a critic (two optimizers), with injectable non-finite values."""

    def __init__(self, nan_steps=(), once=False, grad_nan_steps=(), forget_critic=False):
        self.student = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 1))
        self.critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self.prepared: dict[str, nn.Module] = {}
        self.nan_steps, self.once, self.grad_nan_steps = set(nan_steps), once, set(grad_nan_steps)
        self.forget_critic = forget_critic
        self.seen_nan: set[int] = set()

    def trainable_modules(self):
        return {"student": self.student, "critic": self.critic}

    def set_prepared(self, name, module):
        self.prepared[name] = module

    def training_step(self, batch, step, generator):
        x = batch["x"] + 0.01 * torch.randn(batch["x"].shape, generator=generator)
        pred = self.prepared["student"](x)
        loss = F.mse_loss(pred, batch["y"])
        if step in self.nan_steps and not (self.once and step in self.seen_nan):
            loss = loss * float("nan")
            self.seen_nan.add(step)
        if step in self.grad_nan_steps:  # finite loss (sqrt(0) = 0), infinite gradient (1 / (2 sqrt(0)))
            loss = loss + torch.sqrt(pred.sum() - pred.sum().detach())
        critic = F.mse_loss(self.prepared["critic"](torch.cat([x[:, :1], pred.detach()], 1)), batch["y"])
        return StepOutput({"student": loss, "critic": critic})

    def after_optimizer_step(self, name, step):
        if name == "student":
            update_target_ema(self.target, self.student, 0.9)

    def state_dict_for_checkpoint(self):
        state = {"student": self.student.state_dict(), "target": self.target.state_dict()}
        if not self.forget_critic:
            state["critic"] = self.critic.state_dict()
        return state

    def load_state_dict_from_checkpoint(self, state):
        self.student.load_state_dict(state["student"])
        self.target.load_state_dict(state["target"])
        self.critic.load_state_dict(state["critic"])


def _batch(k: int, g: torch.Generator) -> dict:
    x = torch.randn(8, 2, generator=g)
    return {"x": x, "y": torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:] ** 2}


def _cfg(run_dir, **train_opts):
    opts = dict(max_steps=12, lr=1e-2, checkpoint_every=4, keep_checkpoints=0, log_every=1, trackers=[],
                ema_decay=0.8)
    opts.update(train_opts)
    return config_from_dict({"run": {"output_dir": str(run_dir), "seed": SEED},
                             "recipe": {"name": "crash_safety_test"}, "train": opts})


def _run(run_dir, recipe_kw=None, **train_opts) -> TinyGAN:
    seed_everything(SEED)
    recipe = TinyGAN(**(recipe_kw or {}))
    train(_cfg(run_dir, **train_opts), recipe, step_indexed(_batch))
    return recipe


# ------------------------------------------------------------------------------------------------ disk full
@pytest.mark.parametrize("error", ["oserror", "safetensors"])
def test_disk_full_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error):
    real_save_file = ck.save_file
    calls = {"n": 0}

    def full_disk(tensors, filename, *args, **kwargs):
        calls["n"] += 1
        if "step-0000008" in str(filename):
            if error == "oserror":
                raise OSError(errno.ENOSPC, "No space left on device", filename)
            from safetensors import SafetensorError

            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_file(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(ck, "save_file", full_disk)
    with pytest.raises(CheckpointError) as info:
        _run(tmp_path)
    msg = str(info.value)
    previous = tmp_path / "checkpoints" / "step-0000004"
    assert msg.startswith("disk full: no space left on the device while writing checkpoint step-0000008")
    assert f"the previous checkpoint {previous} is intact" in msg
    assert "free space on that disk" in msg and "run.output_dir to a disk with more room" in msg
    assert "run.resume=auto continues from step-0000004" in msg and "MiB" in msg
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["step-0000004"]
    assert not (tmp_path / "checkpoints" / ".tmp-step-0000008").exists()  # the partial checkpoint was removed
    ck.verify_checkpoint(previous)
    assert latest_checkpoint(tmp_path) == previous


def test_disk_full_is_reported_by_the_cli_without_a_traceback(tmp_path, monkeypatch, capsys):
    from stepdistill import cli

    monkeypatch.setattr(ck, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space")))
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text(yaml.safe_dump({**TOY_LCM, "train": {**TOY_LCM["train"], "max_steps": 1}}))
    assert cli.main(["train", str(cfg_file), f"run.output_dir={tmp_path / 'run'}", "--no-export"]) == 2
    err = capsys.readouterr().err
    assert "stepdistill train: error: disk full" in err and "no earlier checkpoint exists" in err
    assert "Traceback" not in err


def test_every_trained_network_must_be_in_the_checkpoint(tmp_path):
    with pytest.raises(RuntimeError) as info:
        _run(tmp_path, recipe_kw={"forget_critic": True}, max_steps=4)
    msg = str(info.value)
    assert "state_dict_for_checkpoint() leaves out 4 trainable parameter(s) of module 'critic'" in msg
    assert "0.weight" in msg and "restarts it silently" in msg
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_checkpoints_hold_every_network_ema_and_optimizer(tmp_path):
    _run(tmp_path, max_steps=4)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "step-0000004")
    groups = {k.split(".")[0] for k in ckpt.tensors("recipe_state")}
    assert groups == {"student", "target", "critic"}
    assert {k.split(".")[0] for k in ckpt.tensors("ema")} == {"student"}
    optimizers = {k.split("/")[1] for k in ckpt.tensors("optimizers")}
    assert optimizers == {"student", "critic"}


# ------------------------------------------------------------------------------------------------ NaN guard
def test_non_finite_gradient_with_finite_loss_is_skipped_and_counted(tmp_path):
    recipe = _run(tmp_path, recipe_kw={"grad_nan_steps": {2}}, max_steps=4, ema_decay=0.0)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "step-0000004")
    guard = ckpt.json("trainer")["guard"]
    assert guard["total_skipped"] == {"student": 1} and guard["consecutive"]["student"] == 0
    assert int(ckpt.tensors("optimizers")["optimizers/student/state/0/step"]) == 3
    assert int(ckpt.tensors("optimizers")["optimizers/critic/state/0/step"]) == 4
    assert all(torch.isfinite(p).all() for p in recipe.student.parameters())


@pytest.mark.parametrize("accumulation", [1, 2])  # with 2, the critic holds accumulated grads when the rollback hits
def test_rollback_reloads_the_last_checkpoint_with_a_lower_lr(tmp_path, accumulation):
    # NaN at updates 5, 6, 7 (once each): 3 in a row -> back to checkpoint 4 with lr x 0.5, then clean to the end
    with pytest.warns(UserWarning) as rec:
        _run(tmp_path / "a", recipe_kw={"nan_steps": {5, 6, 7}, "once": True}, on_nan="rollback",
             max_consecutive_nonfinite=3, rollback_lr_factor=0.5, gradient_accumulation_steps=accumulation)
    message = next(str(w.message) for w in rec if "rolled back" in str(w.message))
    assert message.startswith("step 7: 3 consecutive non-finite updates of optimizer 'student'; rolled back to ")
    assert "(step 4) and lowered the learning rate by train.rollback_lr_factor=0.5 to 0.005" in message
    ckpt = read_checkpoint(latest_checkpoint(tmp_path / "a"))
    trainer = ckpt.json("trainer")
    assert trainer["step"] == 12 and trainer["lr_scale"] == 0.5
    assert trainer["rollbacks"] == 1 and trainer["guard"]["total_skipped"] == {"student": 3}
    lrs = {n: ckpt.json("optimizers")["optimizers"][n]["param_groups"][0]["lr"] for n in ("student", "critic")}
    assert lrs == {"student": 0.005, "critic": 0.005}
    events = [line for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"rollback"' in line]
    assert len(events) == 1 and '"failed_at": 7' in events[0]

    # the same as stopping at checkpoint 4 and resuming by hand with train.lr halved
    _run(tmp_path / "b", max_steps=4, gradient_accumulation_steps=accumulation)
    with pytest.warns(UserWarning, match=r"train.lr changed from 0.01 .* to 0.005; every learning rate of the "
                                         r"resumed run is scaled by 0.5"):
        _run(tmp_path / "b", lr=5e-3, gradient_accumulation_steps=accumulation)
    _assert_identical(_tensors(latest_checkpoint(tmp_path / "a")), _tensors(latest_checkpoint(tmp_path / "b")))


def test_rollback_gives_up_after_max_rollbacks(tmp_path):
    with pytest.raises(NonFiniteLossError) as info, pytest.warns(UserWarning, match="rolled back"):
        _run(tmp_path, recipe_kw={"nan_steps": set(range(5, 100))}, on_nan="rollback", max_consecutive_nonfinite=2,
             max_rollbacks=2, rollback_lr_factor=0.1)
    msg = str(info.value)
    assert "stopping at step 6: 2 consecutive updates of optimizer 'student' had a non-finite loss" in msg
    assert "train.on_nan=rollback gave up: the run already rolled back 2 time(s) (train.max_rollbacks=2)" in msg
    assert "lowering the learning rate to 0.0001" in msg
    assert f"The last checkpoint is intact at {tmp_path / 'checkpoints' / 'step-0000004'}" in msg


def test_rollback_without_a_checkpoint_stops(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        _run(tmp_path, recipe_kw={"nan_steps": set(range(100))}, on_nan="rollback", max_consecutive_nonfinite=2)
    msg = str(info.value)
    assert "No checkpoint was written yet" in msg and "no checkpoint was written yet to roll back to" in msg


def test_on_nan_is_validated():
    from stepdistill.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _cfg("x", on_nan="retry")
    assert "train.on_nan: 'retry' is not allowed; allowed values: 'stop', 'rollback'" in str(info.value)
    with pytest.raises(ConfigError) as info:
        _cfg("x", rollback_lr_factor=0.0, max_rollbacks=-1)
    assert "train.rollback_lr_factor: must be in (0, 1], got 0.0" in str(info.value)
    assert "train.max_rollbacks: must be >= 0, got -1" in str(info.value)
