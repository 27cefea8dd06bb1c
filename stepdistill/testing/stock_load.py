"""Load and sample an exported folder in a fresh Python process that can import only stock libraries.

The child process blocks ``import stepdistill`` (a meta-path finder that raises), loads the folder with
``DiffusionPipeline.from_pretrained`` (plus ``load_lora_weights`` when the folder has LoRA weights), samples with
the settings in ``stepdistill_sampling.json``, and prints a JSON summary on its last line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

_CHILD = textwrap.dedent(
    """
    import importlib.abc, json, os, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "stepdistill" or name.startswith("stepdistill."):
                raise ImportError("stepdistill must not be needed to sample an exported student")
    sys.meta_path.insert(0, _Block())
    import torch
    from diffusers import DiffusionPipeline
    folder, call = sys.argv[1], json.loads(sys.argv[2])
    spec = json.load(open(os.path.join(folder, "stepdistill_sampling.json")))
    pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    if os.path.exists(os.path.join(folder, "pytorch_lora_weights.safetensors")):
        pipe.load_lora_weights(folder)
    pipe.set_progress_bar_config(disable=True)
    kw = {"num_inference_steps": spec["num_inference_steps"], "guidance_scale": spec["guidance_scale"]}
    if spec.get("timesteps") and not spec.get("timesteps_from_steps"):
        kw = {"timesteps": spec["timesteps"], "guidance_scale": spec["guidance_scale"]}
    kw.update(call)
    calls = []
    orig = pipe.unet.forward if getattr(pipe, "unet", None) is not None else pipe.transformer.forward
    def counting(*a, **k):
        calls.append(int(torch.as_tensor(a[1] if len(a) > 1 else k["timestep"]).flatten()[0]))
        return orig(*a, **k)
    if getattr(pipe, "unet", None) is not None:
        pipe.unet.forward = counting
    else:
        pipe.transformer.forward = counting
    out = pipe(generator=torch.Generator().manual_seed(0), output_type="np", **kw)
    img = out.images
    print(json.dumps({"pipeline": type(pipe).__name__, "scheduler": type(pipe.scheduler).__name__,
                      "shape": list(img.shape), "finite": bool((img == img).all()), "timesteps": calls,
                      "stepdistill_imported": any(m.startswith("stepdistill") for m in sys.modules),
                      "lora": bool(getattr(pipe, "get_list_adapters", lambda: {})())}))
    """
)


def load_and_sample_in_fresh_process(folder: str | os.PathLike, call_kwargs: dict, timeout: float = 300) -> dict:
    """Run the child; return its JSON summary or raise with its stderr."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(Path(folder)), json.dumps(call_kwargs)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd="/")
    if proc.returncode != 0:
        raise RuntimeError(f"fresh-process load of {folder} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
