"""``stepdistill bench toy2d``: the generic distill-and-score harness (stepdistill.benchmarks.toy2d.bench)."""

import json

import pytest
import torch

from stepdistill.benchmarks.toy2d import bench
from stepdistill.benchmarks.toy2d.mixture import load_mixture
from stepdistill.cli import main

_TOP_KEYS = {"recipe", "mixture", "guidance_scale", "train_steps", "train_seconds", "sw2_floor", "results", "steps",
             "sw2", "sw2_ratio", "passes_3x", "mode_weight_err", "n", "num_projections", "w", "seconds"}
_ROW_KEYS = {"steps", "nfe", "sw2", "sw2_ratio", "sw2_floor", "mmd", "mode_weight_err", "paired_error", "passes_3x"}


def test_cli_bench_tiny_run_writes_the_json(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEFAULT_N", 400)  # small sets: this checks plumbing, not quality
    out = tmp_path / "res" / "toy.json"
    rc = main(["bench", "toy2d", "--recipe", "lcm", "--mixture", "ring8", "--steps", "1,4", "--train-steps", "10",
               "--set", "guidance_scale=1.5", "--set", "recipe.target_ema_decay=0.9", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    assert _TOP_KEYS <= set(result)
    assert result["recipe"] == "lcm" and result["mixture"] == "ring8" and result["train_steps"] == 10
    # --set reaches the run (it was once parsed and silently dropped) and is part of the reproducing command
    assert result["n"] == 400 and result["num_projections"] == 256 and result["guidance_scale"] == 1.5
    assert result["options"]["target_ema_decay"] == 0.9 and "--set guidance_scale=1.5" in result["command"]
    assert [r["steps"] for r in result["results"]] == [1, 4] and result["steps"] == 4
    for row in result["results"]:
        assert _ROW_KEYS <= set(row)
        assert row["nfe"] == row["steps"]  # LCM: one student evaluation per step (guidance is embedded)
        assert row["sw2_ratio"] == pytest.approx(row["sw2"] / result["sw2_floor"])
        assert row["passes_3x"] == (row["sw2_ratio"] <= 3.0)
        assert row["paired_error"] is not None and row["paired_error"] > 0
    assert result["sw2"] == result["results"][-1]["sw2"]
    assert result["sw2_floor"] > 0


def test_mixture_file_is_accepted(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "DEFAULT_N", 200)
    path = load_mixture("ring8").conditional(0).to_json(tmp_path / "two.json")
    result = bench.run_toy2d_bench("lcm", str(path), steps=[1], train_steps=5)
    assert result["mixture_source"] == str(path) and result["results"][0]["steps"] == 1


@pytest.mark.parametrize("argv, needle", [
    (["--recipe", "nosuchrecipe"], "unknown recipe 'nosuchrecipe'"),
    (["--recipe", "lcm", "--mixture", "/nonexistent/mix.json"], "unknown mixture"),
    (["--recipe", "lcm", "--set", "no_such_key=1"], "unknown toy2d bench override 'no_such_key'"),
])
def test_cli_bench_bad_input_is_a_clear_error(argv, needle, capsys):
    assert main(["bench", "toy2d", *argv, "--train-steps", "1"]) == 2
    assert needle in capsys.readouterr().err


def test_cli_bench_malformed_mixture_file(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"means": [[0, 0]], "stds": [0.1], "weights": [0.5]}))
    assert main(["bench", "toy2d", "--recipe", "lcm", "--mixture", str(bad), "--train-steps", "1"]) == 2
    assert "sum to" in capsys.readouterr().err


def test_toy_settings_route_overrides_and_reject_unknown_keys():
    s = bench.toy_settings("lcm", {"omega": 1.0, "lr": 3e-4, "train.max_steps": 7, "batch_size": 64, "n": 10})
    assert s["recipe"]["omega"] == 1.0 and s["train"]["lr"] == 3e-4 and s["train"]["max_steps"] == 7
    assert s["batch_size"] == 64 and s["n"] == 10
    assert bench.TOY_DEFAULTS["lcm"]["train"]["max_steps"] != 7  # the defaults are not mutated
    with pytest.raises(ValueError, match="unknown toy2d bench override 'colour'"):
        bench.toy_settings("lcm", {"colour": 1})


def test_class_weights_sum_component_weights_per_class():
    mix = load_mixture("ring8")
    torch.testing.assert_close(bench.class_weights(mix), torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64))
    assert bench.reference_grid(bench.toy_teacher_bundle(mix).denoiser.process).tolist()[:2] == [999.0, 998.0]
