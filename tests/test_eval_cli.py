"""`stepdistill eval` on a tiny exported LCM student (tiny random SD teacher, a classifier built here)."""

import json
from pathlib import Path

import pytest
import torch

from stepdistill.cli import main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    """The LCM recipe on tiny:sd exported without training (its export path is what is under test here)."""
    from stepdistill.config import load_config
    from stepdistill.runner import build_recipe

    torch.manual_seed(0)
    cfg = load_config(REPO / "recipes/lcm/tiny-sd.yaml")
    recipe = build_recipe(cfg, device="cpu")
    return Path(recipe.export(tmp_path_factory.mktemp("students") / "lcm-tiny"))


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    from stepdistill.benchmarks.digits.classifier import DigitClassifier, save_classifier

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("clf")
    save_classifier(DigitClassifier().eval(), folder, {"note": "random, test only"})
    return folder


def test_export_records_teacher(student_dir):
    spec = json.loads((student_dir / "stepdistill_sampling.json").read_text())
    assert spec["recipe"] == "lcm" and spec["extra"]["teacher"]
    assert (Path(spec["extra"]["teacher"]) / "model_index.json").is_file()


def test_eval_writes_json_rows_and_grids(student_dir, classifier_dir, tmp_path, capsys):
    out = tmp_path / "res" / "digits-lcm.json"
    rc = main(["eval", str(student_dir), "--suite", "digits", "--steps", "1,2", "--num-samples", "10",
               "--teacher-steps", "3", "--batch-size", "5", "--classifier", str(classifier_dir), "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["suite"] == "digits" and res["model"] == str(student_dir) and res["num_samples"] == 10
    assert res["teacher"] == json.loads((student_dir / "stepdistill_sampling.json").read_text())["extra"]["teacher"]
    assert "test split" in res["reference"] and res["classifier"] == str(classifier_dir)
    assert res["command"].startswith(f"stepdistill eval {student_dir} --suite digits --steps 1,2 --num-samples 10")
    rows = res["rows"]
    keys = {"name", "kind", "solver", "steps", "nfe", "sec_per_image", "speedup_vs_teacher", "domain_fid",
            "class_accuracy"}
    assert all(keys <= set(r) for r in rows)
    teacher = [r for r in rows if r["kind"] == "teacher"]
    students = [r for r in rows if r["kind"] == "student"]
    solvers = [r for r in rows if r["kind"] == "solver"]
    # Teacher: 3 steps with batched CFG = 6 evaluations per image, measured by the forward hook.
    assert len(teacher) == 1 and teacher[0]["steps"] == 3 and teacher[0]["nfe"] == 6.0
    assert teacher[0]["speedup_vs_teacher"] == pytest.approx(1.0)
    # Student: the guidance is embedded, so NFE = steps.
    assert [(r["steps"], r["nfe"], r["name"], r["solver"]) for r in students] == \
        [(1, 1.0, "lcm", "LCMScheduler"), (2, 2.0, "lcm", "LCMScheduler")]
    # Solvers at the student's NFE: one guided step (2 evaluations) for NFE 1 and 2, deduplicated.
    assert sorted((r["name"], r["solver"], r["steps"], r["nfe"]) for r in solvers) == [
        ("DDIM", "DDIMScheduler", 1, 2.0), ("DPM-Solver++", "DPMSolverMultistepScheduler", 1, 2.0)]
    for r in rows:
        assert r["sec_per_image"] > 0 and r["speedup_vs_teacher"] > 0
        assert r["domain_fid"] >= 0 and 0.0 <= r["class_accuracy"] <= 1.0
        assert (out.parent / r["grid"]).is_file()
    assert (out.parent / "digits-lcm-samples" / "student-1steps.png").is_file()
    assert (out.parent / "digits-lcm-samples" / "teacher-3steps.png").is_file()


def test_eval_rejects_folder_without_sampling_spec(tmp_path, capsys):
    rc = main(["eval", str(tmp_path), "--steps", "1"])
    assert rc == 2
    assert "stepdistill_sampling.json" in capsys.readouterr().err


def test_missing_teacher_name_asks_for_teacher_flag():
    from stepdistill.evaluation.digits_eval import resolve_teacher_ref
    from stepdistill.export import SamplingSpec

    spec = SamplingSpec(recipe="lcm", num_inference_steps=4, guidance_scale=8.0, scheduler="LCMScheduler")
    with pytest.raises(ValueError, match="--teacher"):
        resolve_teacher_ref(spec, None)
    assert resolve_teacher_ref(spec, "digits:sd") == "digits:sd"
    spec.extra = {"teacher": "digits:dit"}
    assert resolve_teacher_ref(spec, None) == "digits:dit"


def test_teacher_reference_maps_committed_digits_teachers(tmp_path):
    from types import SimpleNamespace

    from stepdistill.benchmarks.digits.paths import ASSETS_DIR
    from stepdistill.evaluation.teacher_ref import teacher_folder, teacher_reference

    assert teacher_reference(SimpleNamespace(name_or_path=str(ASSETS_DIR / "teacher_sd"))) == "digits:sd"
    assert teacher_reference(SimpleNamespace(name_or_path=str(tmp_path))) == str(tmp_path)
    assert teacher_reference(SimpleNamespace(name_or_path="")) is None
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        teacher_folder(str(tmp_path))


# ------------------------------------------------------------------------------------ scripts/write_results.py
def _write_results_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("write_results", REPO / "scripts" / "write_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _synthetic_results(folder: Path) -> None:
    folder.mkdir(parents=True)
    toy = {"recipe": "lcm", "mixture": "ring8", "sw2_floor": 0.01, "w": 2.0,
           "command": "stepdistill bench toy2d --recipe lcm",
           "results": [{"steps": 1, "nfe": 1, "sw2": 0.05, "sw2_ratio": 5.0, "mmd": 0.002, "mode_weight_err": 0.04,
                        "paired_error": 0.3},
                       {"steps": 4, "nfe": 4, "sw2": 0.02, "sw2_ratio": 2.0, "mmd": 0.001, "mode_weight_err": 0.01,
                        "paired_error": None}]}
    (folder / "toy2d-lcm-ring8.json").write_text(json.dumps(toy))
    rows = [
        {"name": "teacher", "kind": "teacher", "solver": "DDIMScheduler", "steps": 50, "nfe": 100.0,
         "sec_per_image": 0.2, "speedup_vs_teacher": 1.0, "domain_fid": 1.5, "class_accuracy": 0.95,
         "grid": "digits-lcm-samples/teacher-50steps.png"},
        {"name": "lcm", "kind": "student", "solver": "LCMScheduler", "steps": 1, "nfe": 1.0, "sec_per_image": 0.004,
         "speedup_vs_teacher": 50.0, "domain_fid": 6.0, "class_accuracy": 0.8},
        {"name": "lcm", "kind": "student", "solver": "LCMScheduler", "steps": 2, "nfe": 2.0, "sec_per_image": 0.01,
         "speedup_vs_teacher": 20.0, "domain_fid": 4.25, "class_accuracy": 0.9,
         "grid": "digits-lcm-samples/student-2steps.png"},
        {"name": "DDIM", "kind": "solver", "solver": "DDIMScheduler", "steps": 1, "nfe": 2.0, "sec_per_image": 0.01,
         "speedup_vs_teacher": 20.0, "domain_fid": 90.0, "class_accuracy": 0.2,
         "grid": "digits-lcm-samples/ddim-1steps.png"},
    ]
    digits = {"suite": "digits", "model": "runs/lcm-digits-sd/export", "recipe": "lcm", "teacher": "digits:sd",
              "num_samples": 1000, "reference": "digits test split", "command": "stepdistill eval X --suite digits",
              "rows": rows}
    (folder / "digits-lcm.json").write_text(json.dumps(digits))
    (folder / "jvp-attention-cpu.json").write_text(json.dumps({"device": "cpu"}))


def test_write_results_tables_figure_and_determinism(tmp_path):
    wr = _write_results_module()
    results = tmp_path / "eval" / "results"
    _synthetic_results(results)
    out = tmp_path / "eval" / "RESULTS.md"
    assert wr.main(["--results-dir", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    fig = tmp_path / "eval" / "quality_vs_nfe.png"
    assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![quality vs NFE](quality_vs_nfe.png)" in text
    assert "| lcm | ring8 | 2 | 1 | 1 | 0.0500 | 0.0100 | 5.00 | 0.0020 | 0.040 | 0.300 | no |" in text
    assert "| lcm | ring8 | 2 | 4 | 4 | 0.0200 | 0.0100 | 2.00 | 0.0010 | 0.010 | - | yes |" in text
    assert "| teacher + CFG | DDIMScheduler | 50 | 100 | 1.50 | 0.950 | 0.2000 | 1.0x |" in text
    assert "| lcm (student) | LCMScheduler | 2 | 2 | 4.25 | 0.900 | 0.0100 | 20.0x |" in text
    assert "| DDIM (training-free) | DDIMScheduler | 1 | 2 | 90.00 | 0.200 | 0.0100 | 20.0x |" in text
    assert "(results/digits-lcm-samples/student-2steps.png)" in text
    # summary: FID as a multiple of the same run's teacher, speedup against the issue #8 targets (1 step: 60x)
    assert "| lcm (`runs/lcm-digits-sd/export`) | digits:sd | 1 | 1 | 6.00 | 4.00 | 0.800 | 50.0x | < 60x |" in text
    assert "| lcm (`runs/lcm-digits-sd/export`) | digits:sd | 2 | 2 | 4.25 | 2.83 | 0.900 | 20.0x | - |" in text
    assert "`stepdistill eval X --suite digits`" in text and "`stepdistill bench toy2d --recipe lcm`" in text
    assert "[jvp-attention-cpu.json](results/jvp-attention-cpu.json)" in text
    first_png = fig.read_bytes()
    assert wr.main(["--results-dir", str(results), "--out", str(out)]) == 0
    assert out.read_text() == text and fig.read_bytes() == first_png


def test_write_results_without_results(tmp_path):
    wr = _write_results_module()
    out = tmp_path / "RESULTS.md"
    wr.main(["--results-dir", str(tmp_path / "none"), "--out", str(out)])
    assert "No benchmark results yet" in out.read_text()
    assert not (tmp_path / "quality_vs_nfe.png").exists()


# ------------------------------------------------------------------------------ --suite coco-prompts (FID/KID/CLIP)
@pytest.fixture(scope="module")
def reference_dir(tmp_path_factory):
    """Six 'real' images of mixed sizes and modes (the loader must crop, resize and convert them)."""
    from PIL import Image

    folder = tmp_path_factory.mktemp("reference")
    g = torch.Generator().manual_seed(0)
    for i, (w, h) in enumerate([(40, 30), (30, 40), (32, 32), (50, 20), (16, 16), (33, 35)]):
        arr = (torch.rand((h, w, 3), generator=g) * 255).to(torch.uint8).numpy()
        im = Image.fromarray(arr)
        (im.convert("L") if i == 2 else im).save(folder / f"ref{i}.{'jpg' if i % 2 else 'png'}")
    return folder


def test_eval_coco_prompts_writes_fid_kid_clip_rows(student_dir, reference_dir, random_inception_file, tiny_clip_dir,
                                                    tmp_path, capsys):
    prompts = tmp_path / "captions.json"
    prompts.write_text(json.dumps({"annotations": [{"caption": "A  cat on a mat"}, {"caption": "two dogs"},
                                                   {"caption": " "}, {"caption": "a red bus " * 40}]}))
    out = tmp_path / "coco" / "prompts-lcm.json"
    rc = main(["eval", str(student_dir), "--suite", "coco-prompts", "--prompts", str(prompts), "--reference",
               str(reference_dir), "--inception", str(random_inception_file), "--clip", str(tiny_clip_dir),
               "--fid-features", "64", "--steps", "1,2", "--num-samples", "4", "--teacher-steps", "2",
               "--batch-size", "2", "--json", str(out)])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["suite"] == "coco-prompts" and res["num_samples"] == 4 and res["distinct_prompts"] == 3
    assert res["num_reference"] == 6 and res["image_size"] == res["image_size"] > 0
    assert res["feature_extractor"]["features"].startswith("64-d") and res["clip"]["weights"] == str(tiny_clip_dir)
    assert res["teacher_defaults"] == {"num_inference_steps": 2, "guidance_scale": 7.5}
    assert "--fid-features 64" in res["command"] and res["command"].startswith(
        f"stepdistill eval {student_dir} --suite coco-prompts --prompts {prompts}")
    rows = res["rows"]
    kinds = [(r["kind"], r["steps"], r["nfe"]) for r in rows]
    # teacher: 2 guided steps, batched CFG = 4 evaluations; student NFE = steps; solvers at one guided step
    assert kinds[0] == ("teacher", 2, 4.0)
    assert [k for k in kinds if k[0] == "student"] == [("student", 1, 1.0), ("student", 2, 2.0)]
    assert sorted(k for k in kinds if k[0] == "solver") == [("solver", 1, 2.0), ("solver", 1, 2.0)]
    for r in rows:
        assert r["fid"] >= 0 and r["kid_mean"] is not None and 0.0 <= r["clip_score"] <= 100.0
        assert r["sec_per_image"] > 0 and (out.parent / r["grid"]).is_file()


def test_eval_coco_prompts_bad_inputs_fail_before_sampling(student_dir, reference_dir, random_inception_file,
                                                           tiny_clip_dir, tmp_path, capsys, monkeypatch):
    from stepdistill.evaluation import prompts_eval

    monkeypatch.delenv(prompts_eval.CLIP_ENV_VAR, raising=False)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n# just a comment\n   \n")
    good = tmp_path / "p.txt"
    good.write_text("a cat\n")
    base = ["eval", str(student_dir), "--suite", "coco-prompts", "--steps", "1", "--fid-features", "64"]
    cases = [
        (["--reference", str(reference_dir)], "needs --prompts"),
        (["--prompts", str(empty), "--reference", str(reference_dir), "--inception", str(random_inception_file),
          "--clip", str(tiny_clip_dir)], "has no prompts"),
        (["--prompts", str(good), "--reference", str(reference_dir), "--inception", str(random_inception_file)],
         "needs CLIP weights"),
        (["--prompts", str(good), "--reference", str(tmp_path / "nope"), "--inception", str(random_inception_file),
          "--clip", str(tiny_clip_dir)], "reference folder"),
        (["--prompts", str(good), "--reference", str(reference_dir), "--inception", str(tmp_path / "missing.pth"),
          "--clip", str(tiny_clip_dir)], "missing.pth"),
    ]
    for extra, message in cases:
        rc = main(base + extra)
        assert rc == 2, (extra, message)
        assert message in capsys.readouterr().err, message
