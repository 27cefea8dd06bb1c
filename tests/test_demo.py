"""Issue 7: the Gradio demo, served on a loopback port and driven (1) with gradio_client and (2) in headless Debian
Chromium (clicks Generate, waits for both images to render, saves a screenshot: to a temporary folder, or to
$STEPDISTILL_DEMO_SCREENSHOT when set, e.g. docs/demo.png to refresh the README's picture).

Models: the tiny random SD pipeline as the teacher and an LCM student exported from it (random weights: the images
are noise; what is tested is the wiring, the measured NFE / timings / speedup, and the error handling).
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest
from PIL import Image

from stepdistill.demo import defaults as D
from stepdistill.demo.app import DemoApp, RequestError, launch_demo, validate_request
from stepdistill.demo.gallery import find_eval_images, quality_figure
from stepdistill.demo.models import DemoModelError, ModelCache

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path(shutil.which("chromium") or "/usr/bin/chromium")  # Debian package, see scripts/setup.sh
TEACHER_STEPS = 6


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The server, the client and Chromium share the machine: the tiny models run fastest on one intra-op thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Teacher folder, an exported LCM student, and a student folder whose UNet weights are corrupt.

    The student is the LCM recipe's export at initialisation (no training steps): a real
    ``LatentConsistencyModelPipeline`` folder with its ``stepdistill_sampling.json``, which is all the demo reads."""
    from stepdistill.models.teacher_io import TeacherBundle, load_pipeline
    from stepdistill.recipes.lcm import LCMOptions, LCMRecipe
    from stepdistill.testing.tiny_pipelines import tiny_pipeline_dir

    teacher = tiny_pipeline_dir("sd")
    root = tmp_path_factory.mktemp("demo_models")
    recipe = LCMRecipe(TeacherBundle.from_pipeline(load_pipeline(teacher)),
                       LCMOptions(variant="full", sample_conditions=["a cat"]))
    student = Path(recipe.export(root / "lcm-tiny-sd" / "export"))  # LatentConsistencyModelPipeline, 4 steps
    broken = root / "broken-student"
    shutil.copytree(student, broken)
    for f in (broken / "unet").glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")
    eval_dir = root / "eval"
    (eval_dir / "digits").mkdir(parents=True)
    Image.new("RGB", (64, 32), (200, 30, 30)).save(eval_dir / "digits" / "lcm-4steps.png")
    Image.new("RGB", (80, 60), (30, 30, 200)).save(eval_dir / D.QUALITY_FIGURE)
    return {"teacher": str(teacher), "student": str(student), "broken": str(broken), "eval": eval_dir}


@pytest.fixture(scope="module")
def cache():
    return ModelCache(device="cpu")  # shared by both apps: each model loads once in this file


@pytest.fixture(scope="module")
def server(models, cache):
    """Teacher + good student + a missing folder + a folder that fails to load."""
    students = [models["student"], str(Path(models["eval"]).parent / "no-such-student"), models["broken"]]
    app = DemoApp(models["teacher"], students, eval_dir=models["eval"], cache=cache)
    port = _free_port()
    demo = launch_demo(app, port=port, block=False)
    yield f"http://127.0.0.1:{port}/", app
    demo.close()


def _generate(client, prompt="a cat", steps=TEACHER_STEPS, guidance=3.0, student_steps=0, student_guidance=0,
              seed=0):
    return client.predict(prompt, 3, seed, steps, guidance, student_steps, student_guidance, api_name="/generate")


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0], verbose=False)


