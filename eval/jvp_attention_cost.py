"""Cost of a JVP through JVP-capable attention, as a ratio to a plain forward of the same model (CPU).

Run: ``OMP_NUM_THREADS=1 .venv/bin/python eval/jvp_attention_cost.py [--out eval/results/jvp-attention-cpu.json]``

For each backbone (the tiny test models of ``stepdistill.testing.tiny_pipelines`` and two larger variants whose
attention carries real weight: 1024 and 256 tokens), times in float32, batch 2, best of ``--repeats``:

* ``forward_s``: a plain forward with the stock Diffusers processors (fused SDPA);
* ``jvp_s``: ``torch.func.jvp`` (primal + tangent, tangent in the input) with
  ``stepdistill.models.jvp_attention`` (fused SDPA forward + explicit tangent rule);
* ``jvp_math_s``: the same JVP with unfused math attention (what one gets without the custom rule).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from stepdistill.models.backbones import call_backbone, detect_family  # noqa: E402
from stepdistill.models.conditioning import Conditioning  # noqa: E402
from stepdistill.models.jvp_attention import measure_jvp_cost  # noqa: E402
from stepdistill.testing.tiny_pipelines import build_tiny_backbone  # noqa: E402

CASES = {
    "tiny:sd (UNet2DConditionModel, 8x8)": ("sd", {}),
    "tiny:dit (DiT, 16 tokens)": ("dit", {}),
    "tiny:pixart (PixArt, 16 tokens)": ("pixart", {}),
    "tiny:sd3 (SD3 joint attention, 16+6 tokens)": ("sd3", {}),
    "tiny:sana (linear self-attn + SDPA cross-attn)": ("sana", {}),
    "sd UNet 32x32 latents (1024 tokens at level 1)": ("sd", {"sample_size": 32}),
    "DiT 32x32, patch 2 (256 tokens), 4 layers x 4 heads x 32": (
        "dit", {"sample_size": 32, "num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32}),
}


def _call(model, n=2):
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    fam = detect_family(model)
    x = torch.randn(n, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    cond = Conditioning()
    if fam == "unet2d_condition":
        cond = Conditioning(encoder_hidden_states=torch.randn(n, 8, cfg.cross_attention_dim, generator=g))
    elif fam == "dit":
        cond = Conditioning(class_labels=torch.tensor([1, 2]))
    elif fam in ("pixart", "sana"):
        cond = Conditioning(encoder_hidden_states=torch.randn(n, 8, cfg.caption_channels, generator=g),
                            encoder_attention_mask=torch.ones(n, 8))
    elif fam == "sd3":
        cond = Conditioning(encoder_hidden_states=torch.randn(n, 6, cfg.joint_attention_dim, generator=g),
                            pooled_projections=torch.randn(n, cfg.pooled_projection_dim, generator=g))
    ts = torch.tensor([300.0, 700.0])
    return x, lambda x: call_backbone(fam, model, x, ts, cond)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="eval/results/jvp-attention-cpu.json")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for label, (family, overrides) in CASES.items():
        model = build_tiny_backbone(family, **overrides).float().eval()
        x, call = _call(model)
        rows[label] = measure_jvp_cost(model, call, x, repeats=args.repeats)
        print(f"{label}: " + ", ".join(f"{k}={v:.4g}" for k, v in rows[label].items()), flush=True)
    report = {"device": "cpu", "torch": torch.__version__, "threads": torch.get_num_threads(),
              "cpu": platform.processor() or platform.machine(), "batch": 2, "dtype": "float32",
              "repeats": args.repeats, "timing": "best of repeats, after one warm-up", "results": rows,
              "command": "OMP_NUM_THREADS=1 .venv/bin/python eval/jvp_attention_cost.py"}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
