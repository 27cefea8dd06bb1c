"""Write eval/RESULTS.md and eval/quality_vs_nfe.png from the JSON results under eval/results/ (never edit by hand).

    python scripts/write_results.py [--results-dir eval/results] [--out eval/RESULTS.md]
                                    [--figure eval/quality_vs_nfe.png]

Every ``*.json`` is read (sorted by file name) and recognised by its content:

* toy2d (``stepdistill bench toy2d ... --json``: ``recipe``, ``mixture``, ``sw2_floor``, ``results``) -> one table,
  recipe x steps x SW2 / noise floor / ratio / MMD / mode-weight error / paired error;
* digits (``stepdistill eval MODEL --suite digits --json``: ``suite == "digits"``, ``rows``) -> one table,
  row (teacher / student recipe / solver) x steps x NFE x domain FID x class accuracy x speedup, plus the sample grids;
* anything else is listed under "Other results" with a link.

The figure plots quality against NFE: toy2d SW2 / floor (left) and digits domain FID (right), one line per recipe,
the teacher as a star, each training-free solver as a dashed line. The command that produced each JSON (its
``"command"`` field) is quoted. Output is deterministic for the same inputs (sorted inputs, fixed formatting, PNG
written without a timestamp).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fmt(v, spec: str = ".4f") -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return format(v, spec)
    return str(v)


def classify(data) -> str:
    if not isinstance(data, dict):
        return "other"
    if data.get("suite") == "digits" and isinstance(data.get("rows"), list):
        return "digits"
    if "sw2_floor" in data and isinstance(data.get("results"), list) and "recipe" in data:
        return "toy2d"
    return "other"


def load_results(results_dir: Path) -> list[tuple[Path, dict | None, str]]:
    """``(path, data, kind)`` for every JSON file, sorted by name; unreadable files get kind ``"invalid"``."""
    out = []
    for f in sorted(results_dir.glob("*.json")) if results_dir.is_dir() else []:
        try:
            data = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            out.append((f, {"error": str(exc)}, "invalid"))
            continue
        out.append((f, data, classify(data)))
    return out


def _rel(path: Path, base: Path) -> str:
    return Path(os.path.relpath(path, base)).as_posix()


def toy2d_table(items: list[tuple[Path, dict]], base: Path) -> list[str]:
    lines = ["## toy2d (analytic Gaussian-mixture teacher, spec Part C)", "",
             "Reference: the guided teacher PF-ODE. Noise floor: SW2 between two independent reference sets. "
             "Pass criterion (spec C.4): SW2 <= 3x the noise floor.", "",
             "| recipe | mixture | w | steps | NFE | SW2 | noise floor | SW2 / floor | MMD | mode-weight err | "
             "paired err | pass (<= 3x) | source |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for f, r in items:
        for row in r["results"]:
            floor = row.get("sw2_floor", r.get("sw2_floor"))
            ratio = row.get("sw2_ratio")
            if ratio is None and floor and row.get("sw2") is not None:
                ratio = row["sw2"] / floor
            passed = row.get("passes_3x", None if ratio is None else ratio <= 3.0)
            lines.append(
                f"| {r['recipe']} | {r.get('mixture', '-')} | {_fmt(r.get('w', r.get('guidance_scale')), 'g')} | "
                f"{row.get('steps', '-')} | {_fmt(row.get('nfe'), 'g')} | {_fmt(row.get('sw2'))} | {_fmt(floor)} | "
                f"{_fmt(ratio, '.2f')} | {_fmt(row.get('mmd'))} | {_fmt(row.get('mode_weight_err'), '.3f')} | "
                f"{_fmt(row.get('paired_error'), '.3f')} | {_fmt(passed)} | [{f.name}]({_rel(f, base)}) |")
    return lines


def _digits_row_label(row: dict) -> str:
    if row.get("kind") == "student":
        return f"{row['name']} (student)"
    if row.get("kind") == "teacher":
        w = row.get("guidance_scale")
        return "teacher + CFG" if w is None or w > 1 else "teacher"
    return f"{row['name']} (training-free)"


def digits_table(items: list[tuple[Path, dict]], base: Path) -> list[str]:
    lines = ["## digits (scikit-learn handwritten digits, 16x16)", "",
             "Domain FID: Frechet distance of the digit classifier's penultimate features between the samples and "
             "the 360 held-out test digits (lower is better; compare only at equal sample counts). Class accuracy: "
             "the classifier's agreement with the requested digit. NFE is measured (backbone evaluations per image; "
             "a CFG step counts 2). Speedup: teacher seconds per image / row seconds per image, same run.", ""]
    for f, r in items:
        lines += [f"### {r.get('recipe', '?')} student: `{r.get('model', '?')}`", "",
                  f"Teacher `{r.get('teacher', '?')}`, {r.get('num_samples', '?')} samples per row, reference: "
                  f"{r.get('reference', '?')}. Source: [{f.name}]({_rel(f, base)}).", "",
                  "| row | sampler | steps | NFE | domain FID | class accuracy | sec / image | speedup vs teacher |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(
                f"| {_digits_row_label(row)} | {row.get('solver', '-')} | {row.get('steps', '-')} | "
                f"{_fmt(row.get('nfe'), 'g')} | {_fmt(row.get('domain_fid'), '.2f')} | "
                f"{_fmt(row.get('class_accuracy'), '.3f')} | {_fmt(row.get('sec_per_image'), '.4f')} | "
                f"{_fmt(row.get('speedup_vs_teacher'), '.1f')}x |")
        grids = [row for row in r["rows"] if row.get("grid") and row.get("kind") in ("teacher", "student")]
        if grids:
            lines += ["", "Samples (one column per digit 0-9):", ""]
            for row in grids:
                lines.append(f"- {_digits_row_label(row)}, {row.get('steps')} steps: "
                             f"![{row['name']} {row.get('steps')} steps]({_rel(f.parent / row['grid'], base)})")
        lines.append("")
    return lines


def write_figure(toy: list[tuple[Path, dict]], digits: list[tuple[Path, dict]], path: Path) -> bool:
    """Quality vs NFE; returns False (and writes nothing) when there is nothing to plot."""
    if not toy and not digits:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [p for p in (("toy2d", toy), ("digits", digits)) if p[1]]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (kind, items) in zip(axes[0], panels):
        if kind == "toy2d":
            for _, r in items:
                pts = sorted((row.get("nfe") or row["steps"], row["sw2_ratio"]) for row in r["results"]
                             if row.get("sw2_ratio") is not None)
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=f"{r['recipe']} ({r.get('mixture', '?')})")
            ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="noise floor")
            ax.axhline(3.0, color="red", lw=0.8, ls="--", label="3x floor (pass)")
            ax.set_ylabel("SW2 / noise floor (lower is better)")
            ax.set_title("toy2d")
        else:
            seen = set()
            for _, r in items:
                by_name: dict[tuple[str, str], list[tuple[float, float]]] = {}
                for row in r["rows"]:
                    if row.get("domain_fid") is None or row.get("nfe") is None:
                        continue
                    by_name.setdefault((row.get("kind", "?"), row["name"]), []).append((row["nfe"], row["domain_fid"]))
                for (kind_, name), pts in sorted(by_name.items()):
                    pts.sort()
                    label = {"teacher": "teacher", "solver": f"{name} (training-free)"}.get(kind_, name)
                    label = label if label not in seen else None
                    seen.add(label)
                    if kind_ == "teacher":
                        ax.plot(*zip(*pts), ls="none", marker="*", ms=14, color="black", label=label)
                    elif kind_ == "solver":
                        ax.plot(*zip(*pts), ls="--", marker="s", label=label)
                    else:
                        ax.plot(*zip(*pts), ls="-", marker="o", lw=2, label=label)
            ax.set_ylabel("domain FID (lower is better)")
            ax.set_title("digits")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("NFE per sample")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return True


def render(results_dir: Path, out: Path, figure: Path) -> str:
    base = out.parent
    items = load_results(results_dir)
    toy = [(f, d) for f, d, k in items if k == "toy2d"]
    digits = [(f, d) for f, d, k in items if k == "digits"]
    other = [(f, d, k) for f, d, k in items if k in ("other", "invalid")]
    lines = ["# stepdistill results", "",
             f"Generated by `python scripts/write_results.py` from `{_rel(results_dir, base)}/*.json`; "
             "rerun `bash scripts/main.sh` to reproduce. Do not edit by hand.", ""]
    if not toy and not digits:
        lines += ["No benchmark results yet: run `bash scripts/main.sh`.", ""]
    if write_figure(toy, digits, figure):
        lines += [f"![quality vs NFE]({_rel(figure, base)})", ""]
    if toy:
        lines += toy2d_table(toy, base) + [""]
    if digits:
        lines += digits_table(digits, base)
    if other:
        lines += ["## Other results", ""]
        for f, d, k in other:
            note = " (not valid JSON)" if k == "invalid" else ""
            lines.append(f"- [{f.name}]({_rel(f, base)}){note}")
        lines.append("")
    cmds = [(f, d) for f, d, k in items if k in ("toy2d", "digits")]
    if cmds:
        lines += ["## Commands", "", "Each JSON records the command that produced it:", ""]
        for f, d in cmds:
            cmd = d.get("command")
            lines.append(f"- `{f.name}`: " + (f"`{cmd}`" if cmd else "(command not recorded in the JSON)"))
        lines.append("")
    text = "\n".join(lines).rstrip("\n") + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results-dir", type=Path, default=ROOT / "eval" / "results")
    p.add_argument("--out", type=Path, default=ROOT / "eval" / "RESULTS.md")
    p.add_argument("--figure", type=Path, default=None, help="default: quality_vs_nfe.png next to --out")
    args = p.parse_args(argv)
    figure = args.figure or args.out.parent / "quality_vs_nfe.png"
    render(args.results_dir, args.out, figure)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
