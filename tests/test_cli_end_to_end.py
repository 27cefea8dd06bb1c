"""Issue 2 acceptance: `stepdistill train` on a tiny recipe, then `stepdistill export`, then a separate process with
only diffusers + torch loads the folder with DiffusionPipeline.from_pretrained and samples in 4 steps."""

import subprocess
import sys
from pathlib import Path

import pytest

from stepdistill.testing.stock_load import load_and_sample_in_fresh_process

REPO = Path(__file__).resolve().parents[1]


def _cli(*args, cwd):
    proc = subprocess.run([sys.executable, "-m", "stepdistill", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600)
    return proc


@pytest.mark.parametrize("config", ["tiny-sd.yaml", "tiny-sd-lora.yaml"])
def test_train_export_and_load_in_stock_diffusers(config, tmp_path):
    run_dir = tmp_path / "run"
    proc = _cli("train", str(REPO / "recipes/lcm" / config), f"run.output_dir={run_dir}", "--no-export", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "step-0000004" / "manifest.json").is_file()
    out = tmp_path / "student"
    proc = _cli("export", str(run_dir), str(out), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = load_and_sample_in_fresh_process(out, {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["stepdistill_imported"] is False
    assert summary["timesteps"] == [999, 759, 499, 259]
    assert summary["shape"] == [1, 32, 32, 3] and summary["finite"]
    assert summary["lora"] == ("lora" in config)
    # a sampling option changed at export time only: the same weights, sampled from timestep 700
    out700 = tmp_path / "student-700"
    proc = _cli("export", str(run_dir), str(out700), "recipe.sample_max_timestep=700", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = load_and_sample_in_fresh_process(out700, {"prompt": ["a cat"], "height": 32, "width": 32})
    assert summary["timesteps"] == [700, 525, 350, 175], summary


def test_bad_config_key_is_reported_with_suggestion(tmp_path):
    proc = _cli("train", str(REPO / "recipes/lcm/tiny-sd.yaml"), "train.lrr=1", cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown key 'lrr'" in proc.stderr and "did you mean 'lr'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_teacher_folder_is_reported(tmp_path):
    proc = _cli("train", str(REPO / "recipes/lcm/tiny-sd.yaml"), f"teacher.path={tmp_path / 'nope'}",
                f"run.output_dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and "model_index.json" in proc.stderr


def test_sample_grid_without_sample_conditions_uses_the_training_conditions(tmp_path):
    """With ``recipe.sample_conditions`` empty the grid uses the first batch's conditions, and the checkpoint of the
    same step is written before the grid (a failing grid must never cost a finished checkpoint)."""
    text = (REPO / "recipes/lcm/tiny-sd.yaml").read_text()
    assert ', sample_conditions: ["a cat", "a dog"]' in text
    cfg = tmp_path / "no-conditions.yaml"
    cfg.write_text(text.replace(', sample_conditions: ["a cat", "a dog"]', ""))
    run_dir = tmp_path / "run"
    proc = _cli("train", str(cfg), f"run.output_dir={run_dir}", "train.max_steps=2", "train.sample_every=2",
                "train.sample_num=2", "--no-export", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "samples" / "step-0000002.png").is_file()
    assert (run_dir / "checkpoints" / "step-0000002" / "manifest.json").is_file()