def test_client_gets_teacher_and_student_with_nfe_timings_and_speedup(client):
    status, teacher_img, student_img, missing_img, broken_img, summary = _generate(client)
    t, (s, missing, broken) = summary["teacher"], summary["students"]
    # NFE is counted from the backbone calls: CFG (guidance 3 > 1) batches cond + uncond -> 2 per teacher step;
    # the exported LCM student embeds guidance and runs its 4 exported steps, 1 evaluation each.
    assert t["error"] is None and t["steps"] == TEACHER_STEPS and t["nfe"] == 2 * TEACHER_STEPS
    assert s["error"] is None and s["steps"] == 4 and s["nfe"] == 4 and s["guidance"] == 8.0
    assert t["seconds"] > 0 and s["seconds"] > 0
    assert s["speedup"] == pytest.approx(t["seconds"] / s["seconds"])
    for update, label_bits in [(teacher_img, ["teacher", f"NFE {2 * TEACHER_STEPS}"]),
                               (student_img, ["lcm-tiny-sd", "NFE 4", "faster"])]:
        assert all(b in update["label"] for b in label_bits), update["label"]
        with Image.open(update["value"]) as im:  # 32 px native, shown at >= 256 px (nearest neighbour)
            assert im.size == (256, 256)
    assert "| lcm-tiny-sd | 4 | 4 |" in status and "x**" in status
    # the missing and the corrupt student give messages, not images, and the others still ran
    assert missing_img["value"] is None and "does not exist" in missing["error"]
    assert broken_img["value"] is None and "could not load" in broken["error"]
    assert missing["speedup"] is None and "no-such-student" in status and "broken-student" in status

    # overrides: teacher without CFG (guidance 1) -> 1 NFE per step; the student at 2 steps instead of its 4
    _, _, _, _, _, summary = _generate(client, guidance=1.0, student_steps=2, seed=7)
    assert summary["teacher"]["nfe"] == TEACHER_STEPS and summary["students"][0]["nfe"] == 2
    assert summary["seed"] == 7


def test_bad_input_gives_a_message_and_the_server_keeps_serving(client):
    from gradio_client.exceptions import AppError

    for kwargs, message in [({"prompt": "   "}, "the prompt is empty"),
                            ({"steps": 1000}, "teacher steps must be between 1 and 200"),
                            ({"student_steps": -1}, "student steps must be between 0 and 50"),
                            ({"guidance": 99}, "greater than maximum value 20")]:  # the slider's own bound check
        with pytest.raises(AppError, match=message) as info:
            _generate(client, **kwargs)
        assert "Traceback" not in str(info.value)
        summary = _generate(client, steps=1)[-1]  # the server still answers
        assert summary["teacher"]["nfe"] == 2 and summary["students"][0]["error"] is None


def test_a_failed_load_is_remembered_until_the_folder_changes(models, tmp_path):
    cache = ModelCache(device="cpu")
    folder = tmp_path / "student"
    shutil.copytree(models["broken"], folder)
    with pytest.raises(DemoModelError, match="could not load") as first:
        cache.get(str(folder))
    with pytest.raises(DemoModelError) as again:  # same files: the remembered message, no second load attempt
        cache.get(str(folder))
    assert str(again.value) == str(first.value)
    shutil.rmtree(folder / "unet")
    shutil.copytree(Path(models["student"]) / "unet", folder / "unet")  # the folder is fixed: loads without restart
    model = cache.get(str(folder))
    assert model.spec.num_inference_steps == 4 and type(model.pipe).__name__ == "LatentConsistencyModelPipeline"


def test_concurrent_requests_are_queued_one_at_a_time(server, client, monkeypatch):
    import threading

    app = server[1]
    active, peak, lock = [0], [0], threading.Lock()
    original = app.generate

    def tracked(req):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            return original(req)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(app, "generate", tracked)
    jobs = [client.submit("a cat", 3, seed, 2, 3.0, 0, 0, api_name="/generate") for seed in range(3)]
    results = [job.result(timeout=120) for job in jobs]
    assert sorted(r[-1]["seed"] for r in results) == [0, 1, 2] and peak[0] == 1


