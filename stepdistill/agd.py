"""Public helpers for adapter guidance distillation (AGD, spec B.10) adapters.

``install_adapters(pipe, folder)`` puts adapters exported by an ``agd`` run into a stock Diffusers pipeline of the same
base model; afterwards ``pipe(prompt, guidance_scale=w)`` makes one UNet call per step. ``load_adapters`` /
``save_adapters`` read and write the folder (``agd_adapters.safetensors`` + ``agd_config.json``).
"""

from .models.guidance_adapters import (ADAPTER_CONFIG_FILE, ADAPTER_FILE, AdapterHandle, guidance_features,
                                       install_adapters, load_adapters, save_adapters)

__all__ = ["ADAPTER_CONFIG_FILE", "ADAPTER_FILE", "AdapterHandle", "guidance_features", "install_adapters",
           "load_adapters", "save_adapters"]
