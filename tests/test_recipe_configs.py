"""Every shipped recipe config (recipes/<recipe>/*.yaml) must validate before any model loads, and the multi-stage
recipes' configs must run long enough to reach their last stage (a PD config whose train.max_steps ends inside an
earlier round would export a student with the wrong step count)."""

from pathlib import Path

import pytest

from stepdistill.config import load_config
from stepdistill.recipes.progressive import round_schedule

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "recipes").glob("*/*.yaml") if p.parent.name != "accelerate")


def test_there_are_shipped_configs():
    assert len(CONFIGS) >= 30, [p.name for p in CONFIGS]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_shipped_config_validates(path):
    cfg = load_config(path)
    options = cfg.recipe.options
    if hasattr(options, "validate"):
        options.validate()
    assert cfg.train.max_steps >= 1


@pytest.mark.parametrize("path", [p for p in CONFIGS if p.parent.name in ("pd", "guidance")],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_multi_round_configs_reach_their_last_round(path):
    cfg = load_config(path)
    o = cfg.recipe.options
    rounds = len(round_schedule(o.teacher_steps, o.final_steps))
    last_round_start = getattr(o, "match_steps", 0) + (rounds - 1) * o.steps_per_round
    assert cfg.train.max_steps >= last_round_start + o.steps_per_round, (
        f"{path.name}: train.max_steps={cfg.train.max_steps} ends before the last round (starts at update "
        f"{last_round_start}, {o.steps_per_round} updates per round)")
