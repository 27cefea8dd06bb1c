"""The Gradio demo: a teacher and its distilled students side by side from the same seed.

    stepdistill demo [--teacher REF] [--student DIR ...] [--port N]      # or: python demo/app.py ...

One prompt (or class label, for class-conditional teachers), a seed, the teacher's steps and guidance, and optional
overrides of the students' exported steps / guidance. Each image is labelled with its step count, its measured NFE
and wall time, and each student with its speedup over the teacher (teacher seconds / student seconds, measured in
the same request). A second tab shows the sample grids saved by eval runs and the quality-vs-NFE figure.

Requests go through Gradio's queue with ``default_concurrency_limit=1``: concurrent users wait in line instead of
running models at the same time. Models load on first use and stay cached. Bad input and models that are missing
or fail to load produce a message in the UI (``gr.Error`` for the request's own input, the status panel and a
``gr.Warning`` for model failures), never a traceback, and the server keeps serving.
"""

from __future__ import annotations

import argparse
import glob
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from . import defaults as D
from .args import add_demo_arguments
from .gallery import find_eval_images, quality_figure
from .models import DemoModelError, ModelCache, SampleResult, conditioning_kind, display_image, resolve_model_path

__all__ = ["DemoApp", "RequestError", "validate_request", "default_students", "build_demo", "launch_demo",
           "add_demo_arguments", "main"]

log = logging.getLogger(__name__)


class RequestError(ValueError):
    """The request's own input is invalid (shown to the user as ``gr.Error``)."""


def default_students(patterns=D.DEFAULT_STUDENT_GLOBS) -> list[str]:
    """Every folder matching ``DEFAULT_STUDENT_GLOBS`` that looks like an exported pipeline, sorted."""
    found: list[str] = []
    for pattern in patterns:
        found += [p for p in sorted(glob.glob(pattern)) if (Path(p) / "model_index.json").is_file()]
    return found


def _display_name(ref: str) -> str:
    path = Path(ref)
    if ":" in ref and not path.exists():
        return ref
    return path.parent.name if path.name == "export" and path.parent.name else (path.name or ref)


def _as_int(value, what: str) -> int:
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a whole number, got {value!r}") from None
    if f != int(f):
        raise RequestError(f"{what} must be a whole number, got {value!r}")
    return int(f)


