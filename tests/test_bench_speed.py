"""`stepdistill bench speed`: JSON schema and consistency on the tiny SD pipeline, the call recorder, and errors."""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from stepdistill.benchmarks.speed.bench import constant_calls
from stepdistill.benchmarks.speed.recorder import CallRecorder
from stepdistill.benchmarks.speed.replay import CallReplay
from stepdistill.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def lcm_result(tmp_path_factory):
    out = tmp_path_factory.mktemp("speed") / "speed-lcm-tiny-sd.json"
    rc = main(["bench", "speed", "--recipe", "lcm", "--model", "tiny:sd", "--config",
               str(ROOT / "recipes/lcm/tiny-sd.yaml"), "--batch-size", "1", "--repeats", "2", "--warmup", "0",
               "--student-steps", "1,2", "--teacher-steps", "3", "--json", str(out)])
    assert rc == 0
    return out, json.loads(out.read_text())


def test_schema_and_environment(lcm_result):
    _, r = lcm_result
    for key in ("recipe", "model", "device", "threads", "torch", "batch_size", "calls", "optimizer_steps", "step",
                "sum_of_calls_s", "overhead_ratio", "unavoidable_definition", "memory", "sampling", "command"):
        assert key in r, key
    assert (r["bench"], r["recipe"], r["model"], r["device"]) == ("speed", "lcm", "tiny:sd", "cpu")
    assert r["threads"] == 1 and r["batch_size"] == 1 and r["torch"] == torch.__version__
    assert len(r["step"]["samples_s"]) == 2
    assert "peak RSS" in r["memory"]["method"] and r["memory"]["delta_bytes"] >= 0
    assert r["command"].startswith("stepdistill bench speed --recipe lcm --model tiny:sd")


def test_lcm_calls_are_the_expected_networks(lcm_result):
    _, r = lcm_result
    calls = {(c["network"], c["method"]): c for c in r["calls"]}
    student, teacher = calls[("student", "forward")], calls[("teacher", "forward")]
    target = calls[("target", "forward")]
    # the student is the only call back-propagated, into all of its trainable parameters
    assert student["grad_enabled"] and student["backward"] and student["backward_s"] > 0
    assert student["param_grads"] == r["optimizer_steps"][0]["params"] > 0
    assert [c["network"] for c in r["calls"] if c["backward"]] == ["student"]
    # the teacher runs once, with batched CFG (2x the batch), under no_grad; the EMA target under no_grad
    assert [c["network"] for c in r["calls"]].count("teacher") == 1
    assert teacher["batch_size"] == 2 * r["batch_size"] and not teacher["grad_enabled"] and not teacher["backward"]
    assert not target["grad_enabled"] and not target["backward"]
    assert ("vae", "encode") in calls and not calls[("vae", "encode")]["constant_inputs"]  # images are VAE-encoded
    # prompt embeddings are cached by the teacher's ConditionEncoder, so the recorded update (not the first) makes no
    # text-encoder call at all; every recorded call is needed and counted
    assert "text_encoder" in r["networks"] and all(c["network"] != "text_encoder" for c in r["calls"])
    assert all(c["counted"] and not c["constant_inputs"] for c in r["calls"])
    assert [o["optimizer"] for o in r["optimizer_steps"]] == ["student"] == r["step"]["optimizers_stepped"]
    assert any(n["what"] == "recipe.after_optimizer_step(student)" for n in r["not_counted"])  # target EMA


def test_ratios_are_consistent_with_the_times(lcm_result):
    _, r = lcm_result
    for c in r["calls"]:
        assert c["forward_s"] > 0 and math.isclose(c["total_s"], c["forward_s"] + c["backward_s"], rel_tol=1e-9)
    calls = sum(c["total_s"] for c in r["calls"] if c["counted"])
    opts = sum(o["step_s"] for o in r["optimizer_steps"])
    assert math.isclose(r["sum_of_calls_s"], calls + opts, rel_tol=1e-9)
    assert math.isclose(r["overhead_ratio"], r["step"]["median_s"] / r["sum_of_calls_s"], rel_tol=1e-9)
    assert math.isfinite(r["overhead_ratio"]) and r["overhead_ratio"] > 0
    assert r["meets_overhead_target"] == (r["overhead_ratio"] <= r["overhead_target"])
    rounds = r["overhead_ratio_per_round"]
    assert len(rounds) == len(r["step"]["samples_s"]) == 2 and all(math.isfinite(x) and x > 0 for x in rounds)
    assert min(rounds) <= r["overhead_ratio_round_median"] <= max(rounds)
    s = r["sampling"]
    teacher = [row for row in s["rows"] if row["model"] == "teacher"]
    students = {row["steps"]: row for row in s["rows"] if row["model"] == "student"}
    assert len(teacher) == 1 and sorted(students) == [1, 2]
    assert teacher[0]["nfe_per_image"] == 2 * 3  # 3 steps with batched CFG
    assert students[1]["nfe_per_image"] == 1 and students[2]["nfe_per_image"] == 2
    assert s["student_source"].startswith("fresh")
    for row in students.values():
        assert math.isfinite(row["speedup_vs_teacher"]) and row["speedup_vs_teacher"] > 0
        assert math.isclose(row["speedup_vs_teacher"], teacher[0]["sec_per_image"] / row["sec_per_image"],
                            rel_tol=1e-9)
        assert "meets_target" in row if row["steps"] == 1 else "meets_target" not in row


