"""Multi-process training through accelerate (issue 9, item 1).

``accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2`` (gloo on the CPU here) must give the
same weights as one process consuming the same global batch: 2 processes x accumulation 1 == 1 process x
accumulation 2 (data and noise are indexed by the run-wide micro-batch slot, training/data.py). One DDP subprocess
runs while the single-process references train in this process.

Note: ``accelerate launch --cpu --num_processes 2`` starts ONE process in accelerate 1.x (its simple launcher only
fans out through mpirun), which is why the shipped DDP config is used (docs/distributed.md).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

from stepdistill.config import config_from_dict, load_config
from stepdistill.runner import run_training
from stepdistill.training.checkpoint import latest_checkpoint, read_checkpoint

REPO = Path(__file__).resolve().parents[1]
TOY_LCM = {
    "run": {"seed": 3},
    "teacher": {"path": "toy2d:ring8"},
    "recipe": {"name": "lcm", "variant": "full", "omega": 1.0, "num_ddim_timesteps": 50},
    "data": {"kind": "toy2d", "batch_size": 16},
    "train": {"max_steps": 4, "lr": 1.0e-3, "checkpoint_every": 2, "keep_checkpoints": 0, "log_every": 1,
              "trackers": [], "ema_decay": 0.9},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state(run_dir: Path, step: int | None = None) -> dict:
    path = latest_checkpoint(run_dir) if step is None else run_dir / "checkpoints" / f"step-{step:07d}"
    ckpt = read_checkpoint(path)
    out = {f"{stem}:{k}": v for stem in ("recipe_state", "ema", "optimizers") for k, v in ckpt.tensors(stem).items()}
    return {"tensors": out, "trainer": ckpt.json("trainer"), "files": set(ckpt.files)}


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def _ddp_and_single(tmp: Path, config: dict, singles: dict[str, list[str]]) -> dict:
    """Launch the 2-process DDP run of ``config`` (-> tmp/ddp) while ``singles`` ({dir: overrides}) train here."""
    cfg_file = tmp / "config.yaml"
    cfg_file.write_text(yaml.safe_dump(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env.pop("ACCELERATE_USE_CPU", None)  # the DDP config must work on a GPU-less machine without it
    cmd = [sys.executable, "-m", "accelerate.commands.launch",
           "--config_file", str(REPO / "recipes/accelerate/ddp.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()),
           "-m", "stepdistill", "train", str(cfg_file), f"run.output_dir={tmp / 'ddp'}", "--no-export"]
    proc = subprocess.Popen(cmd, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:  # the single-process runs train meanwhile
        for name, overrides in singles.items():
            run_training(load_config(cfg_file, [f"run.output_dir={tmp / name}", *overrides]), export=False)
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, out[-4000:]
    return {"tmp": tmp, "cfg": cfg_file, "log": out}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    return _ddp_and_single(tmp_path_factory.mktemp("distributed"), TOY_LCM,
                           {"one": ["train.gradient_accumulation_steps=2"], "half": []})


@pytest.mark.slow  # ~20 s of CPU, 60-80 s wall on a loaded 2-core machine (3 interpreters start)
def test_two_processes_equal_one_process_with_the_same_global_batch(runs):
    tmp = runs["tmp"]
    ddp, one, half = _state(tmp / "ddp"), _state(tmp / "one"), _state(tmp / "half")
    # really two processes: each wrote its RNG state, and each consumed 4 micro-batches (8 slots in all)
    assert ddp["trainer"]["num_processes"] == 2, runs["log"][-2000:]
    assert "[stepdistill] distributed: MULTI_CPU over 2 processes" in runs["log"], runs["log"][-2000:]
    assert {"rng_rank0.safetensors", "rng_rank1.safetensors"} <= ddp["files"]
    assert (ddp["trainer"]["step"], ddp["trainer"]["batch_index"]) == (4, 4)
    assert (one["trainer"]["step"], one["trainer"]["batch_index"]) == (4, 8)
    # student, LCM target EMA, evaluation EMA and Adam moments agree to float tolerance (here: bitwise)
    diff = _max_diff(ddp["tensors"], one["tensors"])
    assert diff <= 1e-6, f"2-process run differs from the 1-process run by {diff}"
    for key, value in ddp["tensors"].items():
        torch.testing.assert_close(value, one["tensors"][key], rtol=1e-5, atol=1e-6, msg=key)
    # control: half the global batch (one process, no accumulation) gives clearly different weights
    assert _max_diff(ddp["tensors"], half["tensors"]) > 1e-3


@pytest.mark.slow
def test_a_two_process_checkpoint_resumes_on_one_process(runs):
    """Resuming the 2-process step-2 checkpoint on 1 process (accumulation 2) continues the same slot sequence."""
    tmp = runs["tmp"]
    target = tmp / "elastic" / "checkpoints"
    target.mkdir(parents=True)
    shutil.copytree(tmp / "ddp" / "checkpoints" / "step-0000002", target / "step-0000002")
    run_training(load_config(runs["cfg"], [f"run.output_dir={tmp / 'elastic'}", "train.gradient_accumulation_steps=2"]),
                 export=False)
    resumed, one = _state(tmp / "elastic"), _state(tmp / "one")
    assert resumed["trainer"]["batch_index"] == 8  # 2 processes x 2 micro-batches -> 4 slots, then 4 more
    assert _max_diff(resumed["tensors"], one["tensors"]) <= 1e-6


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for name in ("ddp.yaml", "fsdp.yaml", "deepspeed-zero2.yaml"):
        cfg = load_config_from_file(str(REPO / "recipes/accelerate" / name))
        kinds[name] = str(cfg.distributed_type).rsplit(".", 1)[-1]
    assert kinds == {"ddp.yaml": "MULTI_GPU", "fsdp.yaml": "FSDP", "deepspeed-zero2.yaml": "DEEPSPEED"}
    ds = yaml.safe_load((REPO / "recipes/accelerate/deepspeed-zero2.yaml").read_text())
    assert ds["deepspeed_config"]["zero_stage"] == 2


def test_deepspeed_refuses_recipes_with_several_networks(tmp_path):
    """DeepSpeed wraps one model per engine; a recipe training a student and a critic is refused with the reason."""
    from accelerate.utils import DistributedType

    from stepdistill.training.loop import _Trainer

    class TwoNets:
        name = "two_nets"

        def trainable_modules(self):
            return {"student": torch.nn.Linear(2, 2), "fake_score": torch.nn.Linear(2, 2)}

    cfg = config_from_dict({"recipe": {"name": "lcm"}, "run": {"output_dir": str(tmp_path)}})
    trainer = _Trainer(cfg, TwoNets(), None)
    trainer.accelerator = SimpleNamespace(distributed_type=DistributedType.DEEPSPEED)
    with pytest.raises(RuntimeError) as info:
        trainer._check_distributed_support()
    msg = str(info.value)
    assert "trains 2 networks (student, fake_score)" in msg and "one model per engine" in msg
    assert "recipes/accelerate/ddp.yaml" in msg and "docs/distributed.md" in msg
    trainer.accelerator = SimpleNamespace(distributed_type=DistributedType.MULTI_GPU)
    trainer._check_distributed_support()  # DDP takes any number of networks


def test_processes_that_accelerate_did_not_connect_are_stopped(tmp_path, monkeypatch):
    """Launched as 2 processes but accelerate saw 1 (e.g. no ACCELERATE_USE_CPU on an old launcher): refuse, instead
    of letting two independent runs overwrite one run dir."""
    from stepdistill.training import loop
    from stepdistill.training.data import step_indexed

    monkeypatch.setattr(loop, "_launched_world_size", lambda: 2)
    cfg = config_from_dict({"recipe": {"name": "lcm"}, "run": {"output_dir": str(tmp_path)},
                            "train": {"trackers": []}})
    with pytest.raises(RuntimeError) as info:
        loop.train(cfg, SimpleNamespace(name="x"), step_indexed(lambda k, g: {}))
    msg = str(info.value)
    assert "launched as one of 2 (WORLD_SIZE=2) but accelerate set up 1 process(es)" in msg
    assert "ACCELERATE_USE_CPU=1" in msg and "recipes/accelerate/ddp.yaml" in msg


@pytest.mark.slow  # one more DDP launch
def test_dmd2_student_fake_score_and_gan_head_under_ddp(tmp_path):
    """The multi-network recipe: student, fake score and discriminator head, each its own DDP module, with DMD2's
    uneven update schedule (losses for a subset of the optimizers on some steps)."""
    config = {"run": {"seed": 1}, "teacher": {"path": "toy2d:ring8"}, "recipe": {"name": "dmd2"},
              "data": {"kind": "toy2d", "batch_size": 8},
              "train": {"max_steps": 3, "trackers": [], "ema_decay": 0.5, "checkpoint_every": 0, "log_every": 1}}
    runs = _ddp_and_single(tmp_path, config, {"one": ["train.gradient_accumulation_steps=2"]})
    ddp, one = _state(tmp_path / "ddp"), _state(tmp_path / "one")
    assert ddp["trainer"]["num_processes"] == 2, runs["log"][-2000:]
    groups = {k.split(":")[1].split(".")[0] for k in ddp["tensors"] if k.startswith("recipe_state:")}
    assert {"student", "fake_score"} <= groups
    assert {k.split("/")[1] for k in ddp["tensors"] if k.startswith("optimizers:optimizers/")} >= {"student",
                                                                                                   "fake_score"}
    diff = _max_diff(ddp["tensors"], one["tensors"])
    assert diff <= 1e-6, f"2-process DMD2 differs from the 1-process run by {diff}"