def test_validate_request_names_the_control():
    ok = validate_request("prompt", "a 3", 0, 5, 25, 3.0, 0, 0)
    assert (ok.seed, ok.teacher_steps, ok.student_steps) == (5, 25, 0)
    assert validate_request("class", "", 7, 0, 1, 0, 1, 0).class_label == 7  # no prompt needed for class labels
    for args, message in [(("prompt", "a", 0, 0, 2.5, 3, 0, 0), "teacher steps must be a whole number"),
                          (("prompt", "a", 0, -1, 2, 3, 0, 0), "seed must be between"),
                          (("prompt", "a", 0, 0, 2, 99, 0, 0), "teacher guidance must be between"),
                          (("class", "", -2, 0, 2, 3, 0, 0), "class label must be 0 or more")]:
        with pytest.raises(RequestError, match=message):
            validate_request(*args)


def test_missing_default_models_are_reported_not_fatal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/ here: no default students
    app = DemoApp(str(tmp_path / "no-teacher"), None, eval_dir=tmp_path / "eval")
    notes = app.model_notes()
    assert any("no-teacher" in n and "does not exist" in n for n in notes)
    assert any("no student models" in n and "stepdistill train recipes/lcm/digits-sd.yaml" in n for n in notes)
    req = validate_request("prompt", "a 3", 0, 0, 2, 3.0, 0, 0)
    teacher, students = app.generate(req)
    assert students == [] and not teacher.ok and "does not exist" in teacher.error
    assert "No eval outputs" in app.gallery_items()[2]


def test_gallery_finds_grids_and_the_quality_figure(models):
    images = find_eval_images(models["eval"])
    assert [caption for _, caption in images] == ["digits/lcm-4steps.png"]  # the figure is shown on its own
    assert quality_figure(models["eval"]) == models["eval"] / D.QUALITY_FIGURE


def test_cli_has_the_demo_command():
    from stepdistill.cli import build_parser

    args = build_parser().parse_args(["demo", "--teacher", "T", "--student", "A", "--student", "B", "--port", "7999"])
    assert (args.teacher, args.students, args.port) == ("T", ["A", "B"], 7999)
    assert build_parser().parse_args(["demo"]).teacher == D.DEFAULT_TEACHER


def test_browser_renders_teacher_and_student_and_saves_screenshot(models, cache, tmp_path):
    # the committed docs/demo.png is only rewritten on request, never as a side effect of running the tests
    screenshot = Path(os.environ.get("STEPDISTILL_DEMO_SCREENSHOT") or tmp_path / "demo.png")
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's browser with `apt-get install -y chromium` "
                    f"(scripts/setup.sh does this when apt-get is available)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("the playwright package is missing: `.venv/bin/pip install -e '.[test]'`")

    app = DemoApp(models["teacher"], [models["student"]], eval_dir=models["eval"], cache=cache)
    port = _free_port()
    demo = launch_demo(app, port=port, block=False)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                                        args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=30_000)
                page.locator("#teacher_steps input").fill(str(TEACHER_STEPS))
                page.click("#generate button, button#generate")
                rendered = """() => ['#img-teacher', '#img-student-0'].every(sel => {
                    const img = document.querySelector(sel + ' img');
                    return img !== null && img.complete && img.naturalWidth > 0; })"""
                page.wait_for_function(rendered, timeout=30_000)
                assert "lcm-tiny-sd" in page.inner_text("#status")
                labels = page.inner_text("#img-student-0")
                assert "NFE 4" in labels and "faster" in labels, labels
                screenshot.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(screenshot), full_page=True)
                # the gallery tab shows the saved grid and the quality figure
                page.get_by_role("tab", name="Gallery").click()
                page.wait_for_function("() => ['#gallery img', '#quality-figure img'].every(sel => [...document"
                                       ".querySelectorAll(sel)].some(i => i.complete && i.naturalWidth > 0))",
                                       timeout=15_000)
            finally:
                browser.close()
    finally:
        demo.close()
    with Image.open(screenshot) as im:
        assert im.size[0] == 1280 and im.size[1] >= 600