def test_write_results_renders_the_speed_section(lcm_result, tmp_path):
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import write_results
    finally:
        sys.path.pop(0)
    path, _ = lcm_result
    results = tmp_path / "results"
    results.mkdir()
    (results / path.name).write_text(path.read_text())
    text = write_results.render(results, tmp_path / "RESULTS.md", tmp_path / "fig.png")
    assert "## Speed" in text and "| lcm (full) | tiny:sd | cpu | 1 | 1 |" in text and "student.forward" in text
    assert "stepdistill bench speed --recipe lcm" in text  # the command is quoted


class _Acc:
    """The one accelerator method the recorder intercepts."""

    def backward(self, loss, **kwargs):
        loss.backward(**kwargs)


def test_recorder_records_and_replays_jvp_and_backward_calls():
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
    frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    x, v = torch.randn(3, 4), torch.randn(3, 4)
    acc = _Acc()
    with CallRecorder({"net": net, "frozen": frozen}, acc) as rec:
        with torch.no_grad():
            torch.func.jvp(lambda a: net(a), (x,), (v,))
            target = frozen(x)
        loss = ((net(x * 2) - target) ** 2).mean()
        acc.backward(loss, inputs=list(net.parameters()))
    assert "backward" not in vars(acc)  # the interception is undone
    jvp_call, frozen_call, grad_call = rec.calls
    assert jvp_call.kind == "jvp" and not jvp_call.got_grad and torch.equal(jvp_call.duals[0], x)
    assert frozen_call.network == "frozen" and not frozen_call.grad_enabled and not frozen_call.got_grad
    assert grad_call.kind == "forward" and grad_call.grad_enabled and grad_call.got_grad
    replay = CallReplay(grad_call, net, contextlib.nullcontext)
    assert replay.needs_backward and replay.params == list(net.parameters()) and replay.inputs == []
    before = [p.grad.clone() for p in net.parameters()]
    replay.forward_backward()
    assert all(torch.equal(a, p.grad) for a, p in zip(before, net.parameters()))  # nothing accumulated
    assert not CallReplay(frozen_call, frozen, contextlib.nullcontext).needs_backward
    CallReplay(jvp_call, net, contextlib.nullcontext).forward()  # the jvp runs alone


def test_constant_calls_are_flagged_avoidable():
    """A frozen network called without grad on bitwise the same input in two updates (e.g. the empty negative
    prompt's text encoding) is avoidable; the same network on changing inputs, or a trained one, is not."""
    encoder, student = torch.nn.Linear(4, 4).requires_grad_(False), torch.nn.Linear(4, 4)
    nets = {"encoder": encoder, "student": student}
    constant, recordings = torch.ones(2, 4), []
    for _ in range(2):
        with CallRecorder(nets) as rec, torch.no_grad():
            encoder(constant)
            encoder(torch.randn(2, 4))
            student(constant)
        recordings.append(rec.calls)
    trained = {id(p) for p in student.parameters()}
    assert constant_calls(*recordings, nets, trained) == {0}


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "lcmm", "--model", "tiny:sd"], "unknown recipe 'lcmm'; did you mean 'lcm'?"),
    (["--recipe", "lcm", "--model", "/nonexistent/teacher"], "--model /nonexistent/teacher: no such folder"),
    (["--recipe", "lcm"], "bench speed needs --model"),
])
def test_bad_input_gives_a_clear_error(argv, message, capsys):
    assert main(["bench", "speed", *argv, "--no-sampling"]) == 2
    assert message in capsys.readouterr().err