def _as_float(value, what: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RequestError(f"{what} must be a number, got {value!r}") from None


def _in_range(value, lo, hi, what: str, note: str = "") -> None:
    if not lo <= value <= hi:
        raise RequestError(f"{what} must be between {lo} and {hi}{note}, got {value}")


@dataclass
class Request:
    prompt: str
    class_label: int
    seed: int
    teacher_steps: int
    teacher_guidance: float
    student_steps: int  # 0 = exported
    student_guidance: float  # 0 = exported


def validate_request(kind: str, prompt, class_label, seed, teacher_steps, teacher_guidance, student_steps,
                     student_guidance) -> Request:
    """Check every control; raise :class:`RequestError` naming the control, the allowed range and the bad value."""
    prompt = "" if prompt is None else str(prompt)
    if kind == "prompt" and not prompt.strip():
        raise RequestError(f"the prompt is empty; type a prompt such as {D.DEFAULT_PROMPT!r}")
    label = _as_int(class_label if class_label not in (None, "") else 0, "class label")
    if kind == "class" and label < 0:
        raise RequestError(f"class label must be 0 or more, got {label}")
    seed = _as_int(seed, "seed")
    _in_range(seed, *D.SEED_RANGE, "seed")
    t_steps = _as_int(teacher_steps, "teacher steps")
    _in_range(t_steps, *D.TEACHER_STEPS_RANGE, "teacher steps")
    s_steps = _as_int(student_steps, "student steps")
    _in_range(s_steps, *D.STUDENT_STEPS_RANGE, "student steps", " (0 = the exported setting)")
    t_guid = _as_float(teacher_guidance, "teacher guidance")
    _in_range(t_guid, *D.GUIDANCE_RANGE, "teacher guidance")
    s_guid = _as_float(student_guidance, "student guidance")
    _in_range(s_guid, *D.GUIDANCE_RANGE, "student guidance", " (0 = the exported setting)")
    return Request(prompt, label, seed, t_steps, t_guid, s_steps, s_guid)


def _fmt_seconds(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _fmt_nfe(n: float) -> str:
    return f"{n:g}"


class DemoApp:
    """The demo's state (model references, cache) and its request handler, independent of the Gradio layout."""

    def __init__(self, teacher: str = D.DEFAULT_TEACHER, students: list[str] | None = None,
                 eval_dir: str | os.PathLike = D.DEFAULT_EVAL_DIR, device: str | None = None, dtype=None,
                 cache: ModelCache | None = None):
        self.teacher_ref = str(teacher)
        self.students_defaulted = students is None
        self.student_refs = [str(s) for s in (default_students() if students is None else students)]
        self.student_names = [_display_name(s) for s in self.student_refs]
        self.eval_dir = Path(eval_dir)
        self.cache = cache if cache is not None else ModelCache(device=device, dtype=dtype)
        self.kind = self._guess_kind()

    def _guess_kind(self) -> str:
        for ref in [self.teacher_ref, *self.student_refs]:
            try:
                return conditioning_kind(resolve_model_path(ref))
            except DemoModelError:
                continue
        return "prompt"

    # ------------------------------------------------------------------ status text
    def model_notes(self) -> list[str]:
        """One line per model that cannot be used as things stand (nothing is loaded)."""
        notes = []
        for role, ref in [("teacher", self.teacher_ref), *[("student", s) for s in self.student_refs]]:
            if self.cache.loaded(ref):
                continue
            try:
                resolve_model_path(ref)
            except DemoModelError as exc:
                notes.append(f"{role} `{ref}`: {exc}")
        if not self.student_refs:
            where = ", ".join(f"`{g}`" for g in D.DEFAULT_STUDENT_GLOBS)
            notes.append(f"no student models: nothing matches {where}; {D.MAKE_STUDENTS_HINT}" if self.students_defaulted
                         else "no student models given; pass --student DIR")
        return notes

    def models_markdown(self) -> str:
        lines = [f"**Teacher:** `{self.teacher_ref}`", "**Students:** " + (
            ", ".join(f"`{r}`" for r in self.student_refs) if self.student_refs else "none")]
        notes = self.model_notes()
        if notes:
            lines += ["", "**Not available:**"] + [f"- {n}" for n in notes]
        return "\n\n".join(lines[:2]) + ("\n" + "\n".join(lines[2:]) if notes else "")

    # ------------------------------------------------------------------ generation
    def _run(self, role: str, ref: str, name: str, req: Request, steps: int | None, guidance: float | None) -> SampleResult:
        try:
            model = self.cache.get(ref, name=name)
            return model.sample(req.prompt, req.class_label, req.seed, steps=steps, guidance=guidance)
        except DemoModelError as exc:
            return SampleResult(name=name, error=str(exc))
        except Exception as exc:  # noqa: BLE001 - the server must keep serving whatever a model does
            log.exception("sampling %s failed", ref)
            return SampleResult(name=name, error=f"{role} {name} failed to sample: {type(exc).__name__}: {exc}")

    def generate(self, req: Request) -> tuple[SampleResult, list[SampleResult]]:
        teacher = self._run("teacher", self.teacher_ref, "teacher", req, req.teacher_steps, req.teacher_guidance)
        students = [self._run("student", ref, name, req, req.student_steps or None, req.student_guidance or None)
                    for ref, name in zip(self.student_refs, self.student_names)]
        return teacher, students

    @staticmethod
    def speedup(teacher: SampleResult, student: SampleResult) -> float | None:
        if teacher.ok and student.ok and student.seconds and student.seconds > 0:
            return teacher.seconds / student.seconds
        return None

    def summary(self, req: Request, teacher: SampleResult, students: list[SampleResult]) -> dict:
        def entry(r: SampleResult) -> dict:
            return {"name": r.name, "steps": r.steps, "nfe": r.nfe, "seconds": r.seconds, "guidance": r.guidance,
                    "error": r.error}

        return {"seed": req.seed, "prompt": req.prompt if self.kind == "prompt" else None,
                "class_label": req.class_label if self.kind == "class" else None,
                "device": str(self.cache.device), "teacher": entry(teacher),
                "students": [{**entry(s), "speedup": self.speedup(teacher, s)} for s in students]}

    def label(self, r: SampleResult, teacher: SampleResult | None = None) -> str:
        if not r.ok:
            return f"{r.name}: not available"
        text = f"{r.name} · {r.steps} steps · NFE {_fmt_nfe(r.nfe)} · {_fmt_seconds(r.seconds)}"
        if teacher is not None:
            s = self.speedup(teacher, r)
            text += f" · {s:.1f}x faster" if s is not None else " · speedup n/a (teacher failed)"
        return text

    def status_markdown(self, teacher: SampleResult, students: list[SampleResult]) -> str:
        rows = ["| model | steps | NFE | wall time | speedup vs teacher |", "|---|---|---|---|---|"]
        for r, is_teacher in [(teacher, True), *[(s, False) for s in students]]:
            if not r.ok:
                rows.append(f"| {r.name} | - | - | - | not available |")
                continue
            s = None if is_teacher else self.speedup(teacher, r)
            sp = "1x (reference)" if is_teacher else (f"**{s:.1f}x**" if s is not None else "n/a")
            rows.append(f"| {r.name} | {r.steps} | {_fmt_nfe(r.nfe)} | {_fmt_seconds(r.seconds)} | {sp} |")
        errors = [f"- {r.name}: {r.error}" for r in [teacher, *students] if not r.ok]
        if not students:
            errors += [f"- {n}" for n in self.model_notes() if n.startswith("no student")]
        text = "\n".join(rows) + f"\n\nSame seed for every model; device `{self.cache.device}`."
        return text + ("\n\n**Problems:**\n" + "\n".join(errors) if errors else "")

    def gallery_items(self) -> tuple[str | None, list[tuple[str, str]], str]:
        figure = quality_figure(self.eval_dir)
        images = find_eval_images(self.eval_dir)
        note = (f"{len(images)} image(s) under `{self.eval_dir}`" if images or figure else
                f"No eval outputs under `{self.eval_dir}` yet: run `bash scripts/main.sh` (or `stepdistill eval`) "
                f"to produce sample grids and `{D.QUALITY_FIGURE}`.")
        return (str(figure) if figure else None), images, note


def build_demo(app: DemoApp):
    """The Gradio Blocks for ``app`` (queued with ``default_concurrency_limit=1``)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    def on_generate(prompt, class_label, seed, teacher_steps, teacher_guidance, student_steps, student_guidance):
        try:
            req = validate_request(app.kind, prompt, class_label, seed, teacher_steps, teacher_guidance,
                                   student_steps, student_guidance)
        except RequestError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        try:
            teacher, students = app.generate(req)
            for r in [teacher, *students]:
                if not r.ok:
                    gr.Warning(f"{r.name}: {r.error}")
            big = lambda r: display_image(r.image, D.DISPLAY_MIN_SIZE)  # noqa: E731
            images = [gr.Image(value=big(teacher), label=app.label(teacher))]
            images += [gr.Image(value=big(s), label=app.label(s, teacher)) for s in students]
            return (app.status_markdown(teacher, students), *images, app.summary(req, teacher, students))
        except Exception as exc:  # noqa: BLE001 - last resort: a message, never a traceback
            log.exception("demo request failed")
            raise gr.Error(f"the request failed: {type(exc).__name__}: {exc}") from None

    def on_load():
        figure, images, note = app.gallery_items()
        return app.models_markdown(), gr.Image(value=figure, visible=figure is not None), images, note

    with gr.Blocks(title="stepdistill: teacher vs students", analytics_enabled=False) as demo:
        gr.Markdown("# stepdistill demo\nThe teacher and each distilled student sample from the same seed. "
                    "Labels give steps, measured NFE (network evaluations per image; a CFG step counts 2) and wall "
                    "time; the speedup is the teacher's time over the student's in the same request.")
        with gr.Tab("Generate"):
            models_md = gr.Markdown(app.models_markdown(), elem_id="models")
            with gr.Row():
                prompt = gr.Textbox(D.DEFAULT_PROMPT, label="Prompt", visible=app.kind == "prompt", elem_id="prompt",
                                    scale=3)
                class_label = gr.Number(3, label="Class label", precision=0, visible=app.kind == "class",
                                        elem_id="class_label")
                seed = gr.Number(0, label="Seed", precision=0, elem_id="seed")
            with gr.Row():
                # step counts are plain numbers checked by validate_request (its messages name the control)
                teacher_steps = gr.Number(D.DEFAULT_TEACHER_STEPS, precision=0, label="Teacher steps",
                                          info="{}-{}".format(*D.TEACHER_STEPS_RANGE), elem_id="teacher_steps")
                teacher_guidance = gr.Slider(*D.GUIDANCE_RANGE, value=D.DEFAULT_TEACHER_GUIDANCE, step=0.5,
                                             label="Teacher guidance scale")
                student_steps = gr.Number(0, precision=0, label="Student steps",
                                          info="{}-{}; 0 = as exported".format(*D.STUDENT_STEPS_RANGE),
                                          elem_id="student_steps")
                student_guidance = gr.Slider(*D.GUIDANCE_RANGE, value=0, step=0.5,
                                             label="Student guidance (0 = as exported)")
            button = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Row():
                images = [gr.Image(label="teacher", type="pil", format="png", elem_id="img-teacher",
                                   interactive=False)]
                images += [gr.Image(label=f"student: {n}", type="pil", format="png", elem_id=f"img-student-{i}",
                                    interactive=False) for i, n in enumerate(app.student_names)]
            status = gr.Markdown("Press **Generate**.", label="Status", elem_id="status")
            with gr.Accordion("Results (JSON)", open=False):
                summary = gr.JSON(label="Results (JSON)", elem_id="results")
        with gr.Tab("Gallery"):
            gallery_note = gr.Markdown(elem_id="gallery-note")
            figure = gr.Image(label="Quality vs NFE", type="filepath", interactive=False, visible=False,
                              elem_id="quality-figure")
            gallery = gr.Gallery(label="Sample grids from eval runs", columns=4, elem_id="gallery")
            refresh = gr.Button("Refresh")

        inputs = [prompt, class_label, seed, teacher_steps, teacher_guidance, student_steps, student_guidance]
        button.click(on_generate, inputs, [status, *images, summary], api_name="generate")
        demo.load(on_load, None, [models_md, figure, gallery, gallery_note], api_name=False)
        refresh.click(on_load, None, [models_md, figure, gallery, gallery_note], api_name=False)
    demo.queue(default_concurrency_limit=1)
    return demo


def launch_demo(app: DemoApp, port: int | None = None, host: str = "127.0.0.1", block: bool = True, **kwargs):
    """Build and launch; with ``block=False`` return the running Blocks (call ``.close()`` to stop it)."""
    demo = build_demo(app)
    allowed = [str(app.eval_dir.resolve())]
    demo.launch(server_name=host, server_port=port, prevent_thread_lock=not block, allowed_paths=allowed,
                show_error=True, quiet=not block, footer_links=["api"], **kwargs)
    return demo


def run_from_args(args) -> int:
    import torch

    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    dtype = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    app = DemoApp(args.teacher, args.students, eval_dir=args.eval_dir, device=args.device, dtype=dtype)
    print(f"stepdistill demo: teacher {app.teacher_ref}; students {app.student_refs or 'none'}; "
          f"open http://{args.host}:{args.port}")
    for note in app.model_notes():
        print(f"  note: {note}")
    launch_demo(app, port=args.port, host=args.host, block=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = add_demo_arguments(argparse.ArgumentParser(prog="demo/app.py", description=__doc__.split("\n\n")[0]))
    return run_from_args(p.parse_args(argv))
