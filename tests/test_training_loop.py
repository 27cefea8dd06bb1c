"""The shared training loop on a tiny two-optimizer recipe: exact resume (in-process and after SIGKILL), the NaN
guard, EMA sample grids, per-optimizer gradients, and the step-indexed data helpers.

Run as a script (``python tests/test_training_loop.py RUN_DIR KILL_AT``) it is the child process of the SIGKILL test.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from stepdistill.config import config_from_dict
from stepdistill.recipes.base import Recipe, StepOutput, register_recipe
from stepdistill.recipes.common import update_target_ema
from stepdistill.training import EMA, NonFiniteLossError, read_checkpoint, seed_everything, step_indexed, train
from stepdistill.training.checkpoint import latest_checkpoint, verify_checkpoint
from stepdistill.training.data import DataStart, StepIndexedBatchSampler, StepIndexedIterator
from stepdistill.training.loop import resolve_resume, save_sample_grid

SEED = 7


@register_recipe("tiny_loop_test")
class TinyRecipe(Recipe):
    """Regression MLP ("student", with dropout and a target EMA) plus a "critic" stepped on even steps only."""

    def __init__(self, nan_steps=(), kill_at: int | None = None, critic_sees_student: bool = False):
        self.student = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.2), nn.Linear(16, 1))
        self.critic = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 1))
        self.target = copy.deepcopy(self.student).requires_grad_(False)
        self.prepared: dict[str, nn.Module] = {}
        self.nan_steps, self.kill_at, self.critic_sees_student = set(nan_steps), kill_at, critic_sees_student
        self.weights_at_step: dict[int, torch.Tensor] = {}
        self.sampled_weights: list[torch.Tensor] = []

    def trainable_modules(self):
        return {"student": self.student, "critic": self.critic}

    def set_prepared(self, name, module):
        self.prepared[name] = module

    def training_step(self, batch, step, generator):
        if step == self.kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        self.weights_at_step.setdefault(step, self.student[0].weight.detach().clone())
        x = batch["x"] + 0.01 * torch.randn(batch["x"].shape, generator=generator)
        pred = self.prepared["student"](x)
        loss = F.mse_loss(pred, batch["y"])
        if step in self.nan_steps:
            loss = loss * float("nan")
        losses = {"student": loss}
        if step % 2 == 0:
            seen = pred if self.critic_sees_student else pred.detach()
            losses["critic"] = F.mse_loss(self.prepared["critic"](torch.cat([x[:, :1], seen], 1)), batch["y"])
        return StepOutput(losses, logs={"pred_mean": pred.detach().mean(), "const": 1.0})

    def after_optimizer_step(self, name, step):
        if name == "student":
            update_target_ema(self.target, self.student, 0.9)

    def state_dict_for_checkpoint(self):
        return {"student": self.student.state_dict(), "critic": self.critic.state_dict(),
                "target": self.target.state_dict()}

    def load_state_dict_from_checkpoint(self, state):
        self.student.load_state_dict(state["student"])
        self.critic.load_state_dict(state["critic"])
        self.target.load_state_dict(state["target"])

    @torch.no_grad()
    def sample(self, num, generator, **kw):
        self.sampled_weights.append(self.student[0].weight.detach().clone())
        v = torch.tanh(self.student(torch.randn(num, 2, generator=generator)))
        return v.view(num, 1, 1, 1).expand(num, 1, 4, 4)


def _batch(k: int, g: torch.Generator) -> dict:
    x = torch.randn(8, 2, generator=g)
    return {"x": x, "y": torch.sin(2 * x[:, :1]) + 0.5 * x[:, 1:] ** 2}


def _cfg(run_dir, **train):
    opts = dict(max_steps=12, lr=1e-2, lr_scheduler="constant", warmup_steps=6, gradient_accumulation_steps=2,
                ema_decay=0.8, checkpoint_every=4, keep_checkpoints=2, log_every=2, trackers=[])
    opts.update(train)
    return config_from_dict({"run": {"output_dir": str(run_dir), "seed": SEED},
                             "recipe": {"name": "tiny_loop_test"}, "data": {"batch_size": 8}, "train": opts})


def _run(run_dir, recipe_kw=None, **train_opts):
    seed_everything(SEED)
    recipe = TinyRecipe(**(recipe_kw or {}))
    train(_cfg(run_dir, **train_opts), recipe, step_indexed(_batch))
    return recipe


def _final_state(run_dir) -> dict[str, torch.Tensor]:
    ckpt = read_checkpoint(latest_checkpoint(run_dir))
    out = {}
    for stem in ("recipe_state", "ema", "optimizers"):
        out.update({f"{stem}:{k}": v for k, v in ckpt.tensors(stem).items()})
    out["step"] = torch.tensor(ckpt.step)
    out["optimizers.json"] = ckpt.json("optimizers")
    return out


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), f"{key} differs"
        else:
            assert a[key] == b[key], f"{key} differs"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """An uninterrupted 12-step run."""
    run_dir = tmp_path_factory.mktemp("reference")
    _run(run_dir)
    return _final_state(run_dir)


def test_reference_run_trains(reference, tmp_path_factory):
    assert int(reference["step"]) == 12
    assert all(torch.isfinite(v).all() for k, v in reference.items() if isinstance(v, torch.Tensor))
    # the student moved, its target EMA lags behind, and the evaluation EMA differs from both
    student = reference["recipe_state:student.0.weight"]
    assert not torch.equal(student, reference["recipe_state:target.0.weight"])
    assert not torch.equal(student, reference["ema:student.0.weight"])
    # critic is stepped on even steps only: 6 of 12 updates; student on all 12
    skel = reference["optimizers.json"]
    step_keys = {k for k in reference if k.startswith("optimizers:optimizers/") and k.endswith("/step")}
    steps = {k.split("/")[1]: int(reference[k]) for k in step_keys}
    assert steps == {"student": 12, "critic": 6}
    # lr schedules follow the loop step, also for the critic that updates every other step
    assert skel["schedulers"]["student"]["last_epoch"] == skel["schedulers"]["critic"]["last_epoch"] == 12


def test_resume_refuses_a_changed_recipe_or_teacher(tmp_path):
    """A run folder whose recipe.* / teacher.* settings differ from the new config is not resumed (that would mix two
    runs: a PD run restarted with another teacher_steps once resumed at round 2); its checkpoints stay untouched."""
    import yaml

    _run(tmp_path, max_steps=4)
    path = tmp_path / "config.yaml"
    for section, key, value in (("recipe", "teacher_steps", 16), ("teacher", "path", "digits:dit")):
        raw = yaml.safe_load(path.read_text())
        saved = copy.deepcopy(raw)
        raw.setdefault(section, {})[key] = value
        path.write_text(yaml.safe_dump(raw))
        before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
        with pytest.raises(ValueError, match=rf"{section}\.{key} differ.*new run\.output_dir"):
            _run(tmp_path, max_steps=8)
        assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before == ["step-0000004"]
        path.write_text(yaml.safe_dump(saved))
    raw = yaml.safe_load(path.read_text())
    raw["recipe"]["sample_steps"] = 99  # preview-grid settings may change
    path.write_text(yaml.safe_dump(raw))
    with pytest.warns(UserWarning, match="recipe.sample_steps"):
        _run(tmp_path, max_steps=8)
    assert latest_checkpoint(tmp_path).name == "step-0000008"


def test_exact_resume_in_process(reference, tmp_path):
    _run(tmp_path, max_steps=8)  # "interrupted": stops (and checkpoints) at step 8
    assert latest_checkpoint(tmp_path).name == "step-0000008"
    with pytest.warns(UserWarning, match=r"with a changed config: train.max_steps: 8 -> 12"):
        _run(tmp_path, max_steps=12)  # run.resume=auto continues from step 8
    _assert_bitwise_equal(_final_state(tmp_path), reference)
    # keep_checkpoints=2 and metrics from both sessions in order
    assert [p.name for p in sorted((tmp_path / "checkpoints").iterdir())] == ["step-0000008", "step-0000012"]
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (tmp_path / "metrics.jsonl").read_text().split("\n")
             if line]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_exact_resume_after_sigkill(reference, tmp_path):
    env = dict(os.environ, TINY_THREADS=str(torch.get_num_threads()))
    proc = subprocess.run([sys.executable, __file__, str(tmp_path), "6"], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert latest_checkpoint(tmp_path).name == "step-0000004"  # killed during step 6, after checkpoint 4
    _run(tmp_path)
    _assert_bitwise_equal(_final_state(tmp_path), reference)


def test_nan_guard_skips_the_update(tmp_path):
    recipe = _run(tmp_path, recipe_kw={"nan_steps": {3}}, max_steps=6, ema_decay=0.0)
    w = recipe.weights_at_step
    assert torch.equal(w[3], w[4])  # the NaN update at step 3 changed nothing
    assert not torch.equal(w[2], w[3]) and not torch.equal(w[4], w[5])
    ckpt = read_checkpoint(latest_checkpoint(tmp_path))
    assert ckpt.json("trainer")["guard"] == {"consecutive": {"student": 0, "critic": 0},
                                             "total_skipped": {"student": 1}}
    opt = ckpt.tensors("optimizers")
    assert int(opt["optimizers/student/state/0/step"]) == 5  # Adam never saw the skipped update
    assert all(torch.isfinite(t).all() for t in ckpt.tensors("recipe_state").values())
    last = (tmp_path / "metrics.jsonl").read_text().strip().split("\n")[-1]
    assert '"skipped/student": 1' in last


def test_nan_guard_stops_with_a_clear_message(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        _run(tmp_path, recipe_kw={"nan_steps": set(range(5, 100))}, max_steps=20, checkpoint_every=2,
             max_consecutive_nonfinite=3, keep_checkpoints=0)
    msg = str(info.value)
    last = tmp_path / "checkpoints" / "step-0000006"
    assert "stopping at step 7: 3 consecutive updates of optimizer 'student' had a non-finite loss" in msg
    assert f"The last checkpoint is intact at {last}" in msg
    assert "train.lr=0.001 (currently 0.01)" in msg and "run.resume=auto" in msg
    verify_checkpoint(last)
    assert latest_checkpoint(tmp_path) == last


def test_sample_grids_use_the_ema_weights(tmp_path):
    recipe = _run(tmp_path, max_steps=4, sample_every=2, checkpoint_every=4)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["step-0000002.png", "step-0000004.png"]
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "step-0000004")
    ema_w = ckpt.tensors("ema")["student.0.weight"]
    live_w = ckpt.tensors("recipe_state")["student.0.weight"]
    assert torch.equal(recipe.sampled_weights[-1], ema_w)  # sampled under the EMA weights
    assert torch.equal(recipe.student[0].weight.detach(), live_w)  # and the training weights came back
    assert not torch.equal(ema_w, live_w)
    assert recipe.student.training  # train mode restored after sampling


def test_each_loss_only_reaches_its_own_optimizer(tmp_path):
    detached = _run(tmp_path / "a", max_steps=3, ema_decay=0.0, gradient_accumulation_steps=1)
    attached = _run(tmp_path / "b", recipe_kw={"critic_sees_student": True}, max_steps=3, ema_decay=0.0,
                    gradient_accumulation_steps=1)
    # the critic loss back-propagates into the student's graph, yet the student's updates are unchanged
    assert torch.equal(detached.student[0].weight, attached.student[0].weight)
    assert torch.equal(detached.critic[0].weight, attached.critic[0].weight)


def test_resume_never_refuses_a_used_run_dir(tmp_path):
    _run(tmp_path, max_steps=2, ema_decay=0.0)
    cfg = config_from_dict({"run": {"output_dir": str(tmp_path), "resume": "never"},
                            "recipe": {"name": "tiny_loop_test"}})
    with pytest.raises(RuntimeError, match="run.resume=never, but .* already has checkpoints"):
        resolve_resume(cfg)


# ------------------------------------------------------------------------------------------------ components
def test_ema_update_swap_and_state():
    net = nn.Linear(3, 2)
    ema = EMA({"student": net}, decay=0.9)
    before = {k: v.clone() for k, v in ema.shadow["student"].items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    ema.update()
    torch.testing.assert_close(ema.shadow["student"]["weight"], 0.9 * before["weight"] + 0.1 * net.weight)
    torch.testing.assert_close(ema.shadow["student"]["bias"], before["bias"])
    live = net.weight.detach().clone()
    with ema.swapped_in():
        assert torch.equal(net.weight, ema.shadow["student"]["weight"])
    assert torch.equal(net.weight, live)
    other = EMA({"student": nn.Linear(3, 2)}, decay=0.9)
    other.load_state_dict(ema.state_dict())
    assert torch.equal(other.shadow["student"]["weight"], ema.shadow["student"]["weight"])
    with pytest.raises(KeyError, match="missing"):
        other.load_state_dict({"student.weight": torch.zeros(2, 3)})


def test_step_indexed_iterators_resume_anywhere():
    full = StepIndexedIterator(_batch, DataStart(0, seed=1))
    batches = [next(full) for _ in range(5)]
    late = StepIndexedIterator(_batch, DataStart(3, seed=1))
    assert torch.equal(next(late)["x"], batches[3]["x"])
    other_rank = StepIndexedIterator(_batch, DataStart(0, seed=1, rank=1))
    assert not torch.equal(next(other_rank)["x"], batches[0]["x"])


def test_batch_sampler_is_resumable_and_ranks_are_disjoint():
    def take(start, n):
        it = iter(StepIndexedBatchSampler(20, 3, start))
        return [next(it) for _ in range(n)]

    r0 = take(DataStart(0, seed=5, rank=0, num_processes=2), 6)
    r1 = take(DataStart(0, seed=5, rank=1, num_processes=2), 6)
    epoch0 = [i for b in r0[:3] + r1[:3] for i in b]  # 20 // (3 * 2) = 3 batches per epoch
    assert len(set(epoch0)) == 18
    assert take(DataStart(4, seed=5, rank=0, num_processes=2), 2) == r0[4:6]
    assert r0[:3] != r0[3:6]  # a fresh permutation each epoch
    with pytest.raises(ValueError, match="fewer than batch_size x processes"):
        StepIndexedBatchSampler(5, 3, DataStart(num_processes=2))


def test_builtin_data_kinds_are_step_indexed(tmp_path):
    from PIL import Image

    from stepdistill.config import DataSection
    from stepdistill.training import build_data_factory

    (tmp_path / "p.txt").write_text("a cat\n\na dog\n")
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (12, 10), (40 * i, 0, 0)).save(folder / f"{i}.png")
    (folder / "0.txt").write_text("red-ish")
    kinds = {
        "prompts": DataSection(kind="prompts", path=str(tmp_path / "p.txt"), batch_size=3),
        "random_images": DataSection(kind="random_images", resolution=4, channels=1, batch_size=2),
        "image_folder": DataSection(kind="image_folder", path=str(folder), resolution=8, batch_size=2,
                                    random_flip=True),
        "digits": DataSection(kind="digits", batch_size=4, conditioning="class"),
    }
    for kind, data in kinds.items():
        factory = build_data_factory(data)
        it = iter(factory(DataStart(0, seed=3)))
        first = [next(it) for _ in range(3)]
        resumed = next(iter(factory(DataStart(2, seed=3))))
        assert first[2].keys() == resumed.keys(), kind
        for key, value in resumed.items():
            same = torch.equal(value, first[2][key]) if torch.is_tensor(value) else value == first[2][key]
            assert same, (kind, key)
    assert set(first[0]) == {"images", "labels", "prompts", "conditions"} and first[0]["images"].shape == (4, 1, 16, 16)
    assert torch.equal(first[0]["conditions"], first[0]["labels"])
    img = next(iter(build_data_factory(kinds["image_folder"])(DataStart(0))))
    assert img["images"].shape == (2, 3, 8, 8) and img["images"].min() >= -1 and img["images"].max() <= 1
    prompts = next(iter(build_data_factory(kinds["prompts"])(DataStart(0))))["conditions"]
    assert len(prompts) == 3 and set(prompts) <= {"a cat", "a dog"}
    with pytest.raises(ValueError, match="data.kind 'nonexistent' has no data builder"):
        build_data_factory(DataSection(kind="nonexistent"))


def test_scatter_grid_for_points(tmp_path):
    save_sample_grid(torch.randn(100, 2), tmp_path / "s.png")
    assert (tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="expected"):
        save_sample_grid(torch.randn(4, 5, 8, 8), tmp_path / "bad.png")


if __name__ == "__main__":  # child of test_exact_resume_after_sigkill
    torch.set_num_threads(int(os.environ.get("TINY_THREADS", "1")))
    _run(Path(sys.argv[1]), recipe_kw={"kill_at": int(sys.argv[2])})
